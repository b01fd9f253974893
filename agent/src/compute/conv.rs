//! conv2d over NCHW f32 tensors: forward, and backward for input, weight and bias.
//!
//! Lowered to GEMM per sample and group (im2col; none for 1x1 convolutions with unit stride
//! and no padding, whose input already is the column matrix), multiplied by `faer`'s
//! safe, cache-blocked and SIMD matmul.

use std::cell::Cell;
use std::ops::Range;

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use kernelflow_crds::Conv2dSpec;
use rayon::prelude::*;

use super::ComputeError;

/// Shape and parameters of one conv2d over a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Conv2dParams {
    pub batch: usize,
    pub in_channels: usize,
    pub height: usize,
    pub width: usize,
    pub out_channels: usize,
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    pub padding: [usize; 2],
    pub dilation: [usize; 2],
    pub groups: usize,
}

impl Conv2dParams {
    /// Parameters of `spec` over a batch of `batch` inputs of `[height, width]`.
    pub fn from_spec(
        spec: &Conv2dSpec,
        batch: usize,
        input: [u32; 2],
    ) -> Result<Self, ComputeError> {
        let u = |v: u32| v as usize;
        let p = Self {
            batch,
            in_channels: u(spec.in_channels),
            height: u(input[0]),
            width: u(input[1]),
            out_channels: u(spec.out_channels),
            kernel: spec.kernel_size.map(u),
            stride: spec.stride.map(u),
            padding: spec.padding.map(u),
            dilation: spec.dilation.map(u),
            groups: u(spec.groups),
        };
        p.check()?;
        Ok(p)
    }

    /// Rejects parameters for which no output exists.
    pub fn check(&self) -> Result<(), ComputeError> {
        let bad = |why: &str| Err(ComputeError::Shape(format!("{why}: {self:?}")));
        if self.groups == 0
            || !self.in_channels.is_multiple_of(self.groups)
            || !self.out_channels.is_multiple_of(self.groups)
        {
            return bad("groups must divide both channel counts");
        }
        if self.kernel.contains(&0) || self.stride.contains(&0) || self.dilation.contains(&0) {
            return bad("kernel, stride and dilation must be at least 1");
        }
        for i in 0..2 {
            let extent = [self.height, self.width][i] + 2 * self.padding[i];
            if extent < self.dilation[i] * (self.kernel[i] - 1) + 1 {
                return bad("the kernel does not fit the padded input");
            }
        }
        Ok(())
    }

    /// Output height and width.
    pub fn output(&self) -> [usize; 2] {
        let dim = |i: usize, n: usize| {
            (n + 2 * self.padding[i] - self.dilation[i] * (self.kernel[i] - 1) - 1) / self.stride[i]
                + 1
        };
        [dim(0, self.height), dim(1, self.width)]
    }

    pub fn input_len(&self) -> usize {
        self.batch * self.in_channels * self.height * self.width
    }
    pub fn weight_len(&self) -> usize {
        self.out_channels * self.in_channels / self.groups * self.kernel[0] * self.kernel[1]
    }
    pub fn output_len(&self) -> usize {
        let [oh, ow] = self.output();
        self.batch * self.out_channels * oh * ow
    }

    /// Floating-point operations of one forward pass (2 per multiply-accumulate).
    pub fn flops(&self) -> f64 {
        let [oh, ow] = self.output();
        2.0 * (self.batch * self.out_channels * oh * ow) as f64
            * (self.in_channels / self.groups * self.kernel[0] * self.kernel[1]) as f64
    }

    fn pointwise(&self) -> bool {
        self.kernel == [1, 1] && self.stride == [1, 1] && self.padding == [0, 0]
    }

    fn check_lens(&self, x: usize, w: usize, b: Option<usize>) -> Result<(), ComputeError> {
        let want = (self.input_len(), self.weight_len(), self.out_channels);
        if x != want.0 || w != want.1 || b.is_some_and(|b| b != want.2) {
            return Err(ComputeError::Shape(format!(
                "buffers of {x}, {w} and {b:?} elements for input, weight and bias; {self:?} needs {}, {} and {}",
                want.0, want.1, want.2
            )));
        }
        Ok(())
    }
}

/// The output columns `o` of one kernel tap whose input column `o * stride + offset - pad`
/// lies inside `[0, extent)`: everything outside reads padding.
fn inside(outputs: usize, extent: usize, stride: usize, offset: usize, pad: usize) -> Range<usize> {
    let lo = pad.saturating_sub(offset).div_ceil(stride);
    let hi = if extent + pad > offset {
        ((extent - 1 + pad - offset) / stride + 1).min(outputs)
    } else {
        0
    };
    lo.min(hi)..hi
}

