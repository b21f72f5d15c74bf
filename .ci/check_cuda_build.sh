#!/usr/bin/env bash
# Proves the CUDA kernels (csrc/cuda) compile and their extension loads, on a machine without a GPU,
# and reports each kernel's registers, stack, shared and local memory so a reviewer can see that
# no kernel spills or exceeds the limits.
#
# In a second virtual environment with the CUDA build of torch (torch==2.14.1; the local wheels
# make that about 5 GB and a minute), build bimi_kernels._C and bimi_kernels._C_cuda from a copy
# of the tracked sources (so the CPU build in the working tree is left alone), for one GPU
# architecture to keep it short, then load both libraries and check that the CUDA kernels are
# registered. Then `cuobjdump --dump-resource-usage` on the built library: a table of every
# kernel; the check fails if a kernel has a stack frame or local memory (spilled registers or an
# array the compiler could not keep in registers). Nothing runs on a GPU here: the kernels' index
# arithmetic is checked on the CPU by their host emulations (csrc/cuda/tests, run by
# tests/test_cuda.py). Skipped, with the reason printed, only when nvcc is absent.
#
# Environment: BIMI_CUDA_VENV (default /tmp/bimi_cuda_venv), CUDA_HOME (default /usr/local/cuda),
# BIMI_CUDA_ARCH (default 9.0), MAX_JOBS (default 2), BIMI_CUDA_REPORT (a file that gets the
# resource table too).
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
"$VENV/bin/pip" install -q --disable-pip-version-check torch==2.14.1 "numpy<2.4" ninja "setuptools>=77"

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

# The resource table. cuobjdump comes with the toolkit; a bare toolkit without it can use the one
# that Triton's wheel carries (installed with torch in the venv).
CUOBJDUMP="$CUDA_HOME/bin/cuobjdump"
[ -x "$CUOBJDUMP" ] || CUOBJDUMP="$(command -v cuobjdump || true)"
[ -n "$CUOBJDUMP" ] && [ -x "$CUOBJDUMP" ] || CUOBJDUMP="$(ls "$VENV"/lib/python3*/site-packages/triton/backends/nvidia/bin/cuobjdump 2>/dev/null | head -1)"
if [ -z "$CUOBJDUMP" ] || [ ! -x "$CUOBJDUMP" ]; then
  echo "check_cuda_build: FAILED: no cuobjdump (toolkit, PATH or triton's) for the resource table" >&2
  exit 1
fi
"$CUOBJDUMP" --dump-resource-usage bimi_kernels/_C_cuda.*.so > resource_usage.txt
"$VENV/bin/python" - resource_usage.txt "${BIMI_CUDA_REPORT:-}" <<'PY'
import re, subprocess, sys

text = open(sys.argv[1]).read()
rows, arch = [], None
for line in text.splitlines():
    m = re.search(r"arch = (sm_\d+)", line)
    if m:
        arch = m.group(1)
    m = re.match(r"\s*Function (\S+):", line)
    if m:
        rows.append({"arch": arch, "mangled": m.group(1)})
        continue
    if rows and "REG:" in line and "reg" not in rows[-1]:
        fields = dict(re.findall(r"([A-Z]+(?:\[\d+\])?):(\d+)", line))
        rows[-1].update(reg=int(fields["REG"]), stack=int(fields["STACK"]), shared=int(fields["SHARED"]),
                        local=int(fields["LOCAL"]))
names = subprocess.run(["c++filt"], input="\n".join(r["mangled"] for r in rows), capture_output=True,
                       text=True).stdout.splitlines() if rows else []
for row, name in zip(rows, names or [r["mangled"] for r in rows]):
    name = re.sub(r"^(void )?bimi::cuda::(\(anonymous namespace\)::)?", "", name)
    name = name[: name.find("(")] if "(" in name else name  # drop the parameter list
    row["name"] = name.replace("c10::", "")
rows.sort(key=lambda r: r["name"])
lines = [f"{'kernel':<58} {'arch':<6} {'regs':>4} {'stack B':>7} {'static smem B':>13} {'local B':>7}"]
for r in rows:
    lines.append(f"{r['name']:<58} {r['arch']:<6} {r['reg']:>4} {r['stack']:>7} {r['shared']:>13} {r['local']:>7}")
lines.append("(registers per thread; static smem as cuobjdump reports it: the __shared__ arrays, or 1 KB reserved "
             "by the system on some kernels; the joint kernels' dynamic shared memory is sized per launch, at most "
             "80 KB a block, opted in above 48 KB)")
table = "\n".join(lines)
print(table)
if sys.argv[2]:
    open(sys.argv[2], "w").write(table + "\n")
bad = [r["name"] for r in rows if r["stack"] or r["local"] or r["reg"] > 255]
if not rows:
    sys.exit("check_cuda_build: FAILED: no kernels in the resource report")
if bad:
    sys.exit(f"check_cuda_build: FAILED: stack frame / local memory (spills) in {bad}")
print(f"check_cuda_build: OK: {len(rows)} kernels, none with a stack frame, local memory or more than 255 registers")
PY
