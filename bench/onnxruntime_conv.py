#!/usr/bin/env python3
"""conv2d forward GFLOP/s of onnxruntime's CPU Conv on the shapes of the compute benchmark,
with the same thread count. Needs `pip install onnxruntime onnx numpy`.

Usage: bench/onnxruntime_conv.py [threads]   (default 2)
"""
import statistics
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from conv_shapes import SHAPES


def model(n, c, h, k, r, stride, pad):
    rng = np.random.default_rng(0)
    w = helper.make_tensor("w", TensorProto.FLOAT, [k, c, r, r], rng.uniform(-0.1, 0.1, (k, c, r, r)).astype(np.float32).ravel())
    b = helper.make_tensor("b", TensorProto.FLOAT, [k], rng.uniform(-0.1, 0.1, k).astype(np.float32))
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], kernel_shape=[r, r], strides=[stride, stride], pads=[pad] * 4)
    graph = helper.make_graph([node], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, c, h, h])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w, b])
    # IR version 8 goes with opset 17; a newer onnx would stamp its own, which an older onnxruntime refuses.
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def main():
    threads = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    print(f"## onnxruntime {ort.__version__} CPU Conv, {threads} threads\n")
    print("| N, C, H, W, K, RxS, stride, pad | ms | GFLOP/s |\n|---|---|---|")
    for n, c, h, k, r, stride, pad in SHAPES:
        sess = ort.InferenceSession(model(n, c, h, k, r, stride, pad).SerializeToString(), opts, providers=["CPUExecutionProvider"])
        x = np.random.default_rng(1).uniform(-1, 1, (n, c, h, h)).astype(np.float32)
        sess.run(None, {"x": x})
        times = []
        start = time.perf_counter()
        while len(times) < 3 or (time.perf_counter() - start < 3 and len(times) < 200):
            t = time.perf_counter()
            sess.run(None, {"x": x})
            times.append(time.perf_counter() - t)
        s = statistics.median(times)
        oh = (h + 2 * pad - r) // stride + 1
        flops = 2 * n * k * oh * oh * c * r * r
        print(f"| {n}, {c}, {h}, {h}, {k}, {r}x{r}, {stride}, {pad} | {s * 1e3:.2f} | {flops / s / 1e9:.1f} |")


if __name__ == "__main__":
    main()
