//! The conv2d shapes every benchmark measures (the compute engine issue's list), shared by the
//! CPU and the CUDA benchmarks; `bench/conv_shapes.py` is the same list for the onnxruntime and
//! PyTorch scripts.

use kernelflow_agent::compute::conv::Conv2dParams;

/// N, C, H (= W), K, R (= S), stride, pad.
pub type Shape = (usize, usize, usize, usize, usize, usize, usize);

pub const SHAPES: [Shape; 5] = [
    (8, 64, 56, 64, 3, 1, 1),
    (8, 128, 28, 128, 3, 1, 1),
    (8, 256, 14, 256, 1, 1, 0),
    (8, 3, 224, 64, 7, 2, 3),
    (1, 32, 32, 32, 3, 1, 1),
];

/// The small shape, where fixed per-op costs show.
pub const SMALL: Shape = SHAPES[4];

pub fn params((n, c, h, k, r, stride, pad): Shape) -> Conv2dParams {
    Conv2dParams {
        batch: n,
        in_channels: c,
        height: h,
        width: h,
        out_channels: k,
        kernel: [r, r],
        stride: [stride, stride],
        padding: [pad, pad],
        dilation: [1, 1],
        groups: 1,
    }
}
