//! Winograd's F(2x2, 3x3) for 3x3, stride-1, undilated convolutions (Lavin and Gray, 2015).
//!
//! Each 2x2 block of outputs ("tile") comes from a 4x4 patch of input: transformed, the patch
//! and the 3x3 filter meet in 16 element-wise products instead of 36 multiply-adds, so the 16
//! GEMMs (`K x C` transformed weights by `C x tiles` transformed input, one per point of the
//! 4x4 transform) do 16 multiply-adds per channel pair and tile where direct convolution does
//! 36: 2.25x less arithmetic for the transforms' few additions. The transforms' only
//! constants are 0.5 and 1, so they add a few roundings, not error growth: results stay within
//! the direct scheme's 1e-5 of the reference on the property tests.
//!
//! Work is cut into units of whole tile rows of one sample and group, each computed by one
//! thread in the same order whatever the thread count, so the bits do not depend on it.

use faer::linalg::matmul::matmul;
use faer::{Accum, MatRef, Par};
use rayon::prelude::*;

use super::{Conv2dParams, Layout, carve, rows, rows_mut, with_scratch};

/// Whether `p` is a convolution this scheme computes.
pub(super) fn applies(p: &Conv2dParams) -> bool {
    p.kernel == [3, 3] && p.stride == [1, 1] && p.dilation == [1, 1]
}

/// Floats of transformed input and products that one unit keeps, at most: 8 MiB, a quarter
/// of the L3 cache on the machines measured. Whole samples fit on the benchmark shapes, so
/// the GEMMs are as wide as a sample's tiles.
const UNIT_FLOATS: usize = 1 << 21;

/// `y = conv2d(x, w) + b`; `p` must be one that [`applies`] and checked against the slices.
pub(super) fn forward(
    p: &Conv2dParams,
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    par: Par,
) -> Vec<f32> {
    forward_in(p, x, w, b, par, UNIT_FLOATS)
}

/// [`forward`] with units of at most `budget` floats of scratch (or one tile row).
pub(super) fn forward_in(
    p: &Conv2dParams,
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    par: Par,
    budget: usize,
) -> Vec<f32> {
    let l = Layout::of(p);
    let [oh, ow] = p.output();
    let (th, tw) = (oh.div_ceil(2), ow.div_ceil(2));
    let u = weights(p, w);
    let mut y = vec![0.0; p.output_len()];
    // Tile rows per unit: as many as fit the budget, at least one. The cut depends on the
    // shape alone, never on the thread count.
    let per = (budget / (16 * (l.cg + l.kg) * tw)).clamp(1, th);
    let out_rows = 2 * per * ow;
    // Each unit's share of the output: its rows of each of its group's output planes.
    let mut units: Vec<Unit<'_>> = Vec::new();
    for (ng, planes) in y.chunks_mut(l.kg * l.ohw).enumerate() {
        let mut blocks: Vec<Vec<&mut [f32]>> = (0..th.div_ceil(per)).map(|_| Vec::new()).collect();
        for plane in planes.chunks_mut(l.ohw) {
            for (block, rows) in blocks.iter_mut().zip(plane.chunks_mut(out_rows)) {
                block.push(rows);
            }
        }
        units.extend(blocks.into_iter().enumerate().map(|(i, out)| Unit {
            n: ng / p.groups,
            g: ng % p.groups,
            ty0: i * per,
            tile_rows: (th - i * per).min(per),
            out,
        }));
    }
    let threads = par.degree().max(1);
    let ctx = Ctx {
        p,
        l: &l,
        x,
        u: &u,
        b,
        tw,
        ow,
    };
    if units.len() >= threads {
        // Whole units per thread, in contiguous shares.
        each(&mut units, threads, |_, unit| ctx.run(unit, 1));
    } else {
        // Too few units to go round: each runs its phases on all the threads.
        units.iter_mut().for_each(|unit| ctx.run(unit, threads));
    }
    y
}

/// Tile rows `ty0..ty0 + tile_rows` of sample `n`, group `g`, and their output rows.
struct Unit<'a> {
    n: usize,
    g: usize,
    ty0: usize,
    tile_rows: usize,
    /// The unit's rows of each output plane of the group.
    out: Vec<&'a mut [f32]>,
}

/// What every unit of one call reads.
struct Ctx<'a> {
    p: &'a Conv2dParams,
    l: &'a Layout,
    x: &'a [f32],
    u: &'a [f32],
    b: Option<&'a [f32]>,
    tw: usize,
    ow: usize,
}

