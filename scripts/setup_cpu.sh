#!/usr/bin/env bash
# Set up a fresh machine (CPU): a virtual environment in .venv with the pinned CPU stack
# (requirements-cpu.txt), the C++ CPU extension compiled in place, and the package installed in
# editable mode (`pip install --no-build-isolation --no-deps -e .`, which also gives `bimi`).
#
# Idempotent and quick to re-run: each step runs only when it has something to do.
# - pip installs the requirements only when one of them is missing or at a version the file
#   does not allow;
# - the extension is compiled only when bimi_kernels/_C*.so is missing or older than a file under
#   csrc/, setup.py or the installed torch; then ninja recompiles only the sources that changed
#   (its objects stay in build/), printing a line per compiled file;
# - the editable install is registered only when .venv does not have one of this folder yet.
# Environment: PYTHON (the interpreter that makes .venv, default python3), MAX_JOBS (parallel
# compile jobs, default: the number of cores).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
VENV_PYTHON=.venv/bin/python
export MAX_JOBS="${MAX_JOBS:-$(nproc 2>/dev/null || echo 2)}"
START=$SECONDS
say() { echo "setup_cpu [$(( SECONDS - START )) s] $*"; }

if [ ! -x "$VENV_PYTHON" ]; then
  say "creating .venv with $("$PYTHON" --version 2>&1)"
  "$PYTHON" -m venv .venv
fi

# What is already done, in one interpreter start: prints three words, each "ok" or "todo".
read -r REQUIREMENTS NATIVE EDITABLE < <("$VENV_PYTHON" - <<'PY'
import glob
import json
import os
import pathlib
import re
import sysconfig
from importlib import metadata


def requirements_ok(path="requirements-cpu.txt"):
    try:
        from packaging.requirements import Requirement
    except ImportError:
        try:
            from pip._vendor.packaging.requirements import Requirement
        except ImportError:
            return False
    with open(path) as lines:
        for line in lines:
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            if line.startswith("-"):  # pip options: leave them to pip
                return False
            requirement = Requirement(line)
            if requirement.marker is not None and not requirement.marker.evaluate():
                continue
            try:
                version = metadata.version(requirement.name)
            except metadata.PackageNotFoundError:
                return False
            if not requirement.specifier.contains(version, prereleases=True):
                return False
    return True


def native_ok():
    library = os.path.join("bimi_kernels", "_C" + sysconfig.get_config_var("EXT_SUFFIX"))
    if not os.path.exists(library):
        return False
    sources = (".cpp", ".h", ".cu", ".cuh")  # not csrc/README.md: a doc edit rebuilds nothing
    inputs = [os.path.join(d, f) for d, _, files in os.walk("csrc") for f in files if f.endswith(sources)] + ["setup.py"]
    torch_files = glob.glob(os.path.join(sysconfig.get_paths()["purelib"], "torch", "version.py"))
    if not torch_files:
        return False  # torch missing: let the build say so
    built = os.path.getmtime(library)
    return all(os.path.getmtime(path) <= built for path in inputs + torch_files)


def editable_ok():
    """An editable install of this folder, at the version in bimi_kernels/_version.py. Looked up
    in .venv's site-packages only: a bimi_kernels.egg-info that `pip install .`, `pip wheel` or
    `python -m build` left in this folder (the current directory is on sys.path here) is not
    an install."""
    site = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    installed = next(iter(metadata.distributions(name="bimi_kernels", path=site)), None)
    if installed is None:
        return False
    direct_url = json.loads(installed.read_text("direct_url.json") or "{}")
    with open(os.path.join("bimi_kernels", "_version.py")) as source:
        version = re.search(r'^__version__ = "([^"]+)"', source.read(), re.M)
    return (direct_url.get("dir_info", {}).get("editable", False)
            and direct_url.get("url") == pathlib.Path.cwd().as_uri()
            and version is not None and installed.version == version.group(1))


print(*("ok" if check() else "todo" for check in (requirements_ok, native_ok, editable_ok)))
PY
)

if [ "$REQUIREMENTS" = ok ]; then
  say "requirements-cpu.txt: already satisfied"
else
  say "installing requirements-cpu.txt"
  if ! "$VENV_PYTHON" -c "import torch" 2>/dev/null && [ -z "${PIP_EXTRA_INDEX_URL:-}${PIP_INDEX_URL:-}${PIP_FIND_LINKS:-}" ]; then
    say "  torch comes from pip's default index: on most machines PyPI's CUDA build (several GB);"
    say "  for the CPU build: PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu bash scripts/setup_cpu.sh"
  fi
  "$VENV_PYTHON" -m pip install --progress-bar off -r requirements-cpu.txt
fi

if [ "$NATIVE" = ok ]; then
  say "C++ extension: up to date"
else
  if compgen -G "build/temp.*/build.ninja" > /dev/null; then
    say "compiling the C++ extension with $MAX_JOBS job(s): only the files that changed"
  else
    say "compiling the C++ extension with $MAX_JOBS job(s): every file (one to two minutes on 2 cores)"
  fi
  # ninja prints one long compiler command per finished file: show the file instead; pass
  # everything else (warnings, errors) through unchanged.
  "$VENV_PYTHON" setup.py -q build_ext --inplace 2>&1 | while IFS= read -r line; do
    if [[ "$line" =~ ^\[([0-9]+/[0-9]+)\]\ .*\ -c\ ([^ ]+) ]]; then
      say "  [${BASH_REMATCH[1]}] compiled ${BASH_REMATCH[2]#"$PWD/"}"
    else
      printf '%s\n' "$line"
    fi
  done
  say "C++ extension built"
fi

if [ "$EDITABLE" = ok ]; then
  say "editable install: already registered"
else
  # compiles nothing more: ninja finds the objects of the step above in build/ and only links
  say "registering the editable install (pip install --no-build-isolation --no-deps -e .)"
  "$VENV_PYTHON" -m pip install -q --no-build-isolation --no-deps -e .
fi

say "done"
"$VENV_PYTHON" -m bimi_kernels info
