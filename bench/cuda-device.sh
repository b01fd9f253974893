#!/usr/bin/env bash
# The CUDA backend on a GPU machine: its GPU tests, then its conv2d benchmark beside PyTorch's,
# and last the CPU conv2d against onnxruntime on that machine's (quieter, larger) host.
#
# Here (any machine with the Rust toolchain; no GPU or CUDA toolkit needed):
#   bench/cuda-device.sh --prepare     # builds and strips the binaries into target/gpu (~40 MB)
# On the GPU machine (PyTorch installed; its pip packages provide cuDNN and cuBLAS), from the
# repository root, with target/gpu carried over:
#   bench/cuda-device.sh               # or: bench/cuda-device.sh TEST_BINARY BENCH_BINARY
# Env: PYTHON (default python3), KF_CUDA_ITERS (timed iterations per shape, default 50).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=$root/target/gpu

if [[ ${1:-} == --prepare ]]; then
  cd "$root"
  # The executable of the artifact whose target matches $1 in cargo's JSON messages.
  exe() { grep "$1" | grep -o '"executable":"[^"]*"' | tail -1 | cut -d'"' -f4; }
  tests=$(cargo test -p kernelflow-agent --lib --no-run --message-format=json \
    | exe '"kind":\["lib"\].*"test":true')
  bench=$(cargo build --release -p kernelflow-agent --bench cuda --message-format=json \
    | exe '"kind":\["bench"\],"crate_types":\["bin"\],"name":"cuda"')
  compute=$(cargo build --release -p kernelflow-agent --bench compute --message-format=json \
    | exe '"kind":\["bench"\],"crate_types":\["bin"\],"name":"compute"')
  mkdir -p "$out"
  strip -o "$out/agent-tests" "$tests"
  strip -o "$out/cuda-bench" "$bench"
  strip -o "$out/compute-bench" "$compute"
  ls -l "$out"
  exit 0
fi

tests=${1:-$out/agent-tests}
bench=${2:-$out/cuda-bench}
python=${PYTHON:-python3}

# cudarc dlopens libcuda (the driver's), libcublas and libcudnn at run time. cuDNN, cuBLAS and
# what cuDNN loads itself (cuBLASLt, NVRTC) come from PyTorch's nvidia-* pip packages: put
# every nvidia/*/lib directory of the site-packages on the loader's path.
libs=$("$python" - <<'PY'
import glob, os, site
dirs = site.getsitepackages() + [site.getusersitepackages()]
print(":".join(sorted({d for s in dirs for d in glob.glob(os.path.join(s, "nvidia", "*", "lib"))})))
PY
)
# cudarc built for CUDA 12.8 looks for lib<name>.so and the .so.12, .so.11... majors; CUDA 13's
# packages ship .so.13 alone. A folder of unversioned links to whatever major is there bridges
# that: the calls the backend makes keep their ABI across these majors.
shim=$(mktemp -d)
for name in cublas cublasLt cudnn; do
  for dir in ${libs//:/ }; do
    for lib in "$dir"/lib$name.so.[0-9]*; do
      [[ -e $lib && ! -e $shim/lib$name.so ]] && ln -s "$lib" "$shim/lib$name.so"
    done
  done
done
ls -l "$shim"
export LD_LIBRARY_PATH=${shim}:${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

echo "== GPU tests (ignored by a plain cargo test; run here, they fail without a usable GPU)"
: >/tmp/kf-cuda-tests.log
# One process per test, each under a time limit, so that a hang names its test and spares the rest.
failed=0
for test in $("$tests" compute::cuda compute::device --list 2>/dev/null | sed -n 's/: test$//p'); do
  timeout 120 "$tests" --exact "$test" --include-ignored --nocapture 2>&1 | tee -a /tmp/kf-cuda-tests.log \
    || { echo "FAILED or timed out: $test" >&2; failed=1; }
done
if grep -q 'needs a usable GPU' /tmp/kf-cuda-tests.log; then
  echo "the CUDA tests failed: the backend did not find a usable GPU" >&2
  exit 1
fi

echo "== kernelflow CUDA benchmark"
timeout 300 "$bench" || failed=1
echo "== PyTorch"
timeout 120 "$python" "$root/bench/torch_conv.py" || failed=1

echo "== the CPU ops' tests, on this host's instruction sets (AVX-512 where the build machine may lack it)"
timeout 300 "$tests" compute:: --skip compute::cuda 2>&1 | tail -3 || failed=1

if [[ -x $out/compute-bench ]]; then
  echo "== CPU conv2d against onnxruntime, 2 threads each, on this machine's host"
  grep -m1 'model name' /proc/cpuinfo; nproc
  grep -ow 'avx2\|avx512f\|amx_tile' /proc/cpuinfo | sort -u | xargs echo
  KF_COMPUTE_BENCH=$out/compute-bench timeout 240 "$root/bench/conv-vs-onnxruntime.sh" 3 \
    || failed=1
fi
exit $failed
