//! The forward pass of 3x3 convolutions with unit stride and dilation by Winograd's minimal
//! filtering F(2x2, 3x3): each 2x2 block of outputs (a tile) comes from a 4x4 patch of the
//! input in 16 products per input channel rather than 36, as in cuDNN's and oneDNN's
//! Winograd algorithms.
//!
//! The filters are transformed once per set of weights (`G g Gᵀ`), each tile's patch per channel
//! (`Bᵀ d B`), and the 16 transformed positions are 16 independent GEMMs over the input
//! channels, run by the same register-tiled kernel as the direct path. `Aᵀ m A` turns each
//! tile's 16 sums back into its 2x2 outputs. The transforms' coefficients are 0, ±1 and ½, so
//! they add rounding of a few additions only (see the tests' tolerance). Tiles go a block at
//! a time, so that the block's transformed inputs and sums stay in L2 between the steps.
//!
//! Every output is the same sequence of operations whatever the thread, the block or the
//! instruction set: the transforms are element-wise over tiles (the compiler vectorises
//! them, without reassociating), and the GEMM's sums are one chain over the channels.

use std::sync::Arc;

use faer::Par;
use pulp::{Simd, WithSimd};

use super::conv::{Conv2dParams, bands, carve, share_out, with_scratch};
use super::gemm::{Gemm, Tile, Weights};
use super::recycle::Bounded;

/// Input and output channels per group from which the products saved pay for the
/// transforms: at 32 (the benchmarks' small shape) this path is 10% faster than the direct one
/// once its filters are prepared ([`Prepared`]), at 64 a third faster.
const MIN_CHANNELS: usize = 32;

/// Floats of a block's transformed inputs (16 per tile and channel): 256 KB, half a Zen 3
/// core's L2, the block's sums taking about as much.
const BLOCK_FLOATS: usize = 64 << 10;

/// The most floats in a vector (AVX-512's 16): every buffer the transforms read or write has
/// that many more, so that a vector past a run's last tile stays within it.
const MAX_LANES: usize = 16;

/// Whether the forward pass of `p` goes through Winograd's F(2x2, 3x3).
pub(super) fn applies(p: &Conv2dParams) -> bool {
    p.kernel == [3, 3]
        && p.stride == [1, 1]
        && p.dilation == [1, 1]
        && p.in_channels / p.groups >= MIN_CHANNELS
        && p.out_channels / p.groups >= MIN_CHANNELS
}

/// `y = conv2d(x, w) + b` (every element of `y` written) on `par.degree()` threads: each
/// sample and group a unit of work, or with fewer of those than threads, a band of its tile
/// rows.
pub(super) fn forward(
    tile: Tile,
    p: &Conv2dParams,
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    y: &mut [f32],
    par: Par,
) {
    let (cg, kg) = (p.in_channels / p.groups, p.out_channels / p.groups);
    let [oh, ow] = p.output();
    let prepared = KEPT_FILTERS.get(tile, p, w);
    let packed = &prepared.packed;
    let shape = Shape::of(p, tile);
    let run = |(t, y0, mut out): (usize, usize, Vec<&mut [f32]>)| {
        let (n, g) = (t / p.groups, t % p.groups);
        let x = &x[(n * p.in_channels + g * cg) * p.height * p.width..][..cg * p.height * p.width];
        let bias = b.map(|b| &b[g * kg..][..kg]);
        let rows = out[0].len() / ow;
        let band = Band {
            ty0: y0 / 2,
            tiles: rows.div_ceil(2) * shape.tw,
            rows,
        };
        // The padded input rows the band's tiles read, per channel.
        let per_channel = (2 * band.tiles / shape.tw + 2) * shape.row;
        with_scratch(|buf| {
            let [input, v, m, room] = carve(
                buf,
                [
                    cg * per_channel + MAX_LANES,
                    16 * cg * shape.stride,
                    16 * kg * shape.block + MAX_LANES,
                    tile.room(Weights::Packed(&packed[g * 16]), kg, cg),
                ],
            );
            shape.prepare(p, x, &band, &mut input[..cg * per_channel]);
            for s in (0..band.tiles).step_by(shape.block) {
                let count = shape.block.min(band.tiles - s);
                tile.dispatch(Inputs {
                    shape: &shape,
                    input,
                    per_channel,
                    cg,
                    s,
                    count,
                    v,
                });
                for xi in 0..16 {
                    let planes = m[xi * kg * shape.block..][..kg * shape.block]
                        .chunks_exact_mut(shape.block)
                        .collect();
                    tile.run(
                        Gemm {
                            w: Weights::Packed(&packed[g * 16 + xi]),
                            src: &v[xi * cg * shape.stride..],
                            offsets: &shape.offsets,
                            skip: 0,
                            cols: count,
                            wq: count,
                            ow: count,
                            images: 1,
                            stride: 0,
                            out: planes,
                            rows: kg,
                            bias: None,
                        },
                        room,
                    );
                }
                tile.dispatch(Outputs {
                    shape: &shape,
                    m,
                    bias,
                    rows: band.rows,
                    s,
                    count,
                    out: &mut out,
                });
            }
        });
    };
    // Bands of whole tile rows (two output rows each).
    let pieces = par.degree().max(1).div_ceil((p.batch * p.groups).max(1));
    share_out(bands(y, kg, oh * ow, ow, pieces, 2), par, run);
}

