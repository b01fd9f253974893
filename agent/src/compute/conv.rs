//! conv2d over NCHW f32 tensors: forward, and backward for input, weight and bias.
//!
//! Lowered to GEMM per sample and group (im2col; none for 1x1 convolutions with unit stride
//! and no padding, whose input already is the column matrix), multiplied by `faer`'s
//! safe, cache-blocked and SIMD matmul.

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use kernelflow_crds::Conv2dSpec;

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

/// Unfolds one group of one sample into a `[cg*r*s, oh*ow]` row-major column matrix.
fn im2col(p: &Conv2dParams, x: &[f32], col: &mut [f32]) {
    let [oh, ow] = p.output();
    let (kh, kw) = (p.kernel[0], p.kernel[1]);
    let cg = x.len() / (p.height * p.width);
    for c in 0..cg {
        let plane = &x[c * p.height * p.width..(c + 1) * p.height * p.width];
        for ki in 0..kh {
            for kj in 0..kw {
                let row = &mut col[((c * kh + ki) * kw + kj) * oh * ow..][..oh * ow];
                for oy in 0..oh {
                    let iy =
                        (oy * p.stride[0] + ki * p.dilation[0]) as isize - p.padding[0] as isize;
                    let out = &mut row[oy * ow..(oy + 1) * ow];
                    if iy < 0 || iy as usize >= p.height {
                        out.fill(0.0);
                        continue;
                    }
                    let line = &plane[iy as usize * p.width..(iy as usize + 1) * p.width];
                    for (ox, o) in out.iter_mut().enumerate() {
                        let ix = (ox * p.stride[1] + kj * p.dilation[1]) as isize
                            - p.padding[1] as isize;
                        *o = if ix < 0 || ix as usize >= p.width {
                            0.0
                        } else {
                            line[ix as usize]
                        };
                    }
                }
            }
        }
    }
}

/// Folds a column matrix back, accumulating into one group of one sample's gradient.
fn col2im(p: &Conv2dParams, col: &[f32], dx: &mut [f32]) {
    let [oh, ow] = p.output();
    let (kh, kw) = (p.kernel[0], p.kernel[1]);
    let cg = dx.len() / (p.height * p.width);
    for c in 0..cg {
        let plane = &mut dx[c * p.height * p.width..(c + 1) * p.height * p.width];
        for ki in 0..kh {
            for kj in 0..kw {
                let row = &col[((c * kh + ki) * kw + kj) * oh * ow..][..oh * ow];
                for oy in 0..oh {
                    let iy =
                        (oy * p.stride[0] + ki * p.dilation[0]) as isize - p.padding[0] as isize;
                    if iy < 0 || iy as usize >= p.height {
                        continue;
                    }
                    let line = &mut plane[iy as usize * p.width..(iy as usize + 1) * p.width];
                    for (ox, g) in row[oy * ow..(oy + 1) * ow].iter().enumerate() {
                        let ix = (ox * p.stride[1] + kj * p.dilation[1]) as isize
                            - p.padding[1] as isize;
                        if ix >= 0 && (ix as usize) < p.width {
                            line[ix as usize] += g;
                        }
                    }
                }
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

/// `y = conv2d(x, w) + b`, using `par` for the GEMMs.
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
    let mut col = if p.pointwise() {
        Vec::new()
    } else {
        vec![0.0; l.ckk * l.ohw]
    };
    for n in 0..p.batch {
        for g in 0..p.groups {
            let xg = &x[(n * p.in_channels + g * l.cg) * l.hw..][..l.cg * l.hw];
            let cols: &[f32] = if p.pointwise() {
                xg
            } else {
                im2col(p, xg, &mut col);
                &col
            };
            let yg = &mut y[(n * p.out_channels + g * l.kg) * l.ohw..][..l.kg * l.ohw];
            let wg = &w[g * l.kg * l.ckk..][..l.kg * l.ckk];
            matmul(
                rows_mut(yg, l.kg, l.ohw),
                Accum::Replace,
                rows(wg, l.kg, l.ckk),
                rows(cols, l.ckk, l.ohw),
                1.0,
                par,
            );
            if let Some(b) = b {
                for (k, plane) in yg.chunks_exact_mut(l.ohw).enumerate() {
                    let bias = b[g * l.kg + k];
                    plane.iter_mut().for_each(|v| *v += bias);
                }
            }
        }
    }
    Ok(y)
}

/// Gradients of a conv2d given the gradient `dy` of its output.
#[derive(Clone, Debug, PartialEq)]
pub struct Conv2dGrads {
    pub dx: Vec<f32>,
    pub dw: Vec<f32>,
    pub db: Vec<f32>,
}

/// Backward pass: gradients for input, weight and bias.
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
    let mut dx = vec![0.0; x.len()];
    let mut dw = vec![0.0; w.len()];
    let mut db = vec![0.0; p.out_channels];
    let mut col = if p.pointwise() {
        Vec::new()
    } else {
        vec![0.0; l.ckk * l.ohw]
    };
    let mut dcol = if p.pointwise() {
        Vec::new()
    } else {
        vec![0.0; l.ckk * l.ohw]
    };
    for n in 0..p.batch {
        for g in 0..p.groups {
            let xg = &x[(n * p.in_channels + g * l.cg) * l.hw..][..l.cg * l.hw];
            let dyg = &dy[(n * p.out_channels + g * l.kg) * l.ohw..][..l.kg * l.ohw];
            let wg = &w[g * l.kg * l.ckk..][..l.kg * l.ckk];
            for (k, plane) in dyg.chunks_exact(l.ohw).enumerate() {
                db[g * l.kg + k] += plane.iter().sum::<f32>();
            }
            let cols: &[f32] = if p.pointwise() {
                xg
            } else {
                im2col(p, xg, &mut col);
                &col
            };
            // dW_g += dY_g · colsᵀ
            let dwg = &mut dw[g * l.kg * l.ckk..][..l.kg * l.ckk];
            matmul(
                rows_mut(dwg, l.kg, l.ckk),
                Accum::Add,
                rows(dyg, l.kg, l.ohw),
                rows(cols, l.ckk, l.ohw).transpose(),
                1.0,
                par,
            );
            // dcols = W_gᵀ · dY_g, folded back into dX.
            let dxg = &mut dx[(n * p.in_channels + g * l.cg) * l.hw..][..l.cg * l.hw];
            if p.pointwise() {
                matmul(
                    rows_mut(dxg, l.ckk, l.ohw),
                    Accum::Replace,
                    rows(wg, l.kg, l.ckk).transpose(),
                    rows(dyg, l.kg, l.ohw),
                    1.0,
                    par,
                );
            } else {
                matmul(
                    rows_mut(&mut dcol, l.ckk, l.ohw),
                    Accum::Replace,
                    rows(wg, l.kg, l.ckk).transpose(),
                    rows(dyg, l.kg, l.ohw),
                    1.0,
                    par,
                );
                col2im(p, &dcol, dxg);
            }
        }
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
        fn forward_matches_the_reference(p in params(), seed in 0u64..1000, bias in any::<bool>()) {
            let x = random(p.input_len(), seed);
            let w = random(p.weight_len(), seed + 1);
            let b = bias.then(|| random(p.out_channels, seed + 2));
            let fast = forward(&p, &x, &w, b.as_deref(), Par::Seq).unwrap();
            let slow = reference::forward(&p, &x, &w, b.as_deref());
            prop_assert!(max_rel_diff(&fast, &slow) < 1e-5, "{p:?}");
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
