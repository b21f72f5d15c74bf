#!/usr/bin/env bash
# Installs the package the ways a user does, away from the development set-up, and checks that
# each way gives the native kernels or stops with a message that says how to get them:
#
#   1. an sdist of the working tree (no torch needed to make it);
#   2. a wheel built from that sdist without build isolation, in a fresh virtual environment that
#      has only the pinned torch (requirements-cpu.txt) and ninja;
#   3. that wheel installed there with its dependencies, then imported from a folder outside the
#      source tree: the `cpp` backend is available, `auto` picks it, its loss and gradients match
#      the reference, numpy is not installed (not a dependency), `bimi --version` and `bimi info`
#      run;
#   4. `pip install .` with build isolation (pip's default): it must either give `cpp` or fail
#      with the message naming --no-build-isolation. torch is not a build requirement (checked
#      first), so this never downloads a torch into the isolated build environment.
#
# Environment: PYTHON (makes the venv, default python3), MAX_JOBS (compile jobs, default 2),
# BIMI_INSTALL_CHECK_DIR (work folder, default: a new one under /tmp, removed at the end).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
export MAX_JOBS="${MAX_JOBS:-2}"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off
if [ -n "${BIMI_INSTALL_CHECK_DIR:-}" ]; then
  WORK="$BIMI_INSTALL_CHECK_DIR"
  mkdir -p "$WORK"
else
  WORK="$(mktemp -d /tmp/bimi_install_check.XXXXXX)"
  trap 'rm -rf "$WORK"' EXIT
fi
START=$SECONDS
say() { echo "check_install [$(( SECONDS - START )) s] $*"; }
# pip lists every configured index folder that lacks a package; keep its output to what matters
quiet_pip() { "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }

TORCH_PIN="$(grep -E '^torch==' "$ROOT/requirements-cpu.txt")"

say "0. torch is not a build requirement (an isolated build would download one)"
"$PYTHON" - "$ROOT/pyproject.toml" <<'PY'
import re, sys, tomllib
requires = tomllib.load(open(sys.argv[1], "rb"))["build-system"]["requires"]
names = [re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].strip().lower() for r in requires]
assert "torch" not in names, f"build-system.requires names torch: {requires}"
print(f"  build-system.requires = {requires}")
PY

# the tracked sources plus untracked, not-ignored ones (a working tree under development), and
# none of its build outputs (no .so, no build/)
mkdir -p "$WORK/src" "$WORK/dist" "$WORK/wheels" "$WORK/elsewhere"
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard \
  | while IFS= read -r -d '' path; do [ -e "$path" ] && printf '%s\0' "$path"; done \
  | xargs -0 cp --parents -t "$WORK/src")

say "fresh venv with $TORCH_PIN and ninja only"
"$PYTHON" -m venv "$WORK/venv"
VENV_PIP=("$WORK/venv/bin/python" -m pip)
quiet_pip "${VENV_PIP[@]}" install -q "$TORCH_PIN" ninja

say "1. sdist"
(cd "$WORK/src" && "$WORK/venv/bin/python" -c \
  "from setuptools import build_meta; print('  ' + build_meta.build_sdist('$WORK/dist'))" \
  | tail -n 1)
SDIST="$(ls "$WORK"/dist/bimi_kernels-*.tar.gz)"

say "2. wheel from the sdist, without build isolation (compiles the C++ extension)"
(cd "$WORK" && quiet_pip "${VENV_PIP[@]}" wheel -q --no-build-isolation --no-deps -w "$WORK/wheels" "$SDIST")
WHEEL="$(ls "$WORK"/wheels/bimi_kernels-*.whl)"
say "  $(basename "$WHEEL"): $(du -k "$WHEEL" | cut -f1) KiB"

say "3. install the wheel (with its dependencies) and use it from outside the source tree"
quiet_pip "${VENV_PIP[@]}" install -q "$WHEEL"
cd "$WORK/elsewhere"
"$WORK/venv/bin/python" - "$ROOT" "$WORK/src" <<'PY'
import importlib.util
import sys
from pathlib import Path

import torch

import bimi_kernels
from bimi_kernels import backends

location = Path(bimi_kernels.__file__).resolve()
for tree in sys.argv[1:]:
    assert Path(tree).resolve() not in location.parents, f"imported from the source tree: {location}"
assert "site-packages" in location.parts, location
reason = bimi_kernels.available_backends("cpu")["cpp"]
assert reason is None, f"cpp backend unavailable in the installed wheel: {reason}"
assert backends.resolve("auto", "cpu") == "cpp"
assert importlib.util.find_spec("numpy") is None, "numpy got installed: it is not a dependency"

generator = torch.Generator().manual_seed(0)
def maps():
    return torch.randn(2, 4, 16, 16, generator=generator).softmax(1).requires_grad_()
p1, p2 = maps(), maps()
image = torch.rand(2, 1, 16, 16, generator=generator)
results = {}
for backend in ("cpp", "reference"):
    loss = bimi_kernels.BIMILoss(offsets=1, backend=backend)(p1, p2, image=image)
    grads = torch.autograd.grad(loss, (p1, p2))
    results[backend] = (loss.detach(), grads)
(loss_cpp, grads_cpp), (loss_ref, grads_ref) = results["cpp"], results["reference"]
torch.testing.assert_close(loss_cpp, loss_ref, rtol=1e-5, atol=1e-6)
for got, want in zip(grads_cpp, grads_ref):
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
print(f"  imported {location.parent}; cpp available and picked by auto; BIMILoss on cpp = "
      f"{loss_cpp.item():.6f} (reference {loss_ref.item():.6f}), gradients match; numpy absent")
PY
"$WORK/venv/bin/bimi" --version
"$WORK/venv/bin/bimi" info | sed 's/^/  /'

say "4. pip install . with build isolation: gives cpp, or stops naming --no-build-isolation"
"$WORK/venv/bin/python" -m pip uninstall -q -y bimi_kernels
cd "$WORK/src"
set +e
quiet_pip "${VENV_PIP[@]}" install . > "$WORK/isolated.log"
ISOLATED_STATUS=$?
set -e
cd "$WORK/elsewhere"
if [ "$ISOLATED_STATUS" = 0 ]; then
  "$WORK/venv/bin/python" -c "
import bimi_kernels
reason = bimi_kernels.available_backends('cpu')['cpp']
assert reason is None, f'pip install . with isolation gave a package without cpp: {reason}'
print('  pip install . (isolated) built the extension: cpp available')"
elif grep -q -- "pip install --no-build-isolation" "$WORK/isolated.log"; then
  echo "  pip install . (isolated) stopped (exit $ISOLATED_STATUS) with the message:"
  sed -n '/cannot build the C++ extension/,/--no-build-isolation -e/p' "$WORK/isolated.log" | sed 's/^      //; s/^/    /'
else
  echo "check_install: FAILED: pip install . with isolation failed without naming --no-build-isolation:" >&2
  tail -n 40 "$WORK/isolated.log" >&2
  exit 1
fi

say "OK"
