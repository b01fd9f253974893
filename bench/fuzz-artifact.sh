#!/usr/bin/env bash
# Fuzzes the artifact parser and validator with cargo fuzz (libFuzzer) for a bounded time.
# Usage: bench/fuzz-artifact.sh [seconds]   (default 60)
# cargo fuzz needs nightly flags; RUSTC_BOOTSTRAP lets the stable toolchain take them.
set -euo pipefail
cd "$(dirname "$0")/../agent"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
mkdir -p fuzz/corpus/artifact
cargo run -q -p kernelflow-agent --bin kernelflow-pack -- --in-channels 4 --out-channels 8 \
  --kernel-size 3,3 --padding 1,1 --seed 1 --out fuzz/corpus/artifact/seed.safetensors >/dev/null
cargo fuzz run artifact -- -max_total_time="${1:-60}" -rss_limit_mb=2048