/// A Winograd op's filters transformed and packed for its GEMMs (per group, per position),
/// kept for later ops on the same weights: a kernel's weights stay the same from op to op,
/// and preparing them runs on the calling thread before the op's threads start, 3% of a
/// 32-channel call on one thread (onnxruntime and oneDNN pack weights once too). Found by the
/// weights' bits, which a copy of them is compared with, never by where they lie.
struct Prepared {
    /// The tile's channels per panel, which sets the packing; groups, output channels, input
    /// channels per group.
    key: [usize; 4],
    weights: Vec<f32>,
    packed: Vec<Vec<f32>>,
}

/// Prepared filters kept, the least recently used first, within bounds on their number and
/// their floats. Filters that would take more than half of those are not kept.
type Kept = Bounded<Arc<Prepared>>;

/// At most 8 sets and 32 MiB: a 256-channel layer's take 1.6 M floats. A training job's
/// weights change every step and miss; the least recently used go first, so a kernel's
/// filters, used op after op, stay.
static KEPT_FILTERS: Kept = Kept::new(8, 8 << 20);

impl Kept {
    /// The filters of `w` for `p`, prepared for `tile`: kept ones, or made (and kept).
    fn get(&self, tile: Tile, p: &Conv2dParams, w: &[f32]) -> Arc<Prepared> {
        let (cg, kg) = (p.in_channels / p.groups, p.out_channels / p.groups);
        // The packing depends on the tile's channels per panel only (its last panels take 4
        // on every instruction set).
        let key = [tile.mr, p.groups, p.out_channels, cg];
        // Weights are compared outside the lock: megabytes for a wide layer.
        let alike: Vec<_> = (self.items().iter())
            .filter(|k| k.key == key)
            .cloned()
            .collect();
        if let Some(kept) = alike.into_iter().find(|k| same_bits(&k.weights, w)) {
            let mut entries = self.items();
            if let Some(i) = entries.iter().position(|k| Arc::ptr_eq(k, &kept)) {
                entries.remove(i);
                entries.push_back(kept.clone());
            }
            return kept;
        }
        let u = filters(p, w);
        let packed = (0..p.groups * 16)
            .map(|i| {
                let (g, xi) = (i / 16, i % 16);
                tile.pack(&u[(xi * p.out_channels + g * kg) * cg..][..kg * cg], kg, cg)
            })
            .collect();
        let made = Arc::new(Prepared {
            key,
            weights: w.to_vec(),
            packed,
        });
        if made.floats() <= self.floats() / 2 {
            self.keep(made.clone(), |k| k.floats());
        }
        made
    }
}

impl Prepared {
    fn floats(&self) -> usize {
        self.weights.len() + self.packed.iter().map(Vec::len).sum::<usize>()
    }
}

/// Whether `a` and `b` hold the same bits (`-0.0` is not `0.0`, and a NaN its own).
fn same_bits(a: &[f32], b: &[f32]) -> bool {
    bytemuck::cast_slice::<f32, u32>(a) == bytemuck::cast_slice::<f32, u32>(b)
}

