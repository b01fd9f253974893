//! The CPU's conv2d GEMM, `Y = W · B + bias`, register-tiled and safe: the forward pass, and
//! the input gradient (`W` the transposed weights, `B` the output gradient).
//!
//! `W` is packed `mr` output channels at a time, depth-major, so that a step of the depth
//! broadcasts its panel's weights from one place. `B`, the column matrix, is never built
//! whole: its rows are runs of a source (the stride-phase planes, or the input itself for a
//! 1x1 convolution), taken `nr` columns (a strip: output positions side by side) and a pass
//! of the depth at a time, a block of strips at a time. A strip within one output row is
//! read in place, a row of it per step of the depth (copying it first took up to 6% longer).
//! One over a row's end, whose rows skip the planes' wide columns, or over two images is
//! gathered into rows aligned to cache lines. A panel of `W` for a pass stays in L1 while it
//! is multiplied by every strip of the block, whose rows stay in L2 (the BLIS loop order, as
//! in onnxruntime's MLAS). Each `mr` x `nr` block of the output is summed in vector
//! registers, kept between passes and stored once, whole vectors straight into the NCHW
//! output, the bias added on the way.
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

    /// Floats of room [`Tile::run`] needs for `rows` output channels over `depth` rows of
    /// the column matrix, with weights `w`: row-major ones are packed into it first.
    pub fn room(&self, w: Weights<'_>, rows: usize, depth: usize) -> usize {
        let (rows, kc) = (rows.next_multiple_of(self.mr), pass(depth, self.nr));
        let packing = match w {
            Weights::Rows(_) => rows * depth,
            Weights::Packed(_) => 0,
        };
        packing + LINE + group(kc, self.nr) * (kc + rows) * self.nr
    }

    /// `w` (`rows` x `depth`, row-major) laid out for [`Weights::Packed`].
    pub fn pack(&self, w: &[f32], rows: usize, depth: usize) -> Vec<f32> {
        let mut to = vec![0.0; rows.next_multiple_of(self.mr) * depth];
        self.dispatch(Select(Pack {
            w,
            rows,
            depth,
            to: &mut to,
        }));
        to
    }

    /// Runs `op` on this CPU's instruction set.
    pub fn dispatch<W: WithSimd>(&self, op: W) -> W::Output {
        self.arch.dispatch(op)
    }

    /// Runs `g` on this CPU's instruction set, in `room` ([`Tile::room`]).
    pub fn run(&self, g: Gemm<'_>, room: &mut [f32]) {
        self.arch.dispatch(Select((g, room)))
    }
}

/// Floats in a cache line: a gathered strip starts on one.
const LINE: usize = 16;

/// Bytes of a strip's rows in one pass over the depth, which sets the bytes of a panel's
/// weights per pass: 12 KB of them (AVX2), read for every strip of a block, stay in L1 with
/// the source lines a strip read in place touches (which overlap from tap to tap). Half as
/// many, as when every strip was gathered, took 1-4% more time on the 3x3 shapes (AVX2): the
/// sums kept between passes are loaded and stored twice as often.
const PASS_BYTES: usize = 32 << 10;

/// Bytes of a block's strips in one pass: they stay in L2 while every panel is multiplied
/// by them, so that the weights are read from L2 or further once per block rather than once
/// per strip (590 KB of them for a 3x3 convolution over 128 channels).
const BLOCK_BYTES: usize = 128 << 10;

/// Strips per block, for passes of `kc` rows over strips of `width` columns.
fn group(kc: usize, width: usize) -> usize {
    (BLOCK_BYTES / (kc.max(1) * width * 4)).clamp(1, 16)
}

/// Rows of the column matrix summed per pass over strips of `width` columns: at most
/// [`PASS_BYTES`], the depth split evenly.
fn pass(depth: usize, width: usize) -> usize {
    let most = (PASS_BYTES / (width * 4)).max(1);
    depth.div_ceil(depth.div_ceil(most).max(1))
}

