//! The CPU's conv2d forward GEMM: `Y = W · B + bias`, register-tiled and safe.
//!
//! `W` comes packed in panels of `mr` output channels ([`Tile::pack`]); `B`, the column matrix,
//! is gathered `nr` columns at a time from rows of a source (the stride-phase planes, or the
//! input itself for a 1x1 convolution) into a strip that stays in cache while every panel runs
//! over it. Each `mr` x `nr` block of the output is summed in vector registers over the whole
//! depth and stored once, straight into the NCHW output, the wide columns of the planes'
//! layout dropped and the bias added on the way.
//!
//! The instruction set is chosen at run time through `pulp` (AVX-512, AVX2 + FMA, NEON, or
//! scalar), which keeps this module free of `unsafe`. Every output element is one fused
//! multiply-add chain over the depth in order, whatever the tile, the strip or the thread: the
//! bits depend on neither the thread count nor the instruction set.

use std::sync::OnceLock;

use pulp::{Arch, Simd, WithSimd};

/// The register tile of the CPU this runs on: `mr` output channels by `nr` output columns.
#[derive(Clone, Copy, Debug)]
pub(super) struct Tile {
    pub mr: usize,
    pub nr: usize,
    arch: Arch,
}

impl Tile {
    /// The tile of the best instruction set this CPU has, detected once.
    pub fn get() -> Self {
        static TILE: OnceLock<Tile> = OnceLock::new();
        *TILE.get_or_init(|| {
            let arch = Arch::new();
            let [mr, nr] = arch.dispatch(Select(Dims));
            Tile { mr, nr, arch }
        })
    }

    /// `rows` x `depth` row-major `a` in panels of `mr` rows, each depth-major (the `mr`
    /// values of one depth step together), the last panel padded with zero rows.
    pub fn pack(&self, a: &[f32], rows: usize, depth: usize) -> Vec<f32> {
        let mut packed = vec![0.0; rows.div_ceil(self.mr) * self.mr * depth];
        for (panel, to) in packed.chunks_exact_mut(self.mr * depth).enumerate() {
            for m in 0..self.mr.min(rows - panel * self.mr) {
                let row = &a[(panel * self.mr + m) * depth..][..depth];
                for (d, v) in row.iter().enumerate() {
                    to[d * self.mr + m] = *v;
                }
            }
        }
        packed
    }

    /// Runs `g` on this CPU's instruction set.
    pub fn run(&self, g: Gemm<'_>) {
        self.arch.dispatch(Select(g))
    }
}

/// One output block: `rows` output channels over all `cols` columns of the column matrix.
pub(super) struct Gemm<'a> {
    /// The channels' weight panels, from [`Tile::pack`].
    pub w: &'a [f32],
    /// The column matrix's row `r` is `src[offsets[r]..][..cols]`.
    pub src: &'a [f32],
    pub offsets: &'a [usize],
    pub cols: usize,
    /// Column `j` is output `(j / wq, j % wq)`; those with `j % wq >= ow` are dropped.
    pub wq: usize,
    pub ow: usize,
    /// `rows` output planes of `oh * ow`, and their bias.
    pub out: &'a mut [f32],
    pub rows: usize,
    pub bias: Option<&'a [f32]>,
    /// Room for one strip: `offsets.len() * nr` floats.
    pub strip: &'a mut [f32],
}

/// Work done with the tile chosen for an instruction set.
trait PerTile {
    type Output;
    fn run<S: Simd, const MR: usize, const NV: usize>(self, simd: S) -> Self::Output;
}

/// The one table of tiles: `MR` channels by `NV` vectors, their accumulators filling most
/// of the vector registers (24 of 32 with AVX-512 and NEON, 12 of 16 with AVX2), with room
/// for the strip's `NV` vectors and a broadcast weight.
struct Select<T>(T);

impl<T: PerTile> WithSimd for Select<T> {
    type Output = T::Output;

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) -> T::Output {
        match S::F32_LANES {
            16 => self.0.run::<S, 8, 3>(simd),
            8 => self.0.run::<S, 4, 3>(simd),
            _ => self.0.run::<S, 4, 4>(simd),
        }
    }
}