/// Unfolds channels of one sample into a `[c*r*s, oh*ow]` row-major column matrix: each row
/// is one kernel tap of one channel, copied a line at a time (a plain copy at stride 1).
fn im2col(p: &Conv2dParams, x: &[f32], col: &mut [f32]) {
    let [oh, ow] = p.output();
    let (kh, kw) = (p.kernel[0], p.kernel[1]);
    let (sy, sx) = (p.stride[0], p.stride[1]);
    let (hw, w) = (p.height * p.width, p.width);
    for (plane, taps) in x
        .chunks_exact(hw)
        .zip(col.chunks_exact_mut(kh * kw * oh * ow))
    {
        for (tap, row) in taps.chunks_exact_mut(oh * ow).enumerate() {
            let (ki, kj) = (tap / kw, tap % kw);
            let (dy, dx) = (ki * p.dilation[0], kj * p.dilation[1]);
            let rows = inside(oh, p.height, sy, dy, p.padding[0]);
            let cols = inside(ow, w, sx, dx, p.padding[1]);
            if cols.is_empty() {
                row.fill(0.0);
                continue;
            }
            let ix0 = cols.start * sx + dx - p.padding[1];
            for (oy, out) in row.chunks_exact_mut(ow).enumerate() {
                if !rows.contains(&oy) {
                    out.fill(0.0);
                    continue;
                }
                let iy = oy * sy + dy - p.padding[0];
                let line = &plane[iy * w..][..w];
                out[..cols.start].fill(0.0);
                out[cols.end..].fill(0.0);
                let out = &mut out[cols.clone()];
                if sx == 1 {
                    out.copy_from_slice(&line[ix0..][..out.len()]);
                } else {
                    out.iter_mut()
                        .zip(line[ix0..].iter().step_by(sx))
                        .for_each(|(o, v)| *o = *v);
                }
            }
        }
    }
}

/// Folds a column matrix back, accumulating into channels of one sample's gradient.
fn col2im(p: &Conv2dParams, col: &[f32], dx: &mut [f32]) {
    let [oh, ow] = p.output();
    let (kh, kw) = (p.kernel[0], p.kernel[1]);
    let (sy, sx) = (p.stride[0], p.stride[1]);
    let (hw, w) = (p.height * p.width, p.width);
    for (plane, taps) in dx
        .chunks_exact_mut(hw)
        .zip(col.chunks_exact(kh * kw * oh * ow))
    {
        for (tap, row) in taps.chunks_exact(oh * ow).enumerate() {
            let (ki, kj) = (tap / kw, tap % kw);
            let (dy, dxo) = (ki * p.dilation[0], kj * p.dilation[1]);
            let rows = inside(oh, p.height, sy, dy, p.padding[0]);
            let cols = inside(ow, w, sx, dxo, p.padding[1]);
            if cols.is_empty() {
                continue;
            }
            let ix0 = cols.start * sx + dxo - p.padding[1];
            for oy in rows {
                let iy = oy * sy + dy - p.padding[0];
                let line = &mut plane[iy * w..][..w];
                let g = &row[oy * ow..][cols.clone()];
                line[ix0..]
                    .iter_mut()
                    .step_by(sx)
                    .zip(g)
                    .for_each(|(v, g)| *v += g);
            }
        }
    }
}

fn rows<'a>(s: &'a [f32], r: usize, c: usize) -> MatRef<'a, f32> {
    MatRef::from_row_major_slice(s, r, c)
}

fn rows_mut<'a>(s: &'a mut [f32], r: usize, c: usize) -> MatMut<'a, f32> {
    MatMut::from_row_major_slice_mut(s, r, c)
}

/// Per-sample, per-group slices and sizes.
struct Layout {
    cg: usize,
    kg: usize,
    ckk: usize,
    hw: usize,
    ohw: usize,
}

impl Layout {
    fn of(p: &Conv2dParams) -> Self {
        let [oh, ow] = p.output();
        let cg = p.in_channels / p.groups;
        Self {
            cg,
            kg: p.out_channels / p.groups,
            ckk: cg * p.kernel[0] * p.kernel[1],
            hw: p.height * p.width,
            ohw: oh * ow,
        }
    }
}