/// A GEMM's weights, `rows` x `depth`: row-major, or already laid out by [`Tile::pack`] where
/// the same ones serve many GEMMs.
#[derive(Clone, Copy)]
pub(super) enum Weights<'a> {
    Rows(&'a [f32]),
    Packed(&'a [f32]),
}

/// One output block: `rows` output channels over all their positions.
pub(super) struct Gemm<'a> {
    /// The channels' weights, `rows` x `offsets.len()`.
    pub w: Weights<'a>,
    /// Row `r` of the column matrix is read from `src[offsets[r] + skip..]`, in rows `wq`
    /// floats apart of which the first `ow` are columns: column `j` (of `cols`) is output
    /// `(j / ow, j % ow)` of the band (`skip` is where the band starts: a multiple of `wq`),
    /// read at `(j / ow) * wq + j % ow`.
    pub src: &'a [f32],
    pub offsets: &'a [usize],
    pub skip: usize,
    pub cols: usize,
    pub wq: usize,
    pub ow: usize,
    /// Images side by side in the column space, `cols` columns each: image `i`'s rows start
    /// `i * stride` further into `src`, its output planes `rows` planes further into `out`.
    /// A strip may span two of them (`cols` must be at least `nr`): images narrower than a
    /// few strips (a batch of 1x1 convolutions over 14x14) then waste no columns at each
    /// one's end.
    pub images: usize,
    pub stride: usize,
    /// `rows` output planes per image (the band's rows of them), and their bias.
    pub out: Vec<&'a mut [f32]>,
    pub rows: usize,
    pub bias: Option<&'a [f32]>,
}

/// Work done with the tile chosen for an instruction set.
trait PerTile {
    type Output;
    /// `MR` channels by `NV` vectors; the last channels may take panels of `MT` instead
    /// ([`panels`]).
    fn run<S: Simd, const MR: usize, const NV: usize, const MT: usize>(
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
/// last panel of 4, rather than computing a mostly wasted panel of 6. AVX-512 takes 6 x 4
/// (24 + 4 + 1), not 8 x 3: 6 broadcasts rather than 8 for the same 24 multiply-adds, 8-25%
/// faster on every benchmark shape on a Sapphire Rapids core.
struct Select<T>(T);

impl<T: PerTile> WithSimd for Select<T> {
    type Output = T::Output;

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) -> T::Output {
        match S::F32_LANES {
            16 => self.0.run::<S, 6, 4, 4>(simd),
            8 => self.0.run::<S, 6, 2, 4>(simd),
            _ => self.0.run::<S, 4, 4, 4>(simd),
        }
    }
}

/// The tile's `[mr, nr]`.
struct Dims;

impl PerTile for Dims {
    type Output = [usize; 2];
    fn run<S: Simd, const MR: usize, const NV: usize, const MT: usize>(self, _: S) -> [usize; 2] {
        [MR, NV * S::F32_LANES]
    }
}

/// Weights to lay out panel by panel ([`Tile::pack`]).
struct Pack<'a> {
    w: &'a [f32],
    rows: usize,
    depth: usize,
    to: &'a mut [f32],
}

impl PerTile for Pack<'_> {
    type Output = ();
    fn run<S: Simd, const MR: usize, const NV: usize, const MT: usize>(self, _: S) {
        pack::<MR, MT>(self.w, self.rows, self.depth, self.to);
    }
}

/// A [`Gemm`] with its room split: the weights packed panel by panel, a block of strips of
/// gathered rows, and the panels' sums on each strip, kept between passes over the depth.
struct Work<'a> {
    g: Gemm<'a>,
    packed: &'a [f32],
    strips: &'a mut [f32],
    kept: &'a mut [f32],
    /// Rows of the column matrix per pass, the widest strip's columns, and the output
    /// channels rounded up to whole panels.
    kc: usize,
    width: usize,
    rows: usize,
    /// How far past a row's start its furthest run begins (the largest offset).
    reach: usize,
}

