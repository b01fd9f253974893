//! The CPU's conv2d GEMM, `Y = W · B + bias`, register-tiled and safe: the forward pass, and
//! the input gradient (`W` the transposed weights, `B` the output gradient).
//!
//! `W` is read as it is, `mr` output channels at a time, each weight broadcast to a vector
//! register. `B`, the column matrix, is never built: its rows are runs of a source (the
//! stride-phase planes, or the input itself for a 1x1 convolution), read `nr` columns at a
//! time where they lie, or copied a strip at a time into rows aligned to cache lines where
//! many panels share the strip. Each `mr` x `nr` block of the output is summed in vector
//! registers over the whole depth and stored once, straight into the NCHW output, the
//! planes' wide columns dropped and the bias added on the way.
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
        *TILE.get_or_init(|| Self::of(Arch::new()))
    }

    fn of(arch: Arch) -> Self {
        let [mr, nr] = arch.dispatch(Select(Dims));
        Tile { mr, nr, arch }
    }

    /// The tiles of every instruction set this CPU has, the scalar one first.
    #[cfg(test)]
    pub fn all() -> Vec<Self> {
        let mut all = vec![Self::of(Arch::Scalar)];
        #[cfg(target_arch = "x86_64")]
        {
            all.extend(pulp::x86::V3::try_new().map(|s| Self::of(Arch::V3(s))));
            all.extend(pulp::x86::V4::try_new().map(|s| Self::of(Arch::V4(s))));
        }
        #[cfg(not(target_arch = "x86_64"))]
        all.push(Self::get());
        all
    }

    /// Floats of room a [`Gemm`]'s strip needs for `depth` rows, aligned.
    pub fn strip_len(&self, depth: usize) -> usize {
        depth * self.nr + LINE
    }

    /// Runs `g` on this CPU's instruction set.
    pub fn run(&self, g: Gemm<'_>) {
        self.arch.dispatch(Select(g))
    }
}

/// Floats in a cache line: a gathered strip starts on one.
const LINE: usize = 16;

/// One output block: `rows` output channels over all their positions.
pub(super) struct Gemm<'a> {
    /// The channels' weights, row-major `rows` x `offsets.len()`.
    pub w: &'a [f32],
    /// Row `r` of the column matrix is `src[offsets[r]..][..cols]`.
    pub src: &'a [f32],
    pub offsets: &'a [usize],
    pub cols: usize,
    /// Column `j` is output `(j / wq, j % wq)`; those with `j % wq >= ow` are dropped.
    pub wq: usize,
    pub ow: usize,
    /// Images side by side in the column space, `cols` columns each: image `i`'s rows start
    /// `i * stride` further into `src`, its output planes `rows` planes further into `out`.
    /// A strip across two of them (`cols` must be at least `nr`) is gathered; images
    /// narrower than a few strips (a batch of 1x1 convolutions over 14x14) then waste no
    /// columns at each one's end.
    pub images: usize,
    pub stride: usize,
    /// `rows` output planes per image, and their bias.
    pub out: &'a mut [f32],
    pub rows: usize,
    pub bias: Option<&'a [f32]>,
    /// Room for one strip ([`Tile::strip_len`]), for columns gathered rather than read in
    /// place.
    pub strip: &'a mut [f32],
}

/// Work done with the tile chosen for an instruction set.
trait PerTile {
    type Output;
    /// `MR` channels by `NV` vectors; a strip of one vector takes `MR1` channels, a last
    /// panel of at most `MT` channels takes `MT`, and strips are gathered when they have at
    /// least `GP` panels.
    fn run<
        S: Simd,
        const MR: usize,
        const NV: usize,
        const MR1: usize,
        const MT: usize,
        const GP: usize,
    >(
        self,
        simd: S,
    ) -> Self::Output;
}

/// The one table of tiles: `MR` channels by `NV` vectors, their accumulators filling most
/// of the vector registers (24 of 32 with AVX-512, 12 of 16 with AVX2, 16 of 32 with NEON),
/// with room for the strip's `NV` vectors and a broadcast weight. AVX2's 16 registers take
/// 6 x 2 (12 + 2 + 1), not 4 x 3 (12 + 3 + 1): with every register spoken for, the compiler
/// kept one accumulator on the stack, and its store-to-load round trip at every step of the
/// depth halved the kernel's speed. Its panels of 6 leave 2 channels of 32, or 4 of 64, to a
/// last panel of 4, rather than computing a mostly wasted panel of 6. Read in place, most of
/// a strip's rows straddle two cache lines; gathered, each is whole lines. For AVX2 the copy
/// pays for itself from 16 panels on (a 1x1 convolution over 256 channels: 70-74 to 74-81
/// GFLOP/s on one thread), and costs more than it saves with fewer (11: 73 to 64). AVX-512
/// takes 6 x 4 (24 + 4 + 1), not 8 x 3: 6 broadcasts rather than 8 for the same 24
/// multiply-adds, 8-25% faster on every benchmark shape on a Sapphire Rapids core. There a
/// strip of 4 vectors paid for its copy with 43 panels (a 1x1 convolution over 256
/// channels) and cost more than it saved with 22 (3x3 over 128): the cut lies between, at
/// 32.
struct Select<T>(T);