/// The tile's `[mr, nr]`.
struct Dims;

impl PerTile for Dims {
    type Output = [usize; 2];
    fn run<S: Simd, const MR: usize, const NV: usize>(self, _: S) -> [usize; 2] {
        [MR, NV * S::F32_LANES]
    }
}

impl PerTile for Gemm<'_> {
    type Output = ();

    #[inline(always)]
    fn run<S: Simd, const MR: usize, const NV: usize>(self, simd: S) {
        let nr = NV * S::F32_LANES;
        let depth = self.offsets.len();
        let ohw = self.out.len() / self.rows.max(1);
        let strip: &mut [S::f32s] = bytemuck::cast_slice_mut(&mut self.strip[..depth * nr]);
        for j0 in (0..self.cols).step_by(nr) {
            gather::<S, NV>(self.src, self.offsets, j0, strip);
            let n = nr.min(self.cols - j0);
            for (panel, w) in self.w.chunks_exact(MR * depth).enumerate() {
                let acc = block::<S, MR, NV>(simd, w, strip);
                let m0 = panel * MR;
                for (m, acc) in acc.iter().enumerate().take(self.rows - m0) {
                    let bias = self.bias.map_or(0.0, |b| b[m0 + m]);
                    let plane = &mut self.out[(m0 + m) * ohw..][..ohw];
                    let values: &[f32] = bytemuck::cast_slice(acc);
                    store(&values[..n], j0, self.wq, self.ow, bias, plane);
                }
            }
        }
    }
}

/// Columns `j0..j0 + nr` of the column matrix into `strip`, depth-major; columns past a
/// row's source are zero.
#[inline(always)]
fn gather<S: Simd, const NV: usize>(
    src: &[f32],
    offsets: &[usize],
    j0: usize,
    strip: &mut [S::f32s],
) {
    let nr = NV * S::F32_LANES;
    for (&at, to) in offsets.iter().zip(strip.chunks_exact_mut(NV)) {
        let from = &src[(at + j0).min(src.len())..];
        if let Some(run) = from.get(..nr) {
            to.copy_from_slice(bytemuck::cast_slice(run));
        } else {
            let to: &mut [f32] = bytemuck::cast_slice_mut(to);
            to[..from.len()].copy_from_slice(from);
            to[from.len()..].fill(0.0);
        }
    }
}

/// One `MR` x `NV` vector block: `w`'s panel times the strip, summed over the depth.
#[inline(always)]
fn block<S: Simd, const MR: usize, const NV: usize>(
    simd: S,
    w: &[f32],
    strip: &[S::f32s],
) -> [[S::f32s; NV]; MR] {
    let mut acc = [[simd.splat_f32s(0.0); NV]; MR];
    for (wk, bk) in w.chunks_exact(MR).zip(strip.chunks_exact(NV)) {
        let b: [S::f32s; NV] = std::array::from_fn(|v| bk[v]);
        for (row, &wm) in acc.iter_mut().zip(wk) {
            let wm = simd.splat_f32s(wm);
            for (a, &b) in row.iter_mut().zip(&b) {
                *a = simd.mul_add_f32s(wm, b, *a);
            }
        }
    }
    acc
}

/// Writes `values`, columns `j0..` of one channel, into its output plane plus `bias`,
/// dropping the wide columns.
#[inline(always)]
fn store(values: &[f32], j0: usize, wq: usize, ow: usize, bias: f32, plane: &mut [f32]) {
    let (mut j, end) = (j0, j0 + values.len());
    while j < end {
        let (oy, ox) = (j / wq, j % wq);
        let run = (wq - ox).min(end - j);
        if ox < ow {
            let kept = run.min(ow - ox);
            let to = &mut plane[oy * ow + ox..][..kept];
            let from = &values[j - j0..][..kept];
            to.iter_mut().zip(from).for_each(|(t, v)| *t = v + bias);
        }
        j += run;
    }
}
