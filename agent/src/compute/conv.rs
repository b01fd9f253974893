//! conv2d over NCHW f32 tensors: forward, and backward for input, weight and bias.
//!
//! Lowered to one GEMM per sample and group: the forward pass and the input gradient through
//! the register-tiled kernel of [`super::gemm`], the weight gradient through `faer`'s
//! cache-blocked matmul. 1x1
//! convolutions with unit stride and no padding need no lowering: the input already is the
//! column matrix. Every other one goes through [`Phases`]: the padded input split by stride
//! phase, so that each row of the column matrix is a single contiguous copy rather than a
//! gather per output line.

use std::cell::Cell;
use std::sync::Mutex;

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use kernelflow_crds::Conv2dSpec;
use rayon::prelude::*;

use super::gemm::{Gemm, Tile, Weights};
use super::winograd;
use super::{ComputeError, lock};

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
        // Padding alone would otherwise give an empty input an output.
        if [self.in_channels, self.out_channels, self.height, self.width].contains(&0) {
            return bad("channels, height and width must be at least 1");
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

/// The padded input of one sample's channels split into `sy * sx` phase planes by stride
/// (plane `(py, px)` holds padded rows `py, py + sy, ...` and columns `px, px + sx, ...`),
/// each `hq` x `wq`.
///
/// Output `(oy, ox)` of kernel tap `(ki, kj)` reads padded `(oy*sy + ki*dh, ox*sx + kj*dw)`,
/// which is row `oy + ki*dh/sy`, column `ox + kj*dw/sx` of one phase plane. Computing the
/// output `wq` columns wide (the columns past `ow` are discarded) makes a tap's inputs over
/// the whole output one run of `oh * wq` floats in that plane. The forward GEMM gathers the
/// column matrix's rows from there, skipping the wide columns; the backward passes build it
/// from `c*r*s` copies and fold it back with as many additions, where the wide columns cost
/// `(wq - ow) / ow` more GEMM work: about 2% on a 56-wide 3x3 layer, 4% on a 28-wide one.
#[derive(Clone, Copy)]
struct Phases {
    stride: [usize; 2],
    hq: usize,
    wq: usize,
    /// `oh * wq`: the wide output's length, a column matrix row's.
    wide: usize,
    /// Zeros after the last plane: a tap's run may pass its plane's end by `kj*dw/sx`
    /// (into wide columns only).
    slack: usize,
}

impl Phases {
    fn of(p: &Conv2dParams) -> Self {
        let [sy, sx] = p.stride;
        let (pw, reach) = (p.padding[1], p.dilation[1] * (p.kernel[1] - 1));
        let (hp, wp) = (p.height + 2 * p.padding[0], p.width + 2 * pw);
        // With unit stride across, a row's right padding can be the next row's left: a tap
        // reading past `wq` lands there, in zeros. That keeps `wq >= ow` while the padding is
        // at most the kernel's reach, and halves the wide columns of a "same" convolution.
        let wq = if sx == 1 && pw <= reach {
            p.width + pw
        } else {
            wp.div_ceil(sx)
        };
        let hq = hp.div_ceil(sy);
        Self {
            stride: p.stride,
            hq,
            wq,
            wide: p.output()[0] * wq,
            slack: (p.kernel[1] - 1) * p.dilation[1] / sx,
        }
    }

    /// Floats of the planes of `channels` channels.
    fn len(&self, channels: usize) -> usize {
        channels * self.stride[0] * self.stride[1] * self.hq * self.wq + self.slack
    }

    /// Where padded position `(y, x)` of channel `c` lies.
    fn at(&self, c: usize, y: usize, x: usize) -> usize {
        let [sy, sx] = self.stride;
        ((c * sy + y % sy) * sx + x % sx) * self.hq * self.wq + (y / sy) * self.wq + x / sx
    }

    /// Where the run of tap `(c, ki, kj)` starts.
    fn tap(&self, p: &Conv2dParams, c: usize, ki: usize, kj: usize) -> usize {
        self.at(c, ki * p.dilation[0], kj * p.dilation[1])
    }

    /// For input row `iy` of channel `c`, one run per column phase: where in the planes its
    /// first input column `ix0` lands; the slots after it hold `ix0 + sx, ix0 + 2*sx, ...`.
    fn runs(&self, p: &Conv2dParams, c: usize, iy: usize) -> impl Iterator<Item = (usize, usize)> {
        let (sx, pw) = (self.stride[1], p.padding[1]);
        (0..sx)
            .map(move |px| (px + sx - pw % sx) % sx)
            .filter(move |&ix0| ix0 < p.width)
            .map(move |ix0| (self.at(c, iy + p.padding[0], ix0 + pw), ix0))
    }

    /// Whether output rows `y0..y0 + band` read row `q` of a plane: the rows of their taps,
    /// and one past, where a row's right padding is the next row's left (the next plane's
    /// first row, past the last). Splitting only these spares each of several bands of a
    /// sample the whole sample's planes.
    fn read(&self, p: &Conv2dParams, y0: usize, band: usize) -> impl Fn(usize) -> bool {
        let [sy, dy] = [p.stride[0], p.dilation[0]];
        let last = ((y0 + band - 1) * sy + (p.kernel[0] - 1) * dy) / sy + 1;
        let hq = self.hq;
        move |q| (y0..=last).contains(&q) || (last >= hq && q == 0)
    }

    /// Writes channels `x` (unpadded, `h*w` each) into the rows of every plane that `keep`
    /// keeps (by index in its plane), zeros around their input, and zeros past the last
    /// plane. The other rows are left as they were.
    fn split(&self, p: &Conv2dParams, x: &[f32], planes: &mut [f32], keep: impl Fn(usize) -> bool) {
        let [sy, sx] = self.stride;
        let (plane_len, channels) = (self.hq * self.wq, x.len() / (p.height * p.width));
        let (body, past) = planes.split_at_mut(channels * sy * sx * plane_len);
        past.fill(0.0);
        for plane in body.chunks_exact_mut(plane_len) {
            let rows = plane.chunks_exact_mut(self.wq).enumerate();
            rows.filter(|(q, _)| keep(*q))
                .for_each(|(_, row)| row.fill(0.0));
        }
        for (c, plane) in x.chunks_exact(p.height * p.width).enumerate() {
            for (iy, line) in plane.chunks_exact(p.width).enumerate() {
                if !keep((iy + p.padding[0]) / sy) {
                    continue;
                }
                for (at, ix0) in self.runs(p, c, iy) {
                    if sx == 1 {
                        planes[at..][..p.width].copy_from_slice(line);
                        continue;
                    }
                    let from = &line[ix0..];
                    let to = &mut planes[at..][..from.len().div_ceil(sx)];
                    if sx == 2 {
                        // A fixed stride, which the compiler vectorises.
                        let (pairs, last) = from.as_chunks::<2>();
                        to.iter_mut().zip(pairs).for_each(|(d, v)| *d = v[0]);
                        if let Some(v) = last.first() {
                            to[pairs.len()] = *v;
                        }
                        continue;
                    }
                    to.iter_mut()
                        .zip(from.iter().step_by(sx))
                        .for_each(|(d, v)| *d = *v);
                }
            }
        }
    }

    /// Adds the planes' unpadded positions into channels `dx`.
    fn merge(&self, p: &Conv2dParams, planes: &[f32], dx: &mut [f32]) {
        let sx = self.stride[1];
        for (c, plane) in dx.chunks_exact_mut(p.height * p.width).enumerate() {
            for (iy, line) in plane.chunks_exact_mut(p.width).enumerate() {
                for (at, ix0) in self.runs(p, c, iy) {
                    let to = line[ix0..].iter_mut().step_by(sx);
                    to.zip(&planes[at..]).for_each(|(d, v)| *d += v);
                }
            }
        }
    }

    /// The column matrix of channels `c0..` (`col` holds whole channels' rows) from
    /// `planes`.
    fn unfold(&self, p: &Conv2dParams, planes: &[f32], c0: usize, col: &mut [f32]) {
        let [kh, kw] = p.kernel;
        for (r, row) in col.chunks_exact_mut(self.wide).enumerate() {
            let (c, ki, kj) = (c0 + r / (kh * kw), r / kw % kh, r % kw);
            row.copy_from_slice(&planes[self.tap(p, c, ki, kj)..][..self.wide]);
        }
    }

    /// Adds each row of the column matrix `col` into its run in `planes`.
    fn fold(&self, p: &Conv2dParams, col: &[f32], planes: &mut [f32]) {
        let [kh, kw] = p.kernel;
        for (r, row) in col.chunks_exact(self.wide).enumerate() {
            let (c, ki, kj) = (r / (kh * kw), r / kw % kh, r % kw);
            planes[self.tap(p, c, ki, kj)..][..self.wide]
                .iter_mut()
                .zip(row)
                .for_each(|(v, g)| *v += g);
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

/// `y = conv2d(x, w) + b` on `par.degree()` threads, through the register-tiled [`gemm`].
///
/// The work is one GEMM per sample and group. With at least as many of them as threads,
/// threads take whole ones (lowering included), which keeps every core busy without
/// synchronising inside small GEMMs; with fewer, each one's output rows are split into bands
/// among threads, each lowering the input for itself. Either way each output element is the
/// same sum in the same order.
///
/// The output goes into `y`. When `y` holds the output's length already (a buffer from
/// [`super::recycle`]), its memory is overwritten, every element, without being zeroed first.
pub fn forward_into(
    p: &Conv2dParams,
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    y: &mut Vec<f32>,
    par: Par,
) -> Result<(), ComputeError> {
    forward_on(Tile::get(), p, x, w, b, y, par)
}

/// [`forward_into`] with the kernel of `tile`'s instruction set.
fn forward_on(
    tile: Tile,
    p: &Conv2dParams,
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    y: &mut Vec<f32>,
    par: Par,
) -> Result<(), ComputeError> {
    p.check()?;
    p.check_lens(x.len(), w.len(), b.map(<[f32]>::len))?;
    let (l, ph) = (Layout::of(p), Phases::of(p));
    let [_, ow] = p.output();
    // Where each row of the column matrix starts: in the input for a 1x1 convolution, else
    // in the stride-phase planes, whose layout computes `wq` columns per output row.
    let (offsets, wq): (Vec<usize>, _) = if p.pointwise() {
        ((0..l.ckk).map(|r| r * l.hw).collect(), ow)
    } else {
        let [kh, kw] = p.kernel;
        let tap = |r: usize| ph.tap(p, r / (kh * kw), r / kw % kh, r % kw);
        ((0..l.ckk).map(tap).collect(), ph.wq)
    };
    let threads = par.degree().max(1);
    let tasks = p.batch * p.groups;
    // Safe code writes no uninitialised memory: a fresh output is zeroed, then overwritten.
    // A large one is zeroed on the op's threads, not first on this one: 26 MB for a batch of
    // 8 ResNet stems would spend a tenth of the call in one thread's memset. A small one is
    // not worth waking the threads twice.
    if y.len() != p.output_len() {
        y.clear();
        if threads > 1 && p.output_len() >= 1 << 16 {
            // Pieces of at least a thread's share: no more pieces than threads.
            let zeros = rayon::iter::repeat_n(0.0, p.output_len());
            y.par_extend(zeros.with_min_len(p.output_len() / threads));
        } else {
            y.resize(p.output_len(), 0.0);
        }
    }
    if winograd::applies(p) {
        winograd::forward(tile, p, x, w, b, y, par);
        return Ok(());
    }
    // Units of work: (first task, images, first output row, their output planes). A 1x1
    // convolution's samples go to the kernel several at a time, side by side, when each is at
    // least a strip wide. With fewer tasks than threads, each task's output rows are split
    // into bands, one per thread: each band's strips are gathered once for all channels.
    let side_by_side = p.pointwise() && p.groups == 1 && l.ohw >= tile.nr;
    let units: Vec<_> = if side_by_side && tasks >= threads {
        let per = tasks.div_ceil(threads);
        let chunks = y.chunks_mut(per * l.kg * l.ohw).enumerate();
        chunks
            .map(|(i, out)| {
                (
                    i * per,
                    out.len() / (l.kg * l.ohw),
                    0,
                    out.chunks_mut(l.ohw).collect(),
                )
            })
            .collect()
    } else {
        let bands = bands(y, l.kg, l.ohw, ow, threads.div_ceil(tasks.max(1)), 1);
        bands
            .into_iter()
            .map(|(t, y0, out)| (t, 1, y0, out))
            .collect()
    };
    let run = |(t, images, y0, out): (usize, usize, usize, Vec<&mut [f32]>)| {
        let (n, g) = (t / p.groups, t % p.groups);
        let xg = &x[(n * p.in_channels + g * l.cg) * l.hw..];
        let w = Weights::Rows(&w[g * l.kg * l.ckk..][..l.kg * l.ckk]);
        let bias = b.map(|b| &b[g * l.kg..][..l.kg]);
        let band = out[0].len() / ow;
        with_scratch(|buf| {
            // Room after the planes, so that every row of a strip lies within them.
            let planes = if p.pointwise() {
                0
            } else {
                ph.len(l.cg) + tile.nr
            };
            let [planes, room] = carve(buf, [planes, tile.room(w, l.kg, l.ckk)]);
            let src = if p.pointwise() {
                xg
            } else {
                ph.split(p, &xg[..l.cg * l.hw], planes, ph.read(p, y0, band));
                planes
            };
            let offsets = &offsets;
            tile.run(
                Gemm {
                    w,
                    src,
                    offsets,
                    skip: y0 * wq,
                    cols: band * ow,
                    wq,
                    ow,
                    images,
                    stride: p.in_channels * l.hw,
                    out,
                    rows: l.kg,
                    bias,
                },
                room,
            );
        });
    };
    share_out(units, par, run);
    Ok(())
}

/// `out = wt · dy`: `wt` is a group's transposed weights (`c*r*s` x `kg`), `dy` its output
/// gradient (`kg` rows of `cols`), `out` `c*r*s` rows of `cols`; the rows split among
/// `par`'s threads.
fn transposed(tile: Tile, wt: &[f32], dy: &[f32], cols: usize, out: &mut [f32], par: Par) {
    let (rows, depth) = (out.len() / cols, dy.len() / cols);
    if rows == 0 || depth == 0 {
        return out.fill(0.0);
    }
    let offsets: Vec<usize> = (0..depth).map(|k| k * cols).collect();
    let per = rows
        .div_ceil(par.degree().max(1))
        .next_multiple_of(tile.mr)
        .max(1);
    let run = |(i, out): (usize, &mut [f32])| {
        with_scratch(|buf| {
            let rows = out.len() / cols;
            let w = Weights::Rows(&wt[i * per * depth..][..rows * depth]);
            let [room] = carve(buf, [tile.room(w, rows, depth)]);
            tile.run(
                Gemm {
                    w,
                    src: dy,
                    offsets: &offsets,
                    skip: 0,
                    cols,
                    wq: cols,
                    ow: cols,
                    images: 1,
                    stride: 0,
                    rows,
                    out: out.chunks_mut(cols).collect(),
                    bias: None,
                },
                room,
            )
        })
    };
    if per < rows {
        out.par_chunks_mut(per * cols).enumerate().for_each(run);
    } else {
        run((0, out));
    }
}

/// Each task's `planes` output planes (`plane` floats each, in rows of `ow`) cut into at most
/// `pieces` bands of equal height, a whole number of `step` rows each: (task, first row, the
/// band of each plane).
pub(super) fn bands(
    y: &mut [f32],
    planes: usize,
    plane: usize,
    ow: usize,
    pieces: usize,
    step: usize,
) -> Vec<(usize, usize, Vec<&mut [f32]>)> {
    let steps = (plane / ow).div_ceil(step);
    let height = step * steps.div_ceil(pieces.clamp(1, steps.max(1)));
    let tasks = y.chunks_mut(planes * plane).enumerate();
    tasks
        .flat_map(|(t, yt)| {
            let mut units: Vec<_> = (0..plane / ow)
                .step_by(height)
                .map(|y0| (t, y0, Vec::with_capacity(planes)))
                .collect();
            for plane in yt.chunks_mut(plane) {
                let bands = plane.chunks_mut(height * ow);
                units
                    .iter_mut()
                    .zip(bands)
                    .for_each(|(u, band)| u.2.push(band));
            }
            units
        })
        .collect()
}

/// Runs `f` on every item on at most `par.degree()` threads at once (rayon's pool has a
/// thread per core, and an op uses no more cores than it was given). Each thread takes the
/// next item when it is done with its last, rather than a fixed share: on a busy host, one
/// slowed core then does less instead of holding up the whole op.
pub(super) fn share_out<T: Send>(items: Vec<T>, par: Par, f: impl Fn(T) + Sync) {
    let threads = par.degree().max(1).min(items.len());
    if threads > 1 {
        let queue = Mutex::new(items.into_iter());
        let next = || lock(&queue).next();
        (0..threads).into_par_iter().for_each(|_| {
            while let Some(item) = next() {
                f(item);
            }
        });
    } else {
        items.into_iter().for_each(f);
    }
}

/// How `tasks` independent GEMMs use `par`: shared out whole among threads when there are
/// enough of them (each then sequential), else one at a time, each split across threads.
fn split_work(tasks: usize, par: Par) -> (usize, Par) {
    let threads = par.degree().max(1);
    if tasks >= threads {
        (threads, Par::Seq)
    } else {
        (1, par)
    }
}

/// The column matrix of a sample's channels from their planes, split by channel across
/// `par.degree()` threads.
fn unfold(ph: &Phases, p: &Conv2dParams, planes: &[f32], col: &mut [f32], par: Par) {
    let threads = par.degree().max(1);
    let taps = p.kernel[0] * p.kernel[1] * ph.wide;
    let channels = col.len() / taps;
    if threads == 1 || channels < 2 {
        return ph.unfold(p, planes, 0, col);
    }
    let per = channels.div_ceil(threads);
    col.par_chunks_mut(per * taps)
        .enumerate()
        .for_each(|(i, col)| ph.unfold(p, planes, i * per, col));
}

/// Splits the front of `buf` (grown as needed) into slices of `sizes`.
pub(super) fn carve<const N: usize>(buf: &mut Vec<f32>, sizes: [usize; N]) -> [&mut [f32]; N] {
    buf.resize(sizes.iter().sum(), 0.0);
    let mut rest = buf.as_mut_slice();
    sizes.map(|n| {
        let (part, tail) = std::mem::take(&mut rest).split_at_mut(n);
        rest = tail;
        part
    })
}

thread_local! {
    /// Lowering buffers are large (megabytes) and their size repeats from call to call: each
    /// thread keeps its last one rather than faulting fresh pages in every time.
    static SCRATCH: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// Runs `f` with this thread's scratch buffer. Taken, not borrowed, so that a nested call
/// (rayon runs other tasks while a thread waits) gets a fresh one instead of a conflict.
pub(super) fn with_scratch<T>(f: impl FnOnce(&mut Vec<f32>) -> T) -> T {
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
/// Shared out by sample like [`forward_into`]: each thread writes its samples' `dx` and sums its
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
    let (l, ph) = (Layout::of(p), Phases::of(p));
    let ow = p.output()[1];
    let (shares, inner) = split_work(p.batch, par);
    let per = p.batch.div_ceil(shares);
    // Each group's weights transposed, `ckk` x `kg`, for the input gradient's GEMM.
    let tile = Tile::get();
    let mut wt = vec![0.0; w.len()];
    for (wg, tg) in w
        .chunks_exact(l.kg * l.ckk)
        .zip(wt.chunks_exact_mut(l.kg * l.ckk))
    {
        for (k, row) in wg.chunks_exact(l.ckk).enumerate() {
            row.iter()
                .enumerate()
                .for_each(|(r, v)| tg[r * l.kg + k] = *v);
        }
    }
    let share = |(i, dxs): (usize, &mut [f32])| {
        let mut dw = vec![0.0; w.len()];
        let mut db = vec![0.0; p.out_channels];
        with_scratch(|buf| {
            let sizes = if p.pointwise() {
                [0; 4]
            } else {
                let col = l.ckk * ph.wide;
                [ph.len(l.cg), col, col, l.kg * ph.wide]
            };
            let [planes, col, dcol, dyw] = carve(buf, sizes);
            for (t, dxn) in dxs.chunks_exact_mut(p.in_channels * l.hw).enumerate() {
                let n = i * per + t;
                for g in 0..p.groups {
                    let xg = &x[(n * p.in_channels + g * l.cg) * l.hw..][..l.cg * l.hw];
                    let dyg = &dy[(n * p.out_channels + g * l.kg) * l.ohw..][..l.kg * l.ohw];
                    let dwg = rows_mut(&mut dw[g * l.kg * l.ckk..][..l.kg * l.ckk], l.kg, l.ckk);
                    let dxg = &mut dxn[g * l.cg * l.hw..][..l.cg * l.hw];
                    for (plane, db) in dyg.chunks_exact(l.ohw).zip(&mut db[g * l.kg..]) {
                        *db += plane.iter().sum::<f32>();
                    }
                    if p.pointwise() {
                        // dW_g += dY_g · Xᵀ; dX_g = W_gᵀ · dY_g
                        let (xs, dys) = (rows(xg, l.ckk, l.ohw), rows(dyg, l.kg, l.ohw));
                        matmul(dwg, Accum::Add, dys, xs.transpose(), 1.0, inner);
                        transposed(
                            tile,
                            &wt[g * l.kg * l.ckk..][..l.kg * l.ckk],
                            dyg,
                            l.ohw,
                            dxg,
                            inner,
                        );
                        continue;
                    }
                    ph.split(p, xg, planes, |_| true);
                    unfold(&ph, p, planes, col, inner);
                    // dY_g as wide as the columns, zero past `ow`: the wide columns are no
                    // outputs and must add nothing.
                    for (dk, wk) in dyg.chunks_exact(l.ohw).zip(dyw.chunks_exact_mut(ph.wide)) {
                        for (line, run) in dk.chunks_exact(ow).zip(wk.chunks_exact_mut(ph.wq)) {
                            run[..ow].copy_from_slice(line);
                            run[ow..].fill(0.0);
                        }
                    }
                    let (cols, dys) = (rows(col, l.ckk, ph.wide), rows(dyw, l.kg, ph.wide));
                    // dW_g += dY_g · colsᵀ; dcols = W_gᵀ · dY_g, folded back into dX_g.
                    matmul(dwg, Accum::Add, dys, cols.transpose(), 1.0, inner);
                    transposed(
                        tile,
                        &wt[g * l.kg * l.ckk..][..l.kg * l.ckk],
                        dyw,
                        ph.wide,
                        dcol,
                        inner,
                    );
                    planes.fill(0.0);
                    ph.fold(p, dcol, planes);
                    ph.merge(p, planes, dxg);
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

    /// [`forward_into`] a fresh output.
    fn forward(
        p: &Conv2dParams,
        x: &[f32],
        w: &[f32],
        b: Option<&[f32]>,
        par: Par,
    ) -> Result<Vec<f32>, ComputeError> {
        let mut y = Vec::new();
        forward_into(p, x, w, b, &mut y, par)?;
        Ok(y)
    }

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

    /// Random input, weights and bias for `p`, and the reference's output for them.
    fn with_bias(p: &Conv2dParams) -> ([Vec<f32>; 3], Vec<f32>) {
        let (x, w) = (random(p.input_len(), 1), random(p.weight_len(), 2));
        let b = random(p.out_channels, 3);
        let want = reference::forward(p, &x, &w, Some(&b));
        ([x, w, b], want)
    }

    fn params() -> impl Strategy<Value = Conv2dParams> {
        let axis = || (1usize..4, 0usize..3, 1usize..3); // stride, padding, dilation
        (
            (1usize..3, 1usize..4, 1usize..4, 1usize..4),
            (1usize..4, 1usize..4),
            (axis(), axis()),
            (3usize..10, 3usize..10),
        )
            .prop_map(
                |((batch, g, cpg, kpg), (kh, kw), ((sy, py, dy), (sx, px, dx)), (h, w))| {
                    Conv2dParams {
                        batch,
                        in_channels: g * cpg,
                        height: h,
                        width: w,
                        out_channels: g * kpg,
                        kernel: [kh, kw],
                        stride: [sy, sx],
                        padding: [py, px],
                        dilation: [dy, dx],
                        groups: g,
                    }
                },
            )
            .prop_filter("an output exists", |p| p.check().is_ok())
    }

    /// Largest absolute difference, relative to the output's magnitude; NaN if any
    /// difference is (`f32::max` would drop it).
    fn max_rel_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len(), "outputs of different lengths");
        let scale = b.iter().fold(1.0f32, |m, v| m.max(v.abs()));
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, |m: f32, d| if m.is_nan() || d <= m { m } else { d })
            / scale
    }

    /// Forward on one thread within `1e-5` of the f64 reference, and on `threads` threads
    /// the same bits: the synchronous path and the streams must agree exactly for the same op.
    fn forward_agrees(
        p: &Conv2dParams,
        seed: u64,
        bias: bool,
        threads: usize,
    ) -> Result<(), TestCaseError> {
        let x = random(p.input_len(), seed);
        let w = random(p.weight_len(), seed + 1);
        let b = bias.then(|| random(p.out_channels, seed + 2));
        let fast = forward(p, &x, &w, b.as_deref(), Par::Seq).unwrap();
        let slow = reference::forward(p, &x, &w, b.as_deref());
        prop_assert!(max_rel_diff(&fast, &slow) < 1e-5, "{p:?}");
        // Into a reused buffer, whose old contents (NaN) must not show through.
        let mut parallel = vec![f32::NAN; p.output_len()];
        forward_into(p, &x, &w, b.as_deref(), &mut parallel, Par::rayon(threads)).unwrap();
        prop_assert_eq!(parallel, fast, "{:?} on {} threads", p, threads);
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        /// f32 sums of at most a few hundred products of values in [-1, 1] differ from the
        /// f64 reference by rounding only: well under 1e-5 of the output's magnitude.
        #[test]
        fn forward_matches_the_reference(
            p in params(), seed in 0u64..1000, bias in any::<bool>(), threads in 2usize..=3,
        ) {
            forward_agrees(&p, seed, bias, threads)?;
        }

    }

    /// 3x3 convolutions with unit stride and dilation and enough channels for Winograd's
    /// F(2x2, 3x3): any padding, odd and even sizes (tiles past the output's edge), groups.
    fn winograd_params() -> impl Strategy<Value = Conv2dParams> {
        (
            1usize..3,
            1usize..3,
            32usize..68,
            32usize..68,
            1usize..9,
            1usize..9,
            0usize..3,
        )
            .prop_map(|(batch, groups, cg, kg, h, w, pad)| Conv2dParams {
                padding: [pad, (pad + 1) % 3],
                groups,
                ..plain(batch, groups * cg, [h, w], groups * kg, 3)
            })
            .prop_filter("an output exists", |p| p.check().is_ok())
    }

    /// Winograd's filters are prepared once for the weights they are given: an op on weights
    /// changed in place, at the same address, must not run on the filters of the old ones.
    #[test]
    fn weights_changed_in_place_are_prepared_anew() {
        let p = Conv2dParams {
            padding: [1, 1],
            ..plain(1, 32, [8, 8], 32, 3)
        };
        assert!(winograd::applies(&p));
        let x = random(p.input_len(), 1);
        let mut w = random(p.weight_len(), 2);
        for step in 0..3 {
            let y = forward(&p, &x, &w, None, Par::rayon(2)).unwrap();
            let want = reference::forward(&p, &x, &w, None);
            assert!(max_rel_diff(&y, &want) < 1e-5, "step {step}");
            w.iter_mut().step_by(7).for_each(|v| *v *= 1.5);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(12))]
        /// The transforms add the rounding of a few additions per product and per sum (their
        /// coefficients are 0, ±1 and ½): still well within 1e-5 of the output's magnitude
        /// over 600 channels' products.
        #[test]
        fn winograd_matches_the_reference(
            p in winograd_params(), seed in 0u64..1000, bias in any::<bool>(), threads in 2usize..=3,
        ) {
            prop_assert!(winograd::applies(&p));
            forward_agrees(&p, seed, bias, threads)?;
        }
    }

    fn dot(a: &[f32], b: &[f32]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(a, b)| f64::from(*a) * f64::from(*b))
            .sum()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        /// conv2d is linear in `x` and in `w`, so its gradients are the adjoints:
        /// `<dx, x> = <y, dy> = <dw, w>` for `y = conv2d(x, w)`. That pins every index of the
        /// backward pass on every stride, padding, dilation and group mix; the sums differ by
        /// f32 rounding of a few hundred products only (1e-4 relative, with an absolute floor
        /// for sums that cancel).
        #[test]
        fn gradients_are_the_adjoints(p in params(), seed in 0u64..1000, threads in 1usize..=2) {
            let (x, w) = (random(p.input_len(), seed), random(p.weight_len(), seed + 1));
            let dy = random(p.output_len(), seed + 2);
            let y = forward(&p, &x, &w, None, Par::Seq).unwrap();
            let g = backward(&p, &x, &w, &dy, Par::rayon(threads)).unwrap();
            let want = dot(&y, &dy);
            let tol = 1e-4 * (1.0 + want.abs() + dot(&y, &y).sqrt());
            prop_assert!((dot(&g.dx, &x) - want).abs() < tol, "dx of {:?}", p);
            prop_assert!((dot(&g.dw, &w) - want).abs() < tol, "dw of {:?}", p);
            let per_channel = |k: usize| -> f32 {
                dy.chunks_exact(p.output()[0] * p.output()[1])
                    .skip(k)
                    .step_by(p.out_channels)
                    .flatten()
                    .sum()
            };
            for (k, db) in g.db.iter().enumerate() {
                prop_assert!((db - per_channel(k)).abs() < 1e-4 * (1.0 + db.abs()));
            }
        }
    }

    /// Large enough for the GEMM and the unfolding to be split across threads (one sample)
    /// or shared out by sample (three), for 3x3 and 5x5 filters: forward keeps the bits of
    /// one thread, and so does the input gradient.
    #[test]
    fn large_convolutions_give_the_same_bits_on_any_thread_count() {
        for (batch, r) in [(1, 3), (3, 3), (1, 5), (3, 5)] {
            // The 3x3 ones through Winograd's transforms.
            let p = Conv2dParams {
                padding: [r / 2, r / 2],
                ..plain(batch, 64, [40, 40], 64, r)
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

    #[test]
    fn work_is_shared_out_on_no_more_threads_than_given() {
        use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(8)
            .build()
            .unwrap();
        for threads in [1, 2, 3] {
            let (active, most, done) = (
                AtomicUsize::new(0),
                AtomicUsize::new(0),
                AtomicUsize::new(0),
            );
            pool.install(|| {
                share_out((0..8).collect(), Par::rayon(threads), |_: u8| {
                    most.fetch_max(active.fetch_add(1, SeqCst) + 1, SeqCst);
                    std::thread::sleep(std::time::Duration::from_millis(20));
                    active.fetch_sub(1, SeqCst);
                    done.fetch_add(1, SeqCst);
                })
            });
            assert_eq!(done.into_inner(), 8);
            let most = most.into_inner();
            assert!(most <= threads, "{most} items at once on {threads} threads");
        }
    }

    #[test]
    fn a_held_up_thread_leaves_the_other_items_to_the_rest() {
        use std::sync::Condvar;
        // Item 0 waits until every other item is done: with fixed shares, the thread
        // holding it would also hold items 1-3, and it would wait out the timeout.
        let (done, changed) = (Mutex::new(0), Condvar::new());
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(4)
            .build()
            .unwrap();
        pool.install(|| {
            share_out((0..8).collect(), Par::rayon(2), |item: u8| {
                let mut done = done.lock().unwrap();
                if item == 0 {
                    let wait = std::time::Duration::from_secs(30);
                    let (all, _) = changed.wait_timeout_while(done, wait, |d| *d < 7).unwrap();
                    assert_eq!(*all, 7, "the other items waited for the held-up one");
                } else {
                    *done += 1;
                    changed.notify_all();
                }
            })
        });
    }

    /// Every instruction set this CPU has (the scalar one at least) sums each output in the
    /// same order: the same bits, and so the same numbers on every node of a fleet.
    #[test]
    fn every_instruction_set_gives_the_same_bits() {
        let tiles = Tile::all();
        assert!(tiles.len() > 1, "the scalar kernel and the detected one");
        let shapes = [
            plain(2, 5, [9, 11], 7, 3),
            Conv2dParams {
                stride: [2, 1],
                padding: [1, 2],
                dilation: [1, 2],
                groups: 2,
                ..plain(1, 6, [13, 8], 4, 3)
            },
            plain(3, 17, [6, 6], 20, 1),
            // Many panels, ending in a short one.
            Conv2dParams {
                padding: [1, 1],
                ..plain(2, 8, [7, 9], 100, 3)
            },
            // Output rows of two columns: a strip of AVX2 or AVX-512 crosses more row ends
            // than are merged, and is gathered run by run.
            plain(2, 3, [9, 4], 5, 3),
            // Winograd's transforms: two groups, odd output sizes, a padding of 2.
            Conv2dParams {
                padding: [2, 1],
                groups: 2,
                ..plain(2, 128, [7, 9], 140, 3)
            },
            // A depth of 432: several passes for AVX2 and AVX-512, one for the scalar kernel.
            Conv2dParams {
                padding: [1, 1],
                ..plain(1, 48, [6, 7], 13, 3)
            },
        ];
        for p in shapes {
            let ([x, w, b], want) = with_bias(&p);
            let mut first = Vec::new();
            forward_on(tiles[0], &p, &x, &w, Some(&b), &mut first, Par::Seq).unwrap();
            assert!(max_rel_diff(&first, &want) < 1e-5, "{p:?}");
            for &tile in &tiles[1..] {
                // Every element written, by every kernel: none of the NaN left.
                let mut y = vec![f32::NAN; p.output_len()];
                forward_on(tile, &p, &x, &w, Some(&b), &mut y, Par::rayon(2)).unwrap();
                assert!(y == first, "{tile:?} on {p:?}");
            }
        }
    }

    proptest! {
        /// Every position a band's outputs read (tap plus output position, as the GEMM
        /// reads them) lies in a row [`Phases::read`] keeps, or past the last plane.
        #[test]
        fn bands_keep_every_row_they_read(p in params(), cut in 0usize..8) {
            let (ph, [oh, ow]) = (Phases::of(&p), p.output());
            let (cg, plane) = (p.in_channels / p.groups, ph.hq * ph.wq);
            let body = ph.len(cg) - ph.slack;
            let bands = 1 + cut % oh;
            let height = oh.div_ceil(bands);
            for y0 in (0..oh).step_by(height) {
                let band = height.min(oh - y0);
                let keep = ph.read(&p, y0, band);
                let [kh, kw] = p.kernel;
                for r in 0..cg * kh * kw {
                    let tap = ph.tap(&p, r / (kh * kw), r / kw % kh, r % kw);
                    for j in 0..band * ow {
                        let at = tap + (y0 + j / ow) * ph.wq + j % ow;
                        prop_assert!(at >= body || keep(at % plane / ph.wq), "{p:?} {y0} {band}");
                    }
                }
            }
        }
    }

    /// A band of a sample reads only the planes' rows that its split wrote: with every
    /// thread's scratch full of NaN first, any other read would show in the outputs.
    #[test]
    fn bands_read_only_the_rows_they_split() {
        let poison = || with_scratch(|buf| *buf = vec![f32::NAN; 1 << 20]);
        let shapes = [
            // Rows of four columns: strips over several rows; each row's right padding is
            // the next row's left.
            Conv2dParams {
                padding: [1, 1],
                ..plain(1, 3, [9, 4], 5, 3)
            },
            Conv2dParams {
                stride: [2, 1],
                padding: [1, 2],
                dilation: [1, 2],
                groups: 2,
                ..plain(1, 6, [13, 8], 4, 3)
            },
            Conv2dParams {
                stride: [2, 2],
                padding: [3, 3],
                ..plain(1, 3, [20, 18], 4, 7)
            },
            Conv2dParams {
                padding: [2, 2],
                dilation: [2, 2],
                ..plain(1, 4, [12, 10], 6, 3)
            },
            // Winograd's tiles: bands of tile rows, the last one short.
            Conv2dParams {
                padding: [1, 1],
                ..plain(1, 64, [11, 9], 64, 3)
            },
            Conv2dParams {
                padding: [1, 1],
                ..plain(1, 8, [11, 9], 13, 3)
            },
        ];
        for p in shapes {
            let ([x, w, b], want) = with_bias(&p);
            for par in [Par::Seq, Par::rayon(2), Par::rayon(3), Par::rayon(5)] {
                rayon::broadcast(|_| poison());
                poison();
                let y = forward(&p, &x, &w, Some(&b), par).unwrap();
                assert!(max_rel_diff(&y, &want) < 1e-5, "{par:?} on {p:?}");
            }
        }
    }

    /// No samples: empty outputs and zero gradients of the right sizes, not a panic.
    #[test]
    fn an_empty_batch_has_empty_outputs() {
        let p = plain(0, 2, [5, 5], 3, 3);
        let w = random(p.weight_len(), 1);
        // And one that would go through Winograd's transforms.
        let wide = plain(0, 64, [5, 5], 64, 3);
        let ww = random(wide.weight_len(), 1);
        for par in [Par::Seq, Par::rayon(2)] {
            assert!(forward(&p, &[], &w, None, par).unwrap().is_empty());
            assert!(forward(&wide, &[], &ww, None, par).unwrap().is_empty());
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
        check_gradients(Conv2dParams {
            stride: [3, 2],
            dilation: [1, 2],
            padding: [1, 3],
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
    /// With one group, samples are multiplied side by side, strips spanning two of them.
    fn pointwise_convolutions_need_no_lowering_and_agree() {
        for (batch, groups) in [(2, 2), (3, 1), (5, 1)] {
            let p = Conv2dParams {
                groups,
                ..plain(batch, 8, [7, 9], 4, 1)
            };
            assert!(p.pointwise());
            let (x, w) = (random(p.input_len(), 1), random(p.weight_len(), 2));
            let fast = forward(&p, &x, &w, None, Par::Seq).unwrap();
            assert!(max_rel_diff(&fast, &reference::forward(&p, &x, &w, None)) < 1e-5);
            assert_eq!(forward(&p, &x, &w, None, Par::rayon(2)).unwrap(), fast);
        }
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
        for empty in [
            Conv2dParams { height: 0, ..p },
            Conv2dParams { width: 0, ..p },
            Conv2dParams {
                in_channels: 0,
                ..p
            },
            Conv2dParams {
                out_channels: 0,
                ..p
            },
        ] {
            let err = forward(&empty, &[], &[], None, Par::Seq).unwrap_err();
            assert!(err.to_string().contains("at least 1"), "{err}");
            let err = backward(&empty, &[], &[], &[], Par::Seq).unwrap_err();
            assert!(err.to_string().contains("at least 1"), "{err}");
        }
    }
}