impl<T: PerTile> WithSimd for Select<T> {
    type Output = T::Output;

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) -> T::Output {
        match S::F32_LANES {
            16 => self.0.run::<S, 6, 4, 16, 4, 32>(simd),
            8 => self.0.run::<S, 6, 2, 8, 4, 16>(simd),
            _ => self.0.run::<S, 4, 4, 8, 4, { usize::MAX }>(simd),
        }
    }
}

/// The tile's `[mr, nr]`.
struct Dims;

impl PerTile for Dims {
    type Output = [usize; 2];
    fn run<
        S: Simd,
        const MR: usize,
        const NV: usize,
        const MR1: usize,
        const MT: usize,
        const GP: usize,
    >(
        self,
        _: S,
    ) -> [usize; 2] {
        [MR, NV * S::F32_LANES]
    }
}

impl PerTile for Gemm<'_> {
    type Output = ();

    /// Strips of `NV` vectors of columns, the last one narrower where that is enough; one
    /// vector wide, it takes more channels at a time, so that its weights' broadcasts do not
    /// outnumber its multiply-adds.
    #[inline(always)]
    fn run<
        S: Simd,
        const MR: usize,
        const NV: usize,
        const MR1: usize,
        const MT: usize,
        const GP: usize,
    >(
        mut self,
        simd: S,
    ) {
        let gathered = self.rows.div_ceil(MR) >= GP;
        let reach = self.offsets.iter().copied().max().unwrap_or(0);
        let (mut c0, end) = (0, self.images * self.cols);
        while c0 < end {
            let n = (NV * S::F32_LANES).min(end - c0);
            match n.div_ceil(S::F32_LANES) {
                1 if NV > 1 => self.strip::<S, MR1, 1, MR1>(simd, gathered, reach, c0, n),
                2 if NV > 2 => self.strip::<S, MR, 2, MT>(simd, gathered, reach, c0, n),
                _ => self.strip::<S, MR, NV, MT>(simd, gathered, reach, c0, n),
            }
            c0 += n;
        }
    }
}

impl Gemm<'_> {
    /// Columns `c0..c0 + n` of every channel: each panel times those columns, stored. The
    /// columns are read where they lie in the source, a row's `V` vectors at a time, unless
    /// they are to be `gathered`, the row furthest in (at offset `reach`) would pass the
    /// source's end, or they span two images: then they are gathered into the strip first,
    /// aligned to a cache line. Panels are `MR` channels, the last one `MT` where that is
    /// enough.
    #[inline(always)]
    fn strip<S: Simd, const MR: usize, const V: usize, const MT: usize>(
        &mut self,
        simd: S,
        gathered: bool,
        reach: usize,
        c0: usize,
        n: usize,
    ) {
        let width = V * S::F32_LANES;
        let depth = self.offsets.len();
        let (image, j0) = (c0 / self.cols, c0 % self.cols);
        // Columns in this image, and where its rows start.
        let (first, base) = (n.min(self.cols - j0), image * self.stride + j0);
        debug_assert!(
            self.images == 1 || self.cols >= width,
            "a strip spans two images"
        );
        let rows = if !gathered && first == n && base + reach + width <= self.src.len() {
            Rows::InPlace(base)
        } else {
            // `align_offset` may give up (`usize::MAX`); the strip then stays unaligned.
            let line = self.strip.as_ptr().align_offset(LINE * 4).min(LINE - 1);
            let runs = [(base, first), (base - j0 + self.stride, n - first)];
            let strip = &mut self.strip[line..][..depth * width];
            gather(self.src, self.offsets, &runs, strip);
            Rows::Gathered(line)
        };
        let cut = StripCut {
            rows,
            n,
            first,
            image,
            at: [j0 / self.wq, j0 % self.wq],
        };
        let tail = self.rows % MR;
        let full = if tail > 0 && tail <= MT {
            self.rows - tail
        } else {
            self.rows
        };
        for m0 in (0..full).step_by(MR) {
            self.panel::<S, MR, V>(simd, cut, m0);
        }
        if full < self.rows {
            self.panel::<S, MT, V>(simd, cut, full);
        }
    }

    /// Channels `m0..m0 + MR` (fewer at the end) of a strip: summed and stored.
    #[inline(always)]
    fn panel<S: Simd, const MR: usize, const V: usize>(
        &mut self,
        simd: S,
        cut: StripCut,
        m0: usize,
    ) {
        let (width, depth) = (V * S::F32_LANES, self.offsets.len());
        let StripCut {
            rows,
            n,
            first,
            image,
            at,
        } = cut;
        let ohw = self.out.len() / (self.rows * self.images);
        // The panel's rows of weights; a short last panel repeats its last row, whose
        // sums are not stored.
        let w: [&[f32]; MR] =
            std::array::from_fn(|m| &self.w[(m0 + m).min(self.rows - 1) * depth..][..depth]);
        let acc = match rows {
            Rows::InPlace(base) => {
                let rows = self.offsets.iter();
                let rows = rows.map(|&at| &self.src[base + at..][..width]);
                block::<S, MR, V>(simd, w, rows)
            }
            Rows::Gathered(line) => {
                let rows = self.strip[line..][..depth * width].chunks_exact(width);
                block::<S, MR, V>(simd, w, rows)
            }
        };
        for (m, acc) in acc.iter().enumerate().take(self.rows - m0) {
            let bias = self.bias.map_or(0.0, |b| b[m0 + m]);
            let plane = |i: usize| (i * self.rows + m0 + m) * ohw;
            let values: &[f32] = bytemuck::cast_slice(acc);
            let (here, next) = values[..n].split_at(first);
            let out = &mut self.out[plane(image)..][..ohw];
            store(here, at, self.wq, self.ow, bias, out);
            if !next.is_empty() {
                let out = &mut self.out[plane(image + 1)..][..ohw];
                store(next, [0, 0], self.wq, self.ow, bias, out);
            }
        }
    }
}