impl PerTile for (Gemm<'_>, &mut [f32]) {
    type Output = ();

    /// Packs the weights, then blocks of strips of `NV` vectors of columns (the last one
    /// narrower where that is enough), a pass of `kc` rows of the column matrix at a time:
    /// the pass's rows of each strip not read in place gathered, then each panel times every
    /// strip of the block, added to its sums of the passes before.
    #[inline(always)]
    fn run<S: Simd, const MR: usize, const NV: usize, const MT: usize>(self, simd: S) {
        let (g, room) = self;
        let (depth, width) = (g.offsets.len(), NV * S::F32_LANES);
        let (kc, rows) = (pass(depth, width), g.rows.next_multiple_of(MR));
        let (packed, rest): (&[f32], _) = match g.w {
            Weights::Rows(w) => {
                let (to, rest) = room.split_at_mut(rows * depth);
                pack::<MR, MT>(w, g.rows, depth, to);
                (to, rest)
            }
            Weights::Packed(w) => (w, room),
        };
        // `align_offset` may give up (`usize::MAX`); the strips then stay unaligned.
        let line = rest.as_ptr().align_offset(LINE * 4).min(LINE - 1);
        let per = group(kc, width);
        let (strips, kept) = rest[line..].split_at_mut(per * kc * width);
        let end = g.images * g.cols;
        let mut w = Work {
            reach: g.offsets.iter().copied().max().unwrap_or(0),
            g,
            packed,
            strips,
            kept,
            kc,
            width,
            rows,
        };
        let (full, tails) = panels::<MR, MT>(w.g.rows);
        let mut cuts = Vec::with_capacity(per);
        for b0 in (0..end).step_by(per * width) {
            for k0 in (0..depth).step_by(kc) {
                let k = [k0, (k0 + kc).min(depth)];
                cuts.clear();
                let starts = (b0..end.min(b0 + per * width)).step_by(width);
                cuts.extend(starts.map(|c0| w.cut::<S, NV>(c0, width.min(end - c0), k)));
                for (slot, &cut) in cuts.iter().enumerate().filter(|(_, c)| !c.direct()) {
                    w.fill(simd, cut, slot);
                }
                for m0 in (0..full).step_by(MR) {
                    for (slot, &cut) in cuts.iter().enumerate() {
                        w.panel_of::<S, MR, NV>(simd, cut, slot, m0);
                    }
                }
                for m0 in (full..).step_by(MT).take(tails) {
                    for (slot, &cut) in cuts.iter().enumerate() {
                        w.panel_of::<S, MT, NV>(simd, cut, slot, m0);
                    }
                }
            }
        }
    }
}

/// How `rows` channels are cut into panels: those of `MR` up to the first returned, then the
/// second's count of `MT`, whichever cut computes the fewest rows (a short panel repeats its
/// last row), the larger panels on a tie. With panels of 6 and 4, 32 channels take
/// 6 x 4 + 4 x 2 rather than 6 x 5 + 4, whose last panel wastes half of its rows: 6% of the
/// work on a 32-channel convolution.
fn panels<const MR: usize, const MT: usize>(rows: usize) -> (usize, usize) {
    let most = rows.div_ceil(MR);
    (most.saturating_sub(2)..=most)
        .rev()
        .map(|n| (n * MR, rows.saturating_sub(n * MR).div_ceil(MT)))
        .min_by_key(|&(full, tails)| full + tails * MT)
        .unwrap_or((0, 0))
}

/// Lays out the weights (`rows` x `depth`, row-major) panel by panel, each depth-major, so
/// that a step of the depth reads its panel's weights from one place. A short last panel
/// repeats its last row, whose sums are not stored.
fn pack<const MR: usize, const MT: usize>(w: &[f32], rows: usize, depth: usize, to: &mut [f32]) {
    fn panel<const P: usize>(w: &[f32], rows: usize, depth: usize, m0: usize, to: &mut [f32]) {
        let from: [&[f32]; P] =
            std::array::from_fn(|m| &w[(m0 + m).min(rows - 1) * depth..][..depth]);
        let (to, _) = to[..P * depth].as_chunks_mut::<P>();
        for (k, to) in to.iter_mut().enumerate() {
            *to = std::array::from_fn(|m| from[m][k]);
        }
    }
    let (full, tails) = panels::<MR, MT>(rows);
    for m0 in (0..full).step_by(MR) {
        panel::<MR>(w, rows, depth, m0, &mut to[m0 * depth..]);
    }
    for m0 in (full..).step_by(MT).take(tails) {
        panel::<MT>(w, rows, depth, m0, &mut to[m0 * depth..]);
    }
}