/// The filters transformed, `G g Gᵀ` for each output and input channel: 16 matrices, one per
/// position of a tile's transform, each `out_channels` x `in_channels / groups` row-major.
fn filters(p: &Conv2dParams, w: &[f32]) -> Vec<f32> {
    let per = p.out_channels * (p.in_channels / p.groups);
    let mut u = vec![0.0; 16 * per];
    // `G` on three values: the first, the halves of their sum and alternating sum, the last.
    let g = |a: [f32; 3]| {
        [
            a[0],
            0.5 * (a[0] + a[1] + a[2]),
            0.5 * (a[0] - a[1] + a[2]),
            a[2],
        ]
    };
    // A chunk of filters at a time, each position's values then copied out together: one
    // store per filter into each of 16 matrices a multiple of 4 KB apart kept evicting the
    // same L1 sets (13% of a 32-channel call).
    const CHUNK: usize = 64;
    for (chunk, fs) in w.chunks(9 * CHUNK).enumerate() {
        let mut local = [[0.0; CHUNK]; 16];
        for (kc, f) in fs.chunks_exact(9).enumerate() {
            let cols: [[f32; 4]; 3] = std::array::from_fn(|j| g([f[j], f[3 + j], f[6 + j]]));
            for i in 0..4 {
                let row = g([cols[0][i], cols[1][i], cols[2][i]]);
                for (j, v) in row.into_iter().enumerate() {
                    local[i * 4 + j][kc] = v;
                }
            }
        }
        let n = fs.len() / 9;
        for (xi, local) in local.iter().enumerate() {
            u[xi * per + chunk * CHUNK..][..n].copy_from_slice(&local[..n]);
        }
    }
    u
}

/// `Bᵀ` on a tile's four values along one axis, tiles side by side.
#[inline(always)]
fn bt<S: Simd>(simd: S, d: [S::f32s; 4]) -> [S::f32s; 4] {
    [
        simd.sub_f32s(d[0], d[2]),
        simd.add_f32s(d[1], d[2]),
        simd.sub_f32s(d[2], d[1]),
        simd.sub_f32s(d[1], d[3]),
    ]
}

/// `Aᵀ` on four sums along one axis, tiles side by side.
#[inline(always)]
fn at<S: Simd>(simd: S, m: [S::f32s; 4]) -> [S::f32s; 2] {
    [
        simd.add_f32s(simd.add_f32s(m[0], m[1]), m[2]),
        simd.sub_f32s(simd.sub_f32s(m[1], m[2]), m[3]),
    ]
}

/// The vector at the front of `from`.
#[inline(always)]
fn load<S: Simd>(from: &[f32]) -> S::f32s {
    bytemuck::pod_read_unaligned(bytemuck::cast_slice(&from[..S::F32_LANES]))
}

/// Output rows `2 * ty0..` (`rows` of them) of one sample and group: `tiles` tiles.
struct Band {
    ty0: usize,
    tiles: usize,
    rows: usize,
}

/// Sizes shared by every unit of work of an op.
struct Shape {
    /// Tiles across, and the output's width.
    tw: usize,
    ow: usize,
    /// Floats of a prepared input row: its even columns, then its odd ones, `tw + 1` each.
    row: usize,
    /// Tiles per block, a whole number of strips, and floats per row of a block's
    /// transformed inputs: a vector past the block's last tile stays in its row.
    block: usize,
    stride: usize,
    /// Where each channel's transformed inputs start in a position's matrix.
    offsets: Vec<usize>,
    padding: [usize; 2],
}

impl Shape {
    fn of(p: &Conv2dParams, tile: Tile) -> Self {
        let [_, ow] = p.output();
        let tw = ow.div_ceil(2);
        let cg = p.in_channels / p.groups;
        let block = (BLOCK_FLOATS / (16 * cg)).max(1).next_multiple_of(tile.nr);
        let stride = block + MAX_LANES;
        Self {
            tw,
            ow,
            row: 2 * (tw + 1),
            block,
            stride,
            offsets: (0..cg).map(|c| c * stride).collect(),
            padding: p.padding,
        }
    }

    /// The padded input rows the band's tiles read, each split into its even and odd
    /// columns: a tile's four columns are then `even[tx], odd[tx], even[tx + 1], odd[tx + 1]`,
    /// side by side for neighbouring tiles.
    fn prepare(&self, p: &Conv2dParams, x: &[f32], band: &Band, to: &mut [f32]) {
        let [ph, pw] = self.padding;
        let rows = to.len() / self.row / (x.len() / (p.height * p.width));
        for (r, row) in to.chunks_exact_mut(self.row).enumerate() {
            row.fill(0.0);
            let (c, y) = (r / rows, 2 * band.ty0 + r % rows);
            let Some(iy) = y.checked_sub(ph).filter(|&iy| iy < p.height) else {
                continue;
            };
            let line = &x[(c * p.height + iy) * p.width..][..p.width];
            let (even, odd) = row.split_at_mut(self.tw + 1);
            // Padded column `2q` into `even[q]`, `2q + 1` into `odd[q]`.
            for (phase, to) in [even, odd].into_iter().enumerate() {
                let q0 = pw.saturating_sub(phase).div_ceil(2);
                let from = line.iter().skip(2 * q0 + phase - pw).step_by(2);
                to[q0..].iter_mut().zip(from).for_each(|(t, v)| *t = *v);
            }
        }
    }