impl Ctx<'_> {
    /// One unit: input transform, 16 GEMMs, output transform, each phase split across
    /// `threads` by channel, point or output channel, so every value is computed the same way
    /// whatever the split.
    fn run(&self, unit: &mut Unit<'_>, threads: usize) {
        let (p, l, tw) = (self.p, self.l, self.tw);
        let tiles = unit.tile_rows * tw;
        let xg = &self.x[(unit.n * p.in_channels + unit.g * l.cg) * l.hw..][..l.cg * l.hw];
        with_scratch(|buf| {
            // `v`: per input channel, 16 rows of `tiles`; `m`: per point, `K/groups` rows.
            let [v, m] = carve(buf, [16 * l.cg * tiles, 16 * l.kg * tiles]);
            let mut channels: Vec<&mut [f32]> = v.chunks_mut(16 * tiles).collect();
            each(&mut channels, threads, |c, vc| {
                let plane = &xg[c * l.hw..][..l.hw];
                transform_input(p, plane, unit.ty0, unit.tile_rows, tw, vc);
            });
            drop(channels);
            let v = &*v;
            let mut points: Vec<&mut [f32]> = m.chunks_mut(l.kg * tiles).collect();
            each(&mut points, threads, |xi, mx| {
                let ug = &self.u[(xi * p.out_channels + unit.g * l.kg) * l.cg..];
                let vx = &v[xi * tiles..];
                matmul(
                    rows_mut(mx, l.kg, tiles),
                    Accum::Replace,
                    rows(&ug[..l.kg * l.cg], l.kg, l.cg),
                    MatRef::from_row_major_slice_with_stride(vx, l.cg, tiles, 16 * tiles),
                    1.0,
                    Par::Seq,
                );
            });
            drop(points);
            let m = &*m;
            each(&mut unit.out, threads, |k, plane| {
                let bias = self.b.map_or(0.0, |b| b[unit.g * l.kg + k]);
                transform_output(m, k, l.kg, unit.tile_rows, tw, self.ow, bias, plane);
            });
        });
    }
}

/// `f` on each item with its index, on up to `threads` threads in contiguous shares.
fn each<T: Send>(items: &mut [T], threads: usize, f: impl Fn(usize, &mut T) + Send + Sync) {
    if threads > 1 {
        let share = items.len().div_ceil(threads).max(1);
        items
            .par_iter_mut()
            .with_min_len(share)
            .enumerate()
            .for_each(|(i, item)| f(i, item));
    } else {
        items
            .iter_mut()
            .enumerate()
            .for_each(|(i, item)| f(i, item));
    }
}

/// The filters transformed, `G g Gᵀ`: 16 matrices of `K x C/groups`, the groups' rows in turn.
fn weights(p: &Conv2dParams, w: &[f32]) -> Vec<f32> {
    let cg = p.in_channels / p.groups;
    let mut u = vec![0.0; 16 * p.out_channels * cg];
    let g = |v: [f32; 3]| {
        [
            v[0],
            0.5 * (v[0] + v[1] + v[2]),
            0.5 * (v[0] - v[1] + v[2]),
            v[2],
        ]
    };
    for (kc, f) in w.chunks_exact(9).enumerate() {
        // Columns first, then rows.
        let cols: [[f32; 4]; 3] = std::array::from_fn(|j| g([f[j], f[3 + j], f[6 + j]]));
        for i in 0..4 {
            let row = g([cols[0][i], cols[1][i], cols[2][i]]);
            for (j, value) in row.into_iter().enumerate() {
                u[(i * 4 + j) * p.out_channels * cg + kc] = value;
            }
        }
    }
    u
}

