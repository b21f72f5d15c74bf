#!/usr/bin/env bash
# One prepared GPU session: build the CUDA extension in place, run the GPU tests with the real
# Triton compiler, then the GPU benchmarks. Writes everything under $1 (default gpu_results/).
# Usage on a GPU machine from the repository root:  bash scripts/gpu_check.sh OUTDIR [bench-suite]
set -uo pipefail
OUT="${1:-gpu_results}"
SUITE="${2:-quick}"
mkdir -p "$OUT"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-16}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nvcc --version | tail -2; } > "$OUT/device.txt" 2>&1
T0=$(date +%s)
python -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; echo "build rc=$? in $(( $(date +%s) - T0 )) s" | tee -a "$OUT/build.log"
python -m bimi_kernels info > "$OUT/info.txt" 2>&1
T1=$(date +%s)
timeout "${TEST_TIMEOUT:-240}" python -m pytest -q -x --timeout 200 -p no:cacheprovider \
  tests/test_cuda.py tests/test_triton.py > "$OUT/gpu_tests.txt" 2>&1
echo "tests rc=$? in $(( $(date +%s) - T1 )) s" | tee -a "$OUT/gpu_tests.txt"
tail -3 "$OUT/gpu_tests.txt"
T2=$(date +%s)
timeout "${BENCH_TIMEOUT:-200}" python -m benchmarks.run --device cuda --suite "$SUITE" --out "$OUT/bench" > "$OUT/bench.log" 2>&1
echo "bench rc=$? in $(( $(date +%s) - T2 )) s" | tee -a "$OUT/bench.log"
tail -5 "$OUT/bench.log"