    /// Tiles `s..s + count` of the band, by tile row: `(first tile, tile row, first column,
    /// columns)`.
    fn runs(&self, s: usize, count: usize) -> impl Iterator<Item = (usize, usize, usize, usize)> {
        let tw = self.tw;
        let mut q = s;
        std::iter::from_fn(move || {
            (q < s + count).then(|| {
                let (ty, tx) = (q / tw, q % tw);
                let n = (tw - tx).min(s + count - q);
                q += n;
                (q - n - s, ty, tx, n)
            })
        })
    }
}

/// `Bᵀ d B` of tiles `s..s + count` of every channel's prepared rows `input` into `v`: 16
/// matrices of `cg` rows, one per position, rows `stride` floats apart.
struct Inputs<'a> {
    shape: &'a Shape,
    input: &'a [f32],
    /// Floats of a channel's prepared rows.
    per_channel: usize,
    cg: usize,
    s: usize,
    count: usize,
    v: &'a mut [f32],
}

impl WithSimd for Inputs<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let Self {
            shape,
            input,
            per_channel,
            cg,
            s,
            count,
            v,
        } = self;
        let lanes = S::F32_LANES;
        // Arrays are built element by element: `array::from_fn` and `map` closures are not
        // always inlined here, which took a third of the transforms' time.
        let zero = simd.splat_f32s(0.0);
        for (i0, ty, tx0, n) in shape.runs(s, count) {
            for c in 0..cg {
                let base = c * per_channel + 2 * ty * shape.row + tx0;
                // Whole vectors: lanes past the run hold other tiles' values or garbage, which
                // the next run overwrites, or which lie past the block.
                for l in (0..n).step_by(lanes) {
                    // Each of the tile's four rows across, tiles side by side.
                    let mut across = [[zero; 4]; 4];
                    for (r, across) in across.iter_mut().enumerate() {
                        let (even, odd) = (base + r * shape.row + l, shape.tw + 1);
                        let d = [even, even + odd, even + 1, even + odd + 1];
                        *across = bt(simd, d.map(|at| load::<S>(&input[at..])));
                    }
                    for j in 0..4 {
                        let d = [across[0][j], across[1][j], across[2][j], across[3][j]];
                        for (i, value) in bt(simd, d).into_iter().enumerate() {
                            let to = &mut v[((i * 4 + j) * cg + c) * shape.stride + i0 + l..];
                            to[..lanes].copy_from_slice(bytemuck::cast_slice(&[value]));
                        }
                    }
                }
            }
        }
    }
}

/// `Aᵀ m A`, plus the bias, of tiles `s..s + count` from their sums `m` (16 matrices of `kg`
/// rows of `block` tiles) into the band's output planes `out`.
struct Outputs<'a, 'o> {
    shape: &'a Shape,
    m: &'a [f32],
    bias: Option<&'a [f32]>,
    rows: usize,
    s: usize,
    count: usize,
    out: &'a mut [&'o mut [f32]],
}