impl Work<'_> {
    /// Columns `c0..c0 + n` and rows `k` of the column matrix: where they lie, and the
    /// width of their strip (`NV` vectors, or fewer where that is enough).
    #[inline(always)]
    fn cut<S: Simd, const NV: usize>(&self, c0: usize, n: usize, k: [usize; 2]) -> Cut {
        let g = &self.g;
        let lanes = S::F32_LANES;
        let vectors = match n.div_ceil(lanes) {
            1 if NV > 1 => 1,
            2 if NV > 2 => 2,
            _ => NV,
        };
        let width = vectors * lanes;
        let (image, j0) = (c0 / g.cols, c0 % g.cols);
        debug_assert!(g.images == 1 || g.cols >= width, "a strip spans two images");
        // Columns in this image, and where its rows start.
        let [oy, ox] = [j0 / g.ow, j0 % g.ow];
        let start = image * g.stride + g.skip;
        let (first, base) = (n.min(g.cols - j0), start + oy * g.wq + ox);
        // Row ends crossed: each skips the wide columns (none where `wq == ow`).
        let ends = if g.wq == g.ow { 0 } else { (ox + n - 1) / g.ow };
        let far = base + ends * (g.wq - g.ow) + self.reach + width;
        Cut {
            n,
            width,
            first,
            image,
            base,
            next: start + g.stride,
            ends,
            fits: far <= g.src.len(),
            at: [oy, ox],
            depth: k,
        }
    }

    /// The rows of `cut`, which is not read in place, into strip `slot`: vectors loaded past
    /// each row end crossed and merged where they skip wide columns; else gathered run by
    /// run.
    #[inline(always)]
    fn fill<S: Simd>(&mut self, simd: S, cut: Cut, slot: usize) {
        let [k0, k1] = cut.depth;
        let to = &mut self.strips[slot * self.kc * self.width..][..(k1 - k0) * cut.width];
        let (g, offsets) = (&self.g, &self.g.offsets[k0..k1]);
        if cut.first < cut.n {
            // Two images side by side (1x1 convolutions only: no wide columns).
            let runs = [(cut.base, cut.first), (cut.next, cut.n - cut.first)];
            gather(g.src, offsets, &runs, to);
        } else if cut.fits && cut.ends <= ENDS {
            // Where each row after the first starts in the strip.
            let ends: [usize; ENDS] = std::array::from_fn(|q| (q + 1) * g.ow - cut.at[1]);
            merge_rows(
                simd,
                &g.src[cut.base..],
                offsets,
                &ends[..cut.ends],
                g.wq - g.ow,
                to,
            );
        } else {
            // Rarely: a strip at the source's end, or over rows of a few columns.
            let ox = cut.at[1];
            let runs: Vec<_> = if g.wq == g.ow {
                vec![(cut.base, cut.n)]
            } else {
                (0..=cut.ends)
                    .map(|q| match q {
                        0 => (cut.base, (g.ow - ox).min(cut.n)),
                        _ => (cut.base - ox + q * g.wq, g.ow.min(cut.n + ox - q * g.ow)),
                    })
                    .collect()
            };
            gather(g.src, offsets, &runs, to);
        }
    }

    /// [`Work::panel`] with the vectors of the cut's strip.
    #[inline(always)]
    fn panel_of<S: Simd, const P: usize, const NV: usize>(
        &mut self,
        simd: S,
        cut: Cut,
        slot: usize,
        m0: usize,
    ) {
        match cut.width / S::F32_LANES {
            1 if NV > 1 => self.panel::<S, P, 1>(simd, cut, slot, m0),
            2 if NV > 2 => self.panel::<S, P, 2>(simd, cut, slot, m0),
            _ => self.panel::<S, P, NV>(simd, cut, slot, m0),
        }
    }

    /// Channels `m0..m0 + P` (fewer at the end) of a cut, from strip `slot`: summed onto
    /// their sums of the rows before, then kept for the rows after, or stored.
    #[inline(always)]
    fn panel<S: Simd, const P: usize, const V: usize>(
        &mut self,
        simd: S,
        cut: Cut,
        slot: usize,
        m0: usize,
    ) {
        let g = &mut self.g;
        let (width, depth) = (V * S::F32_LANES, g.offsets.len());
        let Cut {
            n,
            first,
            image,
            at,
            depth: [k0, k1],
            ..
        } = cut;
        let (w, _) = self.packed[m0 * depth + k0 * P..][..(k1 - k0) * P].as_chunks::<P>();
        let kept = &mut self.kept[(slot * self.rows + m0) * self.width..][..P * width];
        let acc = if k0 == 0 {
            [[simd.splat_f32s(0.0); V]; P]
        } else {
            let lanes = |m: usize, v: usize| &kept[(m * V + v) * S::F32_LANES..][..S::F32_LANES];
            std::array::from_fn(|m| {
                std::array::from_fn(|v| {
                    bytemuck::pod_read_unaligned(bytemuck::cast_slice(lanes(m, v)))
                })
            })
        };
        let acc = if cut.direct() {
            let src = &g.src[cut.base..];
            block::<S, P, V, _>(simd, acc, w, &g.offsets[k0..k1], |&at| {
                vectors::<S, V>(&src[at..])
            })
        } else {
            let strip = &self.strips[slot * self.kc * self.width..][..(k1 - k0) * width];
            let (rows, _) = bytemuck::cast_slice::<f32, S::f32s>(strip).as_chunks::<V>();
            block::<S, P, V, _>(simd, acc, w, rows, |&row| row)
        };
        if k1 < depth {
            for (to, acc) in kept.chunks_exact_mut(width).zip(&acc) {
                to.copy_from_slice(bytemuck::cast_slice(acc));
            }
            return;
        }
        // The strip's columns are output positions side by side: whole vectors where they
        // fill the strip within one image.
        let [oy, ox] = at;
        for (m, acc) in acc.iter().enumerate().take(g.rows - m0) {
            let bias = g.bias.map_or(0.0, |b| b[m0 + m]);
            let plane = |i: usize| i * g.rows + m0 + m;
            let at = oy * g.ow + ox;
            if n == width && first == n {
                let out = &mut g.out[plane(image)][at..][..width];
                let out: &mut [S::f32s] = bytemuck::cast_slice_mut(out);
                let bias = simd.splat_f32s(bias);
                for (to, &acc) in out.iter_mut().zip(acc) {
                    *to = simd.add_f32s(acc, bias);
                }
                continue;
            }
            let values: &[f32] = bytemuck::cast_slice(acc);
            let (here, next) = values[..n].split_at(first);
            store(here, bias, &mut g.out[plane(image)][at..]);
            if !next.is_empty() {
                store(next, bias, g.out[plane(image + 1)]);
            }
        }
    }
}