/// `y = conv2d(x, w) + b` on `par.degree()` threads.
///
/// One GEMM per sample and group. With at least as many of them as threads, each thread
/// takes a contiguous share and runs it sequentially, unfolding included, which keeps every
/// core busy without synchronising inside small GEMMs; with fewer, the unfolding and the GEMM
/// are split instead. Either way each output element is the same sum in the same order.
pub fn forward(
    p: &Conv2dParams,
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    par: Par,
) -> Result<Vec<f32>, ComputeError> {
    p.check()?;
    p.check_lens(x.len(), w.len(), b.map(<[f32]>::len))?;
    let l = Layout::of(p);
    let mut y = vec![0.0; p.output_len()];
    let tasks = p.batch * p.groups;
    let threads = par.degree().max(1);
    let (shares, inner) = if tasks >= threads {
        (threads, Par::Seq)
    } else {
        (1, par)
    };
    let per = tasks.div_ceil(shares);
    let share = |(i, ys): (usize, &mut [f32])| {
        with_scratch(|col| {
            for (t, yg) in ys.chunks_exact_mut(l.kg * l.ohw).enumerate() {
                let (n, g) = ((i * per + t) / p.groups, (i * per + t) % p.groups);
                let xg = &x[(n * p.in_channels + g * l.cg) * l.hw..][..l.cg * l.hw];
                let cols: &[f32] = if p.pointwise() {
                    xg
                } else {
                    col.resize(l.ckk * l.ohw, 0.0);
                    unfold(p, xg, col, inner);
                    col
                };
                matmul(
                    rows_mut(yg, l.kg, l.ohw),
                    Accum::Replace,
                    rows(&w[g * l.kg * l.ckk..][..l.kg * l.ckk], l.kg, l.ckk),
                    rows(cols, l.ckk, l.ohw),
                    1.0,
                    inner,
                );
                if let Some(b) = b {
                    for (plane, bias) in yg.chunks_exact_mut(l.ohw).zip(&b[g * l.kg..]) {
                        plane.iter_mut().for_each(|v| *v += bias);
                    }
                }
            }
        });
    };
    let chunk = (per * l.kg * l.ohw).max(1);
    if shares > 1 {
        y.par_chunks_mut(chunk).enumerate().for_each(share);
    } else {
        y.chunks_mut(chunk).enumerate().for_each(share);
    }
    Ok(y)
}

/// [`im2col`] split over channels on `par.degree()` threads.
fn unfold(p: &Conv2dParams, x: &[f32], col: &mut [f32], par: Par) {
    let threads = par.degree().max(1);
    let channels = x.len() / (p.height * p.width);
    if threads == 1 || channels < 2 {
        return im2col(p, x, col);
    }
    let per = channels.div_ceil(threads);
    let (xs, cs) = (per * p.height * p.width, per * col.len() / channels);
    x.par_chunks(xs)
        .zip(col.par_chunks_mut(cs))
        .for_each(|(x, col)| im2col(p, x, col));
}