/// `Bᵀ d B` of the 4x4 input patch of each tile in tile rows `ty0..ty0 + tile_rows` of one
/// input channel's `plane`, into `v`: 16 rows (one per point) of `tile_rows * tw` tiles.
///
/// A tile row at a time: its four input rows, zero-padded and split into even and odd
/// columns (tile `tx` reads columns `2tx..2tx + 4`: even `tx, tx + 1`, odd `tx, tx + 1`),
/// then `Bᵀ` down and `B` across as whole-row arithmetic on contiguous slices, which the
/// compiler vectorises.
fn transform_input(
    p: &Conv2dParams,
    plane: &[f32],
    ty0: usize,
    tile_rows: usize,
    tw: usize,
    v: &mut [f32],
) {
    let half = tw + 1;
    let tiles = tile_rows * tw;
    // Four input rows, then `Bᵀ d`'s four rows; each as its even columns then its odd ones.
    let mut rows = vec![0.0f32; 18 * half];
    let (padded, rows) = rows.split_at_mut(2 * half);
    let (input, down) = rows.split_at_mut(8 * half);
    // Padded column `q` is input column `q - pad`.
    let pad = p.padding[1];
    let copied = p.width.min((2 * half).saturating_sub(pad));
    for tyl in 0..tile_rows {
        for (i, row) in input.chunks_exact_mut(2 * half).enumerate() {
            let r = (2 * (ty0 + tyl) + i).checked_sub(p.padding[0]);
            padded.fill(0.0);
            if let Some(r) = r.filter(|&r| r < p.height) {
                padded[pad..pad + copied].copy_from_slice(&plane[r * p.width..][..copied]);
            }
            let (even, odd) = row.split_at_mut(half);
            for ((e, o), pair) in even
                .iter_mut()
                .zip(odd.iter_mut())
                .zip(padded.chunks_exact(2))
            {
                *e = pair[0];
                *o = pair[1];
            }
        }
        let [d0, d1, d2, d3] = split4(input);
        for (q, out) in down.chunks_exact_mut(2 * half).enumerate() {
            let it = out.iter_mut().zip(d0.iter().zip(d1).zip(d2.iter().zip(d3)));
            for (o, ((a, b), (c, d))) in it {
                *o = match q {
                    0 => a - c,
                    1 => b + c,
                    2 => c - b,
                    _ => b - d,
                };
            }
        }
        for (i, t) in down.chunks_exact(2 * half).enumerate() {
            let (even, odd) = t.split_at(half);
            let (e0, e1, o0, o1) = (&even[..tw], &even[1..], &odd[..tw], &odd[1..]);
            let at = |j: usize| (i * 4 + j) * tiles + tyl * tw;
            let (row0, rest) = v[at(0)..].split_at_mut(tiles);
            let (row1, rest) = rest.split_at_mut(tiles);
            let (row2, row3) = rest.split_at_mut(tiles);
            for (o, (a, b)) in row0[..tw].iter_mut().zip(e0.iter().zip(e1)) {
                *o = a - b;
            }
            for (o, (a, b)) in row1[..tw].iter_mut().zip(o0.iter().zip(e1)) {
                *o = a + b;
            }
            for (o, (a, b)) in row2[..tw].iter_mut().zip(e1.iter().zip(o0)) {
                *o = a - b;
            }
            for (o, (a, b)) in row3[..tw].iter_mut().zip(o0.iter().zip(o1)) {
                *o = a - b;
            }
        }
    }
}

/// The four equal rows of `rows`.
fn split4(rows: &[f32]) -> [&[f32]; 4] {
    let n = rows.len() / 4;
    let (a, rest) = rows.split_at(n);
    let (b, rest) = rest.split_at(n);
    let (c, d) = rest.split_at(n);
    [a, b, c, d]
}

/// `Aᵀ m A` of output channel `k`'s products for each tile, plus `bias`, into `plane`: the
/// unit's rows of that channel's output plane, `ow` wide (a last odd row or column of tiles
/// falls outside it). `m` holds 16 matrices (one per point) of `kg` rows of `tile_rows * tw`.
#[allow(clippy::too_many_arguments)]
fn transform_output(
    m: &[f32],
    k: usize,
    kg: usize,
    tile_rows: usize,
    tw: usize,
    ow: usize,
    bias: f32,
    plane: &mut [f32],
) {
    let tiles = tile_rows * tw;
    let rows = plane.len() / ow;
    // `Aᵀ m`: its two rows, each of four point columns of `tw`.
    let mut across = vec![0.0f32; 8 * tw];
    let mut pair = vec![0.0f32; 2 * tw];
    for tyl in 0..tile_rows {
        let point = |i: usize, j: usize| &m[((i * 4 + j) * kg + k) * tiles + tyl * tw..][..tw];
        let (top, bottom) = across.split_at_mut(4 * tw);
        for (j, (t, b)) in top
            .chunks_exact_mut(tw)
            .zip(bottom.chunks_exact_mut(tw))
            .enumerate()
        {
            let (m0, m1, m2, m3) = (point(0, j), point(1, j), point(2, j), point(3, j));
            let it = t
                .iter_mut()
                .zip(b.iter_mut())
                .zip(m0.iter().zip(m1).zip(m2.iter().zip(m3)));
            for ((t, b), ((m0, m1), (m2, m3))) in it {
                *t = m0 + m1 + m2;
                *b = m1 - m2 - m3;
            }
        }
        for (r, a) in across.chunks_exact(4 * tw).enumerate() {
            let row = 2 * tyl + r;
            if row >= rows {
                continue;
            }
            let [a0, a1, a2, a3] = split4(a);
            // Then `· A`: each tile's two outputs, side by side.
            let (left, right) = pair.split_at_mut(tw);
            let it = left.iter_mut().zip(right.iter_mut());
            for ((lo, hi), ((a0, a1), (a2, a3))) in it.zip(a0.iter().zip(a1).zip(a2.iter().zip(a3)))
            {
                *lo = a0 + a1 + a2 + bias;
                *hi = a1 - a2 - a3 + bias;
            }
            let out = &mut plane[row * ow..][..ow];
            for (o, (lo, hi)) in out.chunks_mut(2).zip(left.iter().zip(right.iter())) {
                o[0] = *lo;
                if let Some(o1) = o.get_mut(1) {
                    *o1 = *hi;
                }
            }
        }
    }
}
