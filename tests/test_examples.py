"""The scripts in examples/ run as their docstrings say (and refuse bad arguments as usage errors)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def _run(*args, timeout=180):
    # the package as the tests see it (pytest puts the tree on sys.path; a script gets its own folder)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, str(EXAMPLES / "ddp_pretrain.py"), *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


def test_ddp_example_keeps_the_replicas_identical():
    result = _run("--world-size", "2", "--steps", "3", "--backend", "reference")
    assert result.returncode == 0, result.stderr
    assert "replicas identical: True" in result.stdout


@pytest.mark.parametrize("argv, named", [
    (["--world-size", "0"], "--world-size"),
    (["--steps", "-1"], "--steps"),
    (["--backend", "nope"], "--backend"),
])
def test_ddp_example_bad_arguments_are_usage_errors(argv, named):
    result = _run(*argv, timeout=60)
    assert result.returncode == 2
    assert f"argument {named}" in result.stderr and "Traceback" not in result.stderr