thread_local! {
    /// Column matrices are large (megabytes) and their size repeats from call to call: each
    /// thread keeps its last one rather than faulting fresh pages in every time.
    static SCRATCH: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// Runs `f` with this thread's scratch buffer. Taken, not borrowed, so that a nested call
/// (rayon runs other tasks while a thread waits) gets a fresh one instead of a conflict.
fn with_scratch<T>(f: impl FnOnce(&mut Vec<f32>) -> T) -> T {
    let mut buf = SCRATCH.take();
    let out = f(&mut buf);
    SCRATCH.set(buf);
    out
}

/// Gradients of a conv2d given the gradient `dy` of its output.
#[derive(Clone, Debug, PartialEq)]
pub struct Conv2dGrads {
    pub dx: Vec<f32>,
    pub dw: Vec<f32>,
    pub db: Vec<f32>,
}

/// Backward pass: gradients for input, weight and bias, on `par.degree()` threads.
///
/// Shared out by sample like [`forward`]: each thread writes its samples' `dx` and sums its
/// own partial `dw` and `db`, which are then added in thread order. So the bits depend on
/// the thread count (not on scheduling): the same op with the same threads is reproducible.
pub fn backward(
    p: &Conv2dParams,
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    par: Par,
) -> Result<Conv2dGrads, ComputeError> {
    p.check()?;
    p.check_lens(x.len(), w.len(), None)?;
    if dy.len() != p.output_len() {
        return Err(ComputeError::Shape(format!(
            "output gradient of {} elements; {p:?} needs {}",
            dy.len(),
            p.output_len()
        )));
    }
    let l = Layout::of(p);
    let threads = par.degree().max(1);
    let (shares, inner) = if p.batch >= threads {
        (threads, Par::Seq)
    } else {
        (1, par)
    };
    let per = p.batch.div_ceil(shares);
    let share = |(i, dxs): (usize, &mut [f32])| {
        let mut dw = vec![0.0; w.len()];
        let mut db = vec![0.0; p.out_channels];
        with_scratch(|buf| {
            buf.resize(if p.pointwise() { 0 } else { 2 * l.ckk * l.ohw }, 0.0);
            let half = buf.len() / 2;
            let (col, dcol) = buf.split_at_mut(half);
            for (t, dxn) in dxs.chunks_exact_mut(p.in_channels * l.hw).enumerate() {
                let n = i * per + t;
                for g in 0..p.groups {
                    let xg = &x[(n * p.in_channels + g * l.cg) * l.hw..][..l.cg * l.hw];
                    let dyg = &dy[(n * p.out_channels + g * l.kg) * l.ohw..][..l.kg * l.ohw];
                    let wg = &w[g * l.kg * l.ckk..][..l.kg * l.ckk];
                    for (plane, db) in dyg.chunks_exact(l.ohw).zip(&mut db[g * l.kg..]) {
                        *db += plane.iter().sum::<f32>();
                    }
                    let cols: &[f32] = if p.pointwise() {
                        xg
                    } else {
                        unfold(p, xg, col, inner);
                        col
                    };
                    // dW_g += dY_g · colsᵀ
                    matmul(
                        rows_mut(&mut dw[g * l.kg * l.ckk..][..l.kg * l.ckk], l.kg, l.ckk),
                        Accum::Add,
                        rows(dyg, l.kg, l.ohw),
                        rows(cols, l.ckk, l.ohw).transpose(),
                        1.0,
                        inner,
                    );
                    // dcols = W_gᵀ · dY_g, folded back into dX (the input itself when 1x1).
                    let dxg = &mut dxn[g * l.cg * l.hw..][..l.cg * l.hw];
                    let target = if p.pointwise() { &mut *dxg } else { &mut *dcol };
                    matmul(
                        rows_mut(target, l.ckk, l.ohw),
                        Accum::Replace,
                        rows(wg, l.kg, l.ckk).transpose(),
                        rows(dyg, l.kg, l.ohw),
                        1.0,
                        inner,
                    );
                    if !p.pointwise() {
                        col2im(p, dcol, dxg);
                    }
                }
            }
        });
        (dw, db)
    };
    let mut dx = vec![0.0; x.len()];
    // At least 1: an empty batch (or no channels) has no chunks, never a chunk of 0.
    let chunk = (per * p.in_channels * l.hw).max(1);
    let partials: Vec<(Vec<f32>, Vec<f32>)> = if shares > 1 {
        dx.par_chunks_mut(chunk).enumerate().map(share).collect()
    } else {
        dx.chunks_mut(chunk).enumerate().map(share).collect()
    };
    let mut partials = partials.into_iter();
    let (mut dw, mut db) = partials
        .next()
        .unwrap_or_else(|| (vec![0.0; w.len()], vec![0.0; p.out_channels]));
    for (pw, pb) in partials {
        dw.iter_mut().zip(pw).for_each(|(a, b)| *a += b);
        db.iter_mut().zip(pb).for_each(|(a, b)| *a += b);
    }
    Ok(Conv2dGrads { dx, dw, db })
}

#[cfg(test)]
pub(crate) mod reference {
    //! Plain loops, straight from the definition, to check the fast paths against.
    use super::Conv2dParams;

    pub fn forward(p: &Conv2dParams, x: &[f32], w: &[f32], b: Option<&[f32]>) -> Vec<f32> {
        let [oh, ow] = p.output();
        let (cg, kg) = (p.in_channels / p.groups, p.out_channels / p.groups);
        let mut y = vec![0.0f32; p.output_len()];
        for n in 0..p.batch {
            for k in 0..p.out_channels {
                let g = k / kg;
                for oy in 0..oh {
                    for ox in 0..ow {
                        let mut acc = b.map_or(0.0, |b| f64::from(b[k]));
                        for c in 0..cg {
                            for ki in 0..p.kernel[0] {
                                for kj in 0..p.kernel[1] {
                                    let iy = (oy * p.stride[0] + ki * p.dilation[0]) as isize
                                        - p.padding[0] as isize;
                                    let ix = (ox * p.stride[1] + kj * p.dilation[1]) as isize
                                        - p.padding[1] as isize;
                                    if iy < 0
                                        || ix < 0
                                        || iy as usize >= p.height
                                        || ix as usize >= p.width
                                    {
                                        continue;
                                    }
                                    let xi = ((n * p.in_channels + g * cg + c) * p.height
                                        + iy as usize)
                                        * p.width
                                        + ix as usize;
                                    let wi = ((k * cg + c) * p.kernel[0] + ki) * p.kernel[1] + kj;
                                    acc += f64::from(x[xi]) * f64::from(w[wi]);
                                }
                            }
                        }
                        y[((n * p.out_channels + k) * oh + oy) * ow + ox] = acc as f32;
                    }
                }
            }
        }
        y
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Stride 1, no padding, no dilation, one group; tests adjust with struct update.
    pub(crate) fn plain(
        batch: usize,
        c: usize,
        hw: [usize; 2],
        k: usize,
        kernel: usize,
    ) -> Conv2dParams {
        Conv2dParams {
            batch,
            in_channels: c,
            height: hw[0],
            width: hw[1],
            out_channels: k,
            kernel: [kernel, kernel],
            stride: [1, 1],
            padding: [0, 0],
            dilation: [1, 1],
            groups: 1,
        }
    }

    fn random(len: usize, seed: u64) -> Vec<f32> {
        super::super::ops::uniform(len, seed, 1.0)
    }

    fn params() -> impl Strategy<Value = Conv2dParams> {
        (
            1usize..3,
            1usize..4,
            1usize..4,
            1usize..4,
            1usize..4,
            1usize..3,
            0usize..3,
            1usize..3,
            3usize..10,
            3usize..10,
        )
            .prop_map(
                |(batch, g, cpg, kpg, kh, stride, pad, dil, h, w)| Conv2dParams {
                    batch,
                    in_channels: g * cpg,
                    height: h,
                    width: w,
                    out_channels: g * kpg,
                    kernel: [kh, (kh % 3) + 1],
                    stride: [stride, 1],
                    padding: [pad, pad.min(1)],
                    dilation: [dil, 1],
                    groups: g,
                },
            )
            .prop_filter("an output exists", |p| p.check().is_ok())
    }

    /// Largest absolute difference, relative to the output's magnitude.
    fn max_rel_diff(a: &[f32], b: &[f32]) -> f32 {
        let scale = b.iter().fold(1.0f32, |m, v| m.max(v.abs()));
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
            / scale
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        /// f32 sums of at most a few hundred products of values in [-1, 1] differ from the
        /// f64 reference by rounding only: well under 1e-5 of the output's magnitude.
        #[test]
        ///
        /// Any thread count gives the same bits as one: the synchronous path and the streams
        /// must agree exactly for the same op.
        fn forward_matches_the_reference(
            p in params(), seed in 0u64..1000, bias in any::<bool>(), threads in 2usize..=3,
        ) {
            let x = random(p.input_len(), seed);
            let w = random(p.weight_len(), seed + 1);
            let b = bias.then(|| random(p.out_channels, seed + 2));
            let fast = forward(&p, &x, &w, b.as_deref(), Par::Seq).unwrap();
            let slow = reference::forward(&p, &x, &w, b.as_deref());
            prop_assert!(max_rel_diff(&fast, &slow) < 1e-5, "{p:?}");
            let parallel = forward(&p, &x, &w, b.as_deref(), Par::rayon(threads)).unwrap();
            prop_assert_eq!(parallel, fast, "{:?} on {} threads", p, threads);
        }
    }

    /// Large enough for the GEMM and the unfolding to be split across threads (one sample)
    /// or shared out by sample (three): forward keeps the bits of one thread, and so does
    /// the input gradient.
    #[test]
    fn large_convolutions_give_the_same_bits_on_any_thread_count() {
        for batch in [1, 3] {
            let p = Conv2dParams {
                padding: [1, 1],
                ..plain(batch, 48, [40, 40], 64, 3)
            };
            let (x, w) = (random(p.input_len(), 1), random(p.weight_len(), 2));
            let one = forward(&p, &x, &w, None, Par::Seq).unwrap();
            let dy = random(p.output_len(), 3);
            let grads = backward(&p, &x, &w, &dy, Par::Seq).unwrap();
            for threads in [2, 4] {
                let many = forward(&p, &x, &w, None, Par::rayon(threads)).unwrap();
                assert!(many == one, "batch {batch}, {threads} threads");
                // Partial weight gradients are summed per thread, then added: rounding only.
                let shared = backward(&p, &x, &w, &dy, Par::rayon(threads)).unwrap();
                assert_eq!(shared.dx, grads.dx, "batch {batch}, {threads} threads");
                assert!(max_rel_diff(&shared.dw, &grads.dw) < 1e-5);
                assert!(max_rel_diff(&shared.db, &grads.db) < 1e-5);
            }
        }
    }

    /// No samples: empty outputs and zero gradients of the right sizes, not a panic.
    #[test]
    fn an_empty_batch_has_empty_outputs() {
        let p = plain(0, 2, [5, 5], 3, 3);
        let w = random(p.weight_len(), 1);
        for par in [Par::Seq, Par::rayon(2)] {
            assert!(forward(&p, &[], &w, None, par).unwrap().is_empty());
            let g = backward(&p, &[], &w, &[], par).unwrap();
            assert_eq!(
                (g.dx.len(), g.dw, g.db),
                (0, vec![0.0; w.len()], vec![0.0; 3])
            );
        }
    }

    /// Central finite differences of `L = sum(y * r)` for a random `r` (so `dy = r`), in f64
    /// through the reference forward. Step 1e-2 on a function that is linear in each input
    /// makes the difference exact up to f32 rounding of `y`; tolerance 1e-3 relative.
    fn check_gradients(p: Conv2dParams) {
        let x = random(p.input_len(), 11);
        let w = random(p.weight_len(), 12);
        let b = random(p.out_channels, 13);
        let r = random(p.output_len(), 14);
        let loss = |x: &[f32], w: &[f32], b: &[f32]| -> f64 {
            reference::forward(&p, x, w, Some(b))
                .iter()
                .zip(&r)
                .map(|(y, r)| f64::from(*y) * f64::from(*r))
                .sum()
        };
        let grads = backward(&p, &x, &w, &r, Par::Seq).unwrap();
        let h = 1e-2f32;
        let numeric = |which: usize, i: usize| {
            let at = |delta: f32| {
                let mut args = [x.clone(), w.clone(), b.clone()];
                args[which][i] += delta;
                loss(&args[0], &args[1], &args[2])
            };
            ((at(h) - at(-h)) / (2.0 * f64::from(h))) as f32
        };
        for (which, analytic) in [&grads.dx, &grads.dw, &grads.db].into_iter().enumerate() {
            for (i, a) in analytic.iter().enumerate() {
                let n = numeric(which, i);
                assert!(
                    (a - n).abs() <= 1e-3 * (1.0 + n.abs()),
                    "{p:?}: grad {which}[{i}] analytic {a} numeric {n}"
                );
            }
        }
    }

    #[test]
    fn backward_matches_finite_differences() {
        let base = Conv2dParams {
            padding: [1, 1],
            ..plain(2, 4, [6, 5], 6, 3)
        };
        check_gradients(base);
        check_gradients(Conv2dParams {
            stride: [2, 1],
            padding: [0, 2],
            ..base
        });
        check_gradients(Conv2dParams {
            dilation: [2, 2],
            padding: [2, 1],
            ..base
        });
        check_gradients(Conv2dParams { groups: 2, ..base });
        check_gradients(Conv2dParams {
            kernel: [1, 1],
            padding: [0, 0],
            ..base
        });
    }

    #[test]
    fn pointwise_convolutions_skip_im2col_and_agree() {
        let p = Conv2dParams {
            groups: 2,
            ..plain(2, 8, [5, 5], 4, 1)
        };
        assert!(p.pointwise());
        let (x, w) = (random(p.input_len(), 1), random(p.weight_len(), 2));
        let fast = forward(&p, &x, &w, None, Par::Seq).unwrap();
        assert!(max_rel_diff(&fast, &reference::forward(&p, &x, &w, None)) < 1e-5);
    }

    #[test]
    fn wrong_buffer_sizes_are_typed_errors() {
        let p = plain(1, 2, [4, 4], 2, 3);
        let err = forward(&p, &[0.0; 3], &[0.0; 36], None, Par::Seq).unwrap_err();
        assert!(matches!(err, ComputeError::Shape(_)), "{err}");
        let err = forward(
            &Conv2dParams { height: 1, ..p },
            &[0.0; 8],
            &[0.0; 36],
            None,
            Par::Seq,
        )
        .unwrap_err();
        assert!(err.to_string().contains("does not fit"), "{err}");
    }
}
