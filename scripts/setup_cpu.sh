#!/usr/bin/env bash
# Set up a fresh machine (CPU): a virtual environment in .venv with the pinned CPU stack
# (requirements-cpu.txt), then build this package in place with its C++ CPU extension.
# Idempotent: re-running reuses .venv and rebuilds only what changed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q -r requirements-cpu.txt
# --no-build-isolation: build against the torch just installed (isolation would fetch a CUDA torch)
MAX_JOBS="${MAX_JOBS:-2}" .venv/bin/python -m pip install -q --no-build-isolation --no-deps -e .
.venv/bin/python -m bimi_kernels info
