#!/usr/bin/env bash
# Proves the CUDA kernels (csrc/cuda) compile and their extension loads, on a machine without a GPU.
#
# In a second virtual environment with the CUDA build of torch (torch==2.14.1; the local wheels
# make that about 5 GB and a minute), build bimi_kernels._C and bimi_kernels._C_cuda from a copy
# of the tracked sources (so the CPU build in the working tree is left alone), for one GPU
# architecture to keep it short, then load both libraries and check that the CUDA kernels are
# registered. Nothing runs on a GPU here. Skipped, with the reason printed, only when nvcc is absent.
#
# Environment: BIMI_CUDA_VENV (default /tmp/bimi_cuda_venv), CUDA_HOME (default /usr/local/cuda),
# BIMI_CUDA_ARCH (default 9.0), MAX_JOBS (default 2).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
NVCC="$CUDA_HOME/bin/nvcc"
if [ ! -x "$NVCC" ]; then
  if command -v nvcc >/dev/null 2>&1; then
    NVCC="$(command -v nvcc)"
    CUDA_HOME="$(dirname "$(dirname "$NVCC")")"
  else
    echo "check_cuda_build: SKIPPED: nvcc not found (no $CUDA_HOME/bin/nvcc, none on PATH); the CUDA extension was not compiled"
    exit 0
  fi
fi

VENV="${BIMI_CUDA_VENV:-/tmp/bimi_cuda_venv}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "check_cuda_build: creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
echo "check_cuda_build: installing the CUDA build of torch into $VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check torch==2.14.1 "numpy<2.4" ninja pybind11 setuptools wheel

NVCC_VERSION="$("$NVCC" --version | sed -n 's/.*release \([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p')"
TORCH_CUDA="$("$VENV/bin/python" -c 'import torch; print(torch.version.cuda or "")')"
TORCH_VERSION="$("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
echo "check_cuda_build: nvcc $NVCC_VERSION ($NVCC), torch $TORCH_VERSION built with CUDA ${TORCH_CUDA:-none}"
if [ -z "$TORCH_CUDA" ]; then
  echo "check_cuda_build: FAILED: torch in $VENV is not a CUDA build" >&2
  exit 1
fi
if [ "${NVCC_VERSION%%.*}" != "${TORCH_CUDA%%.*}" ]; then
  echo "check_cuda_build: FAILED: nvcc major version ${NVCC_VERSION%%.*} != torch's CUDA major ${TORCH_CUDA%%.*}" >&2
  exit 1
fi

BUILD_DIR="$(mktemp -d /tmp/bimi_cuda_build.XXXXXX)"
trap 'rm -rf "$BUILD_DIR"' EXIT
# the tracked sources plus any untracked, not-ignored ones (a working tree under development)
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | xargs -0 -I{} cp --parents {} "$BUILD_DIR" 2>/dev/null || true)
cd "$BUILD_DIR"
echo "check_cuda_build: building in $BUILD_DIR for sm_${BIMI_CUDA_ARCH:-9.0}"
START=$(date +%s)
CUDA_HOME="$CUDA_HOME" BIMI_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="${BIMI_CUDA_ARCH:-9.0}" MAX_JOBS="${MAX_JOBS:-2}" \
  "$VENV/bin/python" setup.py -q build_ext --inplace
echo "check_cuda_build: built in $(( $(date +%s) - START )) s"

"$VENV/bin/python" - <<'PY'
import glob
import torch

libraries = {name: glob.glob(f"bimi_kernels/{name}.*.so") for name in ("_C", "_C_cuda")}
for name, found in libraries.items():
    assert len(found) == 1, f"bimi_kernels.{name} was not built: {found}"
    torch.ops.load_library(found[0])
for op in ("joint_counts", "joint_counts_backward", "boundary_cc", "boundary_cc_backward"):
    for key in ("CPU", "CUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"bimi_C::{op}", key), (op, key)
print("check_cuda_build: OK: bimi_kernels._C and bimi_kernels._C_cuda load; CPU and CUDA kernels "
      "registered for bimi_C::{joint_counts, joint_counts_backward, boundary_cc, boundary_cc_backward}")
PY
