#!/usr/bin/env bash
# The oldest torch the package declares (pyproject.toml: "torch>=X.Y") is tested, not assumed: in
# a second virtual environment with torch==X.Y.0 from PyPI (the CUDA build, run on the CPU here,
# about 4.6 GB with its libraries; PyPI has no CPU build), build the C++ extension from a copy of
# the tracked sources, run the test suite, then compile the CUDA extension against that torch
# too and load it. The GPU machines this project is measured on run torch 2.11, whose extension
# builds use C++17 where newer torch uses C++20: code that needs a newer torch or a newer C++
# fails here, not on the GPU. The suite leaves out what does not depend on torch's version and
# the first pass has run (about half its time on a 2-core machine): the Triton kernels'
# numerics and launch geometry under the interpreter (triton and numpy alone) and their offline
# compile checks, and its symbolic-shape compile (the fakes it checks are every backend's); the
# Triton backend through the custom ops, autograd and torch.compile stays.
#
# Environment: BIMI_FLOOR_VENV (default /tmp/bimi_floor_venv), CUDA_HOME (default
# /usr/local/cuda; the CUDA step is skipped, saying so, without nvcc), MAX_JOBS (default 2).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FLOOR="$(sed -n 's/^ *"torch>=\([0-9][0-9]*\.[0-9][0-9]*\)".*/\1/p' "$ROOT/pyproject.toml" | head -1)"
if [ -z "$FLOOR" ]; then
  echo "check_torch_floor: FAILED: no \"torch>=X.Y\" dependency in pyproject.toml" >&2
  exit 1
fi
VENV="${BIMI_FLOOR_VENV:-/tmp/bimi_floor_venv}"
PYTHON="${PYTHON:-python3}"
START=$(date +%s)
if [ ! -x "$VENV/bin/python" ]; then
  echo "check_torch_floor: creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
echo "check_torch_floor: installing torch==$FLOOR.0 and the test requirements into $VENV"
# requirements-cpu.txt without its torch pin; torch X.Y pins its own setuptools ceiling
grep -v '^torch==' "$ROOT/requirements-cpu.txt" > "$VENV/requirements-floor.txt"
"$VENV/bin/pip" install -q --disable-pip-version-check "torch==$FLOOR.0" -r "$VENV/requirements-floor.txt" \
  2>&1 | grep -v "^WARNING: Location" || true
"$VENV/bin/python" -c "import torch; assert torch.__version__.startswith('$FLOOR.0'), torch.__version__" || {
  echo "check_torch_floor: FAILED: torch $FLOOR.0 did not install" >&2; exit 1; }
echo "check_torch_floor: $("$VENV/bin/python" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)') in $(( $(date +%s) - START )) s"

BUILD_DIR="$(mktemp -d /tmp/bimi_floor_build.XXXXXX)"
trap 'rm -rf "$BUILD_DIR"' EXIT
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | xargs -0 -I{} cp --parents {} "$BUILD_DIR" 2>/dev/null || true)
cd "$BUILD_DIR"
# the packaging tests list the tracked files: the copy is a repository whose index holds them all
git init -q . && git add -A
BIMI_BUILD_CUDA=0 MAX_JOBS="${MAX_JOBS:-2}" "$VENV/bin/python" setup.py -q build_ext --inplace
"$VENV/bin/python" -m pytest -q -n auto -p no:cacheprovider --ignore=tests/test_triton_launch.py \
  -k "not compile_for_h100 and not compile_in_seconds and not (triton and (match_reference or matches_reference or low_precision or more_than_4096 or symbolic_shapes))"
echo "check_torch_floor: the test suite passed on torch $FLOOR.0"

CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
  echo "check_torch_floor: CUDA step SKIPPED: no $CUDA_HOME/bin/nvcc"
else
  CUDA_HOME="$CUDA_HOME" BIMI_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="${BIMI_CUDA_ARCH:-9.0}" MAX_JOBS="${MAX_JOBS:-2}" \
    "$VENV/bin/python" setup.py -q build_ext --inplace
  "$VENV/bin/python" - <<'PY'
import glob
import torch

for name in ("_C", "_C_cuda"):
    found = glob.glob(f"bimi_kernels/{name}.*.so")
    assert len(found) == 1, f"bimi_kernels.{name} was not built: {found}"
    torch.ops.load_library(found[0])
for op in ("joint_counts", "joint_counts_backward", "boundary_cc", "boundary_cc_backward"):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"bimi_C::{op}", "CUDA"), op
print(f"check_torch_floor: the CUDA extension builds and loads on torch {torch.__version__}")
PY
fi
echo "check_torch_floor: OK in $(( $(date +%s) - START )) s"
