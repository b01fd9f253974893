#!/usr/bin/env bash
# conv2d forward throughput, kernelflow's CPU backend against onnxruntime's CPU Conv on the same
# shapes and thread count, alternating runs so that drift in machine load hits both alike.
# Prints a markdown table of per-shape medians and their ratio.
#
# Usage: bench/conv-vs-onnxruntime.sh [rounds]   (default 5; needs `pip install onnxruntime onnx numpy`)
# Env: KF_COMPUTE_BENCH, a built `compute` benchmark binary to run instead of building one with
# cargo (as on the GPU machine, which has no Rust toolchain).
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-5}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
bench=${KF_COMPUTE_BENCH:-$(cargo bench -p kernelflow-agent --bench compute --no-run 2>&1 | sed -n 's/.*Executable .*(\(.*\))/\1/p')}
for i in $(seq "$rounds"); do
    KF_BENCH=conv "$bench" | grep -E '^\| [0-9]' >"$out/ours-$i"
    python3 bench/onnxruntime_conv.py 2 | grep -E '^\| [0-9]' >"$out/ort-$i"
done
python3 - "$out" "$rounds" <<'PY'
import statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
def runs(side):
    table = {}
    for i in range(1, rounds + 1):
        for line in open(f"{out}/{side}-{i}"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            table.setdefault(cells[0], []).append(float(cells[-1]))
    return table
ours, ort = runs("ours"), runs("ort")
print(f"| N, C, H, W, K, RxS, stride, pad | kernelflow GFLOP/s | onnxruntime GFLOP/s | ratio |  ({rounds} alternating rounds, medians)")
print("|---|---|---|---|")
for shape, v in ours.items():
    a, b = statistics.median(v), statistics.median(ort[shape])
    print(f"| {shape} | {a:.1f} | {b:.1f} | {a / b:.2f} |")
PY