/// Where a strip's column-matrix rows are: runs of the source from `base` on, or the
/// strip's own rows from `line` on.
#[derive(Clone, Copy)]
enum Rows {
    InPlace(usize),
    Gathered(usize),
}

/// A strip's rows, and where its `n` columns go: the `first` in `image` from output position
/// `at` (row, column), the rest in the next image.
#[derive(Clone, Copy)]
struct StripCut {
    rows: Rows,
    n: usize,
    first: usize,
    image: usize,
    at: [usize; 2],
}

/// Columns of the column matrix into `strip` (a row of it per offset), from `runs` of the
/// source (where, how many) one after the other; the rest of a row, and columns past the
/// source's end, are zero.
#[inline(always)]
fn gather(src: &[f32], offsets: &[usize], runs: &[(usize, usize)], strip: &mut [f32]) {
    let width = strip.len() / offsets.len();
    for (&at, mut to) in offsets.iter().zip(strip.chunks_exact_mut(width)) {
        for &(base, len) in runs {
            let from = &src[(base + at).min(src.len())..];
            let (row, rest) = to.split_at_mut(len);
            let k = len.min(from.len());
            row[..k].copy_from_slice(&from[..k]);
            row[k..].fill(0.0);
            to = rest;
        }
        to.fill(0.0);
    }
}

/// One `MR` x `V` vector block: `MR` rows of weights times the column matrix's `rows` (`V`
/// vectors each), summed over the depth.
#[inline(always)]
fn block<'a, S: Simd, const MR: usize, const V: usize>(
    simd: S,
    w: [&[f32]; MR],
    rows: impl Iterator<Item = &'a [f32]>,
) -> [[S::f32s; V]; MR] {
    let mut acc = [[simd.splat_f32s(0.0); V]; MR];
    for (k, row) in rows.enumerate() {
        let row: &[S::f32s] = bytemuck::cast_slice(row);
        let b: [S::f32s; V] = std::array::from_fn(|v| row[v]);
        for (acc, w) in acc.iter_mut().zip(&w) {
            let wm = simd.splat_f32s(w[k]);
            for (a, &b) in acc.iter_mut().zip(&b) {
                *a = simd.mul_add_f32s(wm, b, *a);
            }
        }
    }
    acc
}

/// Writes `values`, the columns of one channel from output `at` (row, column) on, into its
/// output plane plus `bias`, dropping the wide columns.
#[inline(always)]
fn store(
    mut values: &[f32],
    mut at: [usize; 2],
    wq: usize,
    ow: usize,
    bias: f32,
    plane: &mut [f32],
) {
    while !values.is_empty() {
        let [oy, ox] = at;
        let run = (wq - ox).min(values.len());
        if ox < ow {
            let kept = run.min(ow - ox);
            let to = &mut plane[oy * ow + ox..][..kept];
            to.iter_mut().zip(values).for_each(|(t, v)| *t = v + bias);
        }
        values = &values[run..];
        at = [oy + 1, 0];
    }
}