impl WithSimd for Outputs<'_, '_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let Self {
            shape,
            m,
            bias,
            rows,
            s,
            count,
            out,
        } = self;
        let (lanes, kg, ow) = (S::F32_LANES, out.len(), shape.ow);
        let zero = simd.splat_f32s(0.0);
        for (k, plane) in out.iter_mut().enumerate() {
            let bias = simd.splat_f32s(bias.map_or(0.0, |b| b[k]));
            for (i0, ty, tx0, n) in shape.runs(s, count) {
                for l in (0..n).step_by(lanes) {
                    let lanes = lanes.min(n - l);
                    let sum = |xi: usize| load::<S>(&m[(xi * kg + k) * shape.block + i0 + l..]);
                    // Each column of the tile's sums down, tiles side by side.
                    let mut down = [[zero; 2]; 4];
                    for (j, down) in down.iter_mut().enumerate() {
                        *down = at(simd, [sum(j), sum(4 + j), sum(8 + j), sum(12 + j)]);
                    }
                    let x0 = 2 * (tx0 + l);
                    for i in 0..2.min(rows - 2 * ty) {
                        let [a, b] = at(simd, [down[0][i], down[1][i], down[2][i], down[3][i]]);
                        let end = ow.min(x0 + 2 * lanes);
                        let line = &mut plane[(2 * ty + i) * ow..][x0..end];
                        interleave::<S>(simd.add_f32s(a, bias), simd.add_f32s(b, bias), line);
                    }
                }
            }
        }
    }
}
/// `a0 b0 a1 b1 ...` into the front of `to`, as much as it takes. (pulp's
/// `interleave_shfl_f32s` orders lanes its own way within AVX halves.)
#[inline(always)]
fn interleave<S: Simd>(a: S::f32s, b: S::f32s, to: &mut [f32]) {
    let (a, b): (&[f32], &[f32]) = (
        bytemuck::cast_slice(std::slice::from_ref(&a)),
        bytemuck::cast_slice(std::slice::from_ref(&b)),
    );
    let mut pairs = [0.0; 32];
    for t in 0..S::F32_LANES {
        pairs[2 * t] = a[t];
        pairs[2 * t + 1] = b[t];
    }
    let pairs = &pairs[..2 * S::F32_LANES];
    // Whole vectors where they fit: a copy of known length is stores, not a `memcpy` call.
    if to.len() == pairs.len() {
        to.copy_from_slice(pairs);
    } else {
        to.copy_from_slice(&pairs[..to.len()]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compute::conv::tests::plain;
    use crate::compute::ops::uniform;

    #[test]
    fn prepared_filters_are_found_by_the_weights_bits_and_the_layout() {
        let (kept, tile) = (Kept::new(8, 1 << 20), Tile::get());
        let p = plain(1, 64, [6, 6], 64, 3);
        let mut w = uniform(p.weight_len(), 1, 0.1);
        w[5] = 0.0;
        let first = kept.get(tile, &p, &w);
        // The same bits elsewhere in memory, for another batch and size: the same filters.
        assert!(Arc::ptr_eq(
            &first,
            &kept.get(tile, &plain(3, 64, [9, 7], 64, 3), &w.clone())
        ));
        // One weight's sign bit apart, though `-0.0 == 0.0`: other filters.
        let mut signed = w.clone();
        signed[5] = -0.0;
        assert!(!Arc::ptr_eq(&first, &kept.get(tile, &p, &signed)));
        // The same weights as two groups of 32 channels: the same output channels and
        // channels per group, another layout.
        let grouped = Conv2dParams {
            groups: 2,
            ..plain(1, 64, [6, 6], 64, 3)
        };
        let narrow = plain(1, 32, [6, 6], 64, 3);
        assert_eq!(grouped.weight_len(), narrow.weight_len());
        let half = &w[..narrow.weight_len()];
        assert!(!Arc::ptr_eq(
            &kept.get(tile, &narrow, half),
            &kept.get(tile, &grouped, half)
        ));
        // Another instruction set's panels (the scalar kernel's, on x86).
        if let Some(other) = Tile::all().into_iter().find(|t| t.mr != tile.mr) {
            assert!(!Arc::ptr_eq(&first, &kept.get(other, &p, &w)));
        }
    }

    #[test]
    fn kept_filters_stay_within_bounds_the_least_recently_used_going_first() {
        let tile = Tile::get();
        let p = plain(1, 32, [6, 6], 32, 3);
        let ws: Vec<_> = (0..4)
            .map(|seed| uniform(p.weight_len(), seed, 0.1))
            .collect();
        let one = Kept::new(3, 1 << 20).get(tile, &p, &ws[0]).floats();
        let kept = Kept::new(3, one * 10);
        let first = kept.get(tile, &p, &ws[0]);
        let second = kept.get(tile, &p, &ws[1]);
        drop(kept.get(tile, &p, &ws[2]));
        assert!(
            Arc::ptr_eq(&first, &kept.get(tile, &p, &ws[0])),
            "used again"
        );
        drop(kept.get(tile, &p, &ws[3]));
        assert_eq!(kept.items().len(), 3);
        assert!(Arc::ptr_eq(&first, &kept.get(tile, &p, &ws[0])), "kept");
        assert!(
            !Arc::ptr_eq(&second, &kept.get(tile, &p, &ws[1])),
            "the least recent went"
        );
        // Filters that would take more than half of the bound are not kept, and push
        // nothing out.
        let before: Vec<_> = kept.items().iter().cloned().collect();
        let wide = plain(1, 32 * 6, [6, 6], 32, 3);
        let big = kept.get(tile, &wide, &uniform(wide.weight_len(), 9, 0.1));
        assert!(big.floats() > one * 5);
        let after: Vec<_> = kept.items().iter().cloned().collect();
        assert!(before.iter().zip(&after).all(|(a, b)| Arc::ptr_eq(a, b)));
        assert_eq!(before.len(), after.len());
    }
}
