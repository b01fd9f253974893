#!/usr/bin/env bash
# A/B of conv2d forward throughput between built `compute` benchmark binaries (say, before and
# after a kernel change): the binaries run in turn, their order reversed every other round, so
# that drift in machine load hits each alike. Prints each shape's median and best GFLOP/s.
#
# Usage: bench/conv-ab.sh ROUNDS LABEL:BINARY LABEL:BINARY ...
# Env: KF_CONV_THREADS (default 2), KF_CONV_SHAPES (indices of the benchmark's shapes; all by
# default). A binary: `cargo bench -p kernelflow-agent --bench compute --no-run`, copied aside.
set -euo pipefail
rounds=$1
shift
specs=("$@")
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for i in $(seq "$rounds"); do
    order=("${specs[@]}")
    if ((i % 2 == 0)); then
        order=()
        for ((j = ${#specs[@]} - 1; j >= 0; j--)); do order+=("${specs[j]}"); done
    fi
    for spec in "${order[@]}"; do
        KF_BENCH=conv KF_CONV_THREADS=${KF_CONV_THREADS:-2} "${spec#*:}" |
            grep -E '^\| [0-9]' >>"$out/${spec%%:*}"
    done
done
python3 - "$out" "${specs[@]}" <<'PY'
import statistics, sys
out, labels = sys.argv[1], [s.split(":")[0] for s in sys.argv[2:]]
table = {}
for label in labels:
    for line in open(f"{out}/{label}"):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        table.setdefault(cells[0], {}).setdefault(label, []).append(float(cells[-1]))
print("| N, C, H, W, K, RxS, stride, pad | " + " | ".join(f"{l} median / best GFLOP/s" for l in labels) + " |")
print("|---|" + "---|" * len(labels))
for shape, runs in table.items():
    print(f"| {shape} | " + " | ".join(
        f"{statistics.median(runs[l]):.1f} / {max(runs[l]):.1f}" for l in labels) + " |")
PY