/// Columns `n` of a strip `width` wide, over rows `depth` of the column matrix: the `first`
/// in `image`, from its output position `at` (row, column), whose rows start at `base` in
/// the source; the rest in the next image, whose rows start at `next`. `ends`: output rows'
/// ends crossed where rows have wide columns; `fits`: every row's vectors, past each end,
/// lie within the source.
#[derive(Clone, Copy)]
struct Cut {
    n: usize,
    width: usize,
    first: usize,
    image: usize,
    base: usize,
    next: usize,
    ends: usize,
    fits: bool,
    at: [usize; 2],
    depth: [usize; 2],
}

impl Cut {
    /// Whether its rows are read in place: within the source, in one image, no end crossed.
    fn direct(&self) -> bool {
        self.fits && self.ends == 0 && self.first == self.n
    }
}

/// The most row ends a strip's rows are merged over ([`merge_rows`]): enough for rows of 14
/// columns (a 3x3 convolution over 14x14) in strips of 64.
const ENDS: usize = 5;

/// Rows of `src` past each offset into `to`, each over the ends of output rows: the lanes
/// from `ends[q]` on read `(q + 1) * gap` floats further (past the wide columns). Each vector
/// of a row is loaded once from before the first end and once after each end it crosses,
/// and the loads merged.
#[inline(always)]
fn merge_rows<S: Simd>(
    simd: S,
    src: &[f32],
    offsets: &[usize],
    ends: &[usize],
    gap: usize,
    to: &mut [f32],
) {
    const IOTA: [f32; 64] = {
        let mut iota = [0.0; 64];
        let mut i = 0;
        while i < 64 {
            iota[i] = i as f32;
            i += 1;
        }
        iota
    };
    let lanes = S::F32_LANES;
    let load = |at: usize| vectors::<S, 1>(&src[at..])[0];
    // The lanes of each vector (at most four: 64 floats of AVX-512) past each end.
    let after: [[S::m32s; 4]; ENDS] = std::array::from_fn(|q| {
        let end = simd.splat_f32s(ends.get(q).map_or(f32::MAX, |&e| e as f32));
        std::array::from_fn(|v| {
            let lane = &IOTA[(v * lanes).min(64 - lanes)..][..lanes];
            let lane: S::f32s = bytemuck::pod_read_unaligned(bytemuck::cast_slice(lane));
            simd.greater_than_or_equal_f32s(lane, end)
        })
    });
    let width = to.len() / offsets.len();
    for (&at, row) in offsets.iter().zip(to.chunks_exact_mut(width)) {
        for (v, out) in row.chunks_exact_mut(lanes).enumerate() {
            let first = v * lanes;
            let mut x = load(at + first);
            for (q, &end) in ends.iter().enumerate() {
                if end < first + lanes {
                    x = simd.select_f32s(after[q][v], load(at + first + (q + 1) * gap), x);
                }
            }
            out.copy_from_slice(bytemuck::cast_slice(std::slice::from_ref(&x)));
        }
    }
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

/// One `MR` x `V` vector block: `MR` channels' packed weights times the column matrix's
/// rows (`V` vectors each, one `load`ed from each of `rows`), added to `acc`.
#[inline(always)]
fn block<S: Simd, const MR: usize, const V: usize, R>(
    simd: S,
    mut acc: [[S::f32s; V]; MR],
    w: &[[f32; MR]],
    rows: &[R],
    load: impl Fn(&R) -> [S::f32s; V],
) -> [[S::f32s; V]; MR] {
    #[inline(always)]
    fn step<S: Simd, const MR: usize, const V: usize>(
        simd: S,
        acc: &mut [[S::f32s; V]; MR],
        wk: &[f32; MR],
        b: [S::f32s; V],
    ) {
        for (acc, &w) in acc.iter_mut().zip(wk) {
            let wm = simd.splat_f32s(w);
            for (a, &b) in acc.iter_mut().zip(&b) {
                *a = simd.mul_add_f32s(wm, b, *a);
            }
        }
    }
    // Two steps of the depth a turn of the loop: fewer instructions besides the
    // multiply-adds.
    let (pairs, last) = w.as_chunks::<2>();
    let (row_pairs, row_last) = rows.as_chunks::<2>();
    for (wk, rows) in pairs.iter().zip(row_pairs) {
        step(simd, &mut acc, &wk[0], load(&rows[0]));
        step(simd, &mut acc, &wk[1], load(&rows[1]));
    }
    if let ([wk], [row]) = (last, row_last) {
        step(simd, &mut acc, wk, load(row));
    }
    acc
}

/// The `V` vectors at the front of `src`, wherever it is aligned.
#[inline(always)]
fn vectors<S: Simd, const V: usize>(src: &[f32]) -> [S::f32s; V] {
    let src = &src[..V * S::F32_LANES];
    std::array::from_fn(|v| {
        bytemuck::pod_read_unaligned(bytemuck::cast_slice(
            &src[v * S::F32_LANES..][..S::F32_LANES],
        ))
    })
}

/// Writes `values` plus `bias` to the front of `to`.
#[inline(always)]
fn store(values: &[f32], bias: f32, to: &mut [f32]) {
    let to = &mut to[..values.len()];
    to.iter_mut().zip(values).for_each(|(t, v)| *t = v + bias);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Panels cover every channel and compute no more rows than any cut into panels of 6 and
    /// 4 would; none lies wholly past the channels.
    #[test]
    fn panels_waste_the_fewest_rows() {
        for rows in 0..200 {
            let (full, tails) = panels::<6, 4>(rows);
            let computed = full + tails * 4;
            let fewest = (0..=rows.div_ceil(6))
                .map(|n| n * 6 + (rows.saturating_sub(n * 6)).div_ceil(4) * 4)
                .min()
                .unwrap();
            assert_eq!(computed, fewest, "{rows} channels");
            assert!(computed >= rows && computed < rows + 4, "{rows} channels");
            assert!(full % 6 == 0 && computed <= rows.next_multiple_of(6));
        }
        assert_eq!(panels::<6, 4>(32), (24, 2));
        assert_eq!(panels::<6, 4>(128), (120, 2));
        assert_eq!(panels::<6, 4>(64), (60, 1));
        assert_eq!(panels::<4, 4>(7), (8, 0));
    }
}
