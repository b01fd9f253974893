#!/usr/bin/env python3
"""PyTorch's cuDNN conv2d on the shapes of the kernelflow CUDA benchmark (agent/benches/cuda.rs),
in FP32 without TF32 as the backend runs, and the same copy/compute overlap measurement.

Usage: bench/torch_conv.py [--tf32] [--benchmark]   (KF_CUDA_ITERS: iterations, default 50)
  --tf32       allow TF32 tensor cores (PyTorch's default for convolutions)
  --benchmark  torch.backends.cudnn.benchmark: time the algorithms instead of cuDNN's heuristics
"""
import os
import sys
import time

import torch
import torch.nn.functional as F

from conv_shapes import SHAPES


def flops(n, c, h, k, r, stride, pad):
    out = (h + 2 * pad - r) // stride + 1
    return 2.0 * n * k * out * out * c * r * r


def main():
    iters = int(os.environ.get("KF_CUDA_ITERS", "50"))
    tf32 = "--tf32" in sys.argv
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = "--benchmark" in sys.argv
    dev = torch.device("cuda")
    print(f"## PyTorch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, "
          f"{torch.cuda.get_device_name(0)}, {'TF32' if tf32 else 'FP32 (no TF32)'}, "
          f"cudnn.benchmark={torch.backends.cudnn.benchmark}\n")
    print("| N,C,H,W,K,RxS,stride,pad | ms | GFLOP/s |")
    print("|---|---|---|")
    with torch.no_grad():
        for shape in SHAPES:
            n, c, h, k, r, stride, pad = shape
            x = torch.rand(n, c, h, h, device=dev) * 2 - 1
            w = (torch.rand(k, c, r, r, device=dev) * 2 - 1) * 0.1
            b = (torch.rand(k, device=dev) * 2 - 1) * 0.1
            for _ in range(3):
                F.conv2d(x, w, b, stride=stride, padding=pad)
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(iters):
                F.conv2d(x, w, b, stride=stride, padding=pad)
            torch.cuda.synchronize()
            secs = (time.perf_counter() - start) / iters
            print(f"| {n},{c},{h},{h},{k},{r}x{r},{stride},{pad} | {secs * 1e3:.3f} | {flops(*shape) / secs / 1e9:.0f} |")
        print()
    train_step(dev, iters)
    with torch.no_grad():
        overlap(dev, iters)


def per_call_ms(run, iters):
    """Milliseconds per call of `run`, after a warm-up, synchronised with the GPU."""
    run()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        run()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters * 1e3


def train_step(dev, iters):
    """Forward, backward for input, weight and bias, and SGD with momentum, against forward
    alone, on the first shape: as kernelflow's benchmark."""
    n, c, h, k, r, stride, pad = SHAPES[0]
    x = (torch.rand(n, c, h, h, device=dev) * 2 - 1).requires_grad_()
    w = ((torch.rand(k, c, r, r, device=dev) * 2 - 1) * 0.1).requires_grad_()
    b = ((torch.rand(k, device=dev) * 2 - 1) * 0.1).requires_grad_()
    out = (h + 2 * pad - r) // stride + 1
    dy = torch.rand(n, k, out, out, device=dev) * 2 - 1
    opt = torch.optim.SGD([w], lr=0.01, momentum=0.9)

    def forward():
        with torch.no_grad():
            F.conv2d(x, w, b, stride=stride, padding=pad)

    def step():
        opt.zero_grad(set_to_none=True)
        x.grad = b.grad = None
        F.conv2d(x, w, b, stride=stride, padding=pad).backward(dy)
        opt.step()

    fwd, full = per_call_ms(forward, iters), per_call_ms(step, iters)
    print(f"| {SHAPES[0]} | ms |\n|---|---|")
    print(f"| forward | {fwd:.3f} |\n| step (forward, backward, update) | {full:.3f} |")
    print(f"| step / forward | {full / fwd:.2f}x |\n")


def overlap(dev, iters):
    """64 MiB pinned host-to-device copies on a side stream while conv2d runs on another; and
    the same copies from pageable memory, as kernelflow's uploads start from."""
    # The first shape at batch 32, as in kernelflow's benchmark.
    _, c, h, k, r, stride, pad = SHAPES[0]
    n = 32
    x = torch.rand(n, c, h, h, device=dev)
    w = torch.rand(k, c, r, r, device=dev) * 0.1
    host = torch.rand(16 << 20).pin_memory()
    copies = max(iters // 5, 4)
    compute_stream, copy_stream = torch.cuda.Stream(), torch.cuda.Stream()

    def compute():
        with torch.cuda.stream(compute_stream):
            for _ in range(iters):
                F.conv2d(x, w, stride=stride, padding=pad)

    def copy():
        with torch.cuda.stream(copy_stream):
            for _ in range(copies):
                host.to(dev, non_blocking=True)

    def timed(*runs):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for run in runs:
            run()
        torch.cuda.synchronize()
        return time.perf_counter() - start

    pageable = torch.rand(16 << 20)

    def copy_pageable():
        with torch.cuda.stream(copy_stream):
            for _ in range(copies):
                pageable.to(dev, non_blocking=True)

    timed(copy, compute, copy_pageable)
    t_copy, t_compute, t_both = timed(copy), timed(compute), timed(compute, copy)
    t_pageable = timed(copy_pageable)
    hidden = (t_copy + t_compute - t_both) / min(t_copy, t_compute)
    print("| copy/compute overlap | seconds |")
    print("|---|---|")
    print(f"| {copies} x 64 MiB host-to-device (pinned), alone: {copies * host.numel() * 4 / t_copy / 1e9:.1f} GB/s | {t_copy:.3f} |")
    print(f"| the same from pageable memory (staged by the driver): {copies * host.numel() * 4 / t_pageable / 1e9:.1f} GB/s | {t_pageable:.3f} |")
    print(f"| {iters} x conv2d {(n, c, h, k, r, stride, pad)}, alone | {t_compute:.3f} |")
    print(f"| both, on two streams | {t_both:.3f} |")
    print(f"| overlap (1 = the shorter fully hidden) | {hidden:.2f} |\n")


if __name__ == "__main__":
    main()
