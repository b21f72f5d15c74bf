"""What is specific to the `triton` backend object: its registration, its reason on CPU tensors
without the interpreter, and the sm_90 compile of every kernel without a GPU. Its launchers'
geometry (explicit tiles, chunks of partner rows, grids, strides, 64-bit indices) is
tests/test_triton_launch.py; everything every backend must do (against the reference, low
precision, determinism, the API) is the conformance suite in tests/backends/, which runs the
Triton kernels too: compiled on CUDA tensors, under Triton's interpreter on CPU tensors
(tests/conftest.py switches it on before triton is first imported)."""
import os

import pytest
import torch

import bimi_kernels
from bimi_kernels import backends

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_REASON = backends.unavailable_reason("triton", DEVICE)
if _REASON is not None:
    pytest.skip(f"triton backend unavailable on {DEVICE}: {_REASON}", allow_module_level=True)

from bimi_kernels.triton.backend import BACKEND  # noqa: E402


# ------------------------------------------------------------------------------------------------
# the backend object
# ------------------------------------------------------------------------------------------------
def test_backend_is_registered_and_available():
    assert BACKEND.name == "triton" and BACKEND.devices == frozenset({"cuda", "cpu"})
    assert bimi_kernels.available_backends(DEVICE)["triton"] is None
    assert backends.resolve("triton", DEVICE) == "triton"
    if DEVICE == "cuda":
        assert backends.resolve("auto", "cuda") == "triton"


def test_cpu_without_interpreter_says_why(monkeypatch):
    from bimi_kernels.triton import backend as triton_backend

    monkeypatch.setattr(triton_backend, "INTERPRETED", False)
    reason = triton_backend.unavailable_reason("cpu")
    assert reason is not None and "TRITON_INTERPRET=1" in reason
    assert "mps" in triton_backend.unavailable_reason("mps")


# ------------------------------------------------------------------------------------------------
# the GPU compiler, without a GPU
# ------------------------------------------------------------------------------------------------
def _compile_check(*args: str, timeout: int = 1200) -> str:
    """Run scripts/triton_compile_check.py with `args` (not interpreted); its output."""
    import subprocess
    import sys

    import triton.backends

    if "nvidia" not in triton.backends.backends:
        pytest.skip("this triton install has no NVIDIA backend to compile with")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run(
        [sys.executable, os.path.join(root, "scripts", "triton_compile_check.py"), *args],
        env=env, cwd=root, capture_output=True, text=True, timeout=timeout,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done.stdout


def test_kernels_compile_for_h100_without_gpu():
    """Compile every kernel (a representative set of dtypes, K, layouts) for sm_90 with Triton's
    real compiler and ptxas (scripts/triton_compile_check.py --quick), so GPU-only compile errors
    and register spills show up in CPU-only CI too; K=1000 for the channel blocks of K above 128
    (without them, the joint counts asked more shared memory than a block has in float64 and
    the boundary term's kernels spilled kilobytes)."""
    out = _compile_check("--quick", "--k", "10", "1000", "--dtype", "bf16", "fp32", "fp64")
    assert out.count("ok ") >= 20 and "K=1000" in out
    # the edge map's float32 sqrt and divisions are the correctly rounded ones (its tolerance is
    # 1e-6; the approximate ones are up to 2 ulp); only its power may use the fast exp
    edge_lines = [line for line in out.splitlines() if "_edge_" in line]
    assert len(edge_lines) >= 6
    for line in edge_lines:
        approx = line.split("approx=")[1].split()[0]
        assert approx in ("-", "ex2.approx"), line


def test_large_box_windows_compile_in_seconds_without_spills():
    """Windows 11 and 21 (the contract allows any odd window): the rows of a window past 5 loop
    at run time instead of being unrolled, which took ~2 minutes per kernel at 11 (with spills)
    and did not finish in 8 at 21. Float32, 2-D and 3-D; the limit is generous (about 1 minute
    here)."""
    out = _compile_check("--quick", "--k", "10", "--dtype", "fp32", "--window", "11", "21", timeout=400)
    assert out.count("window=11") >= 6 and out.count("window=21") >= 6


def test_kernels_compile_as_launched_without_boundary_spills():
    """Compiled through Triton's own argument binder, as a launch compiles them (sizes equal to
    1 become constants, alignment hints: scripts/triton_compile_check.py --launch), on shapes
    down to 3x5x7 and batch 1: the boundary gradient kernel with a window of 7 spilled 7.9 KB in
    half precision at K=100 on maps 16 wide while the signature-based check saw none, and with
    a window of 5 beside blocks of 128 channels (K=300) 2.1 KB: its rows are unrolled for
    windows up to 5 and fewer than 128 channels a block only. The joint-count backward may
    spill a few bytes on 3-D masked maps (8-12 B here, next to the kilobytes a tile loads), the
    uncertainty pass 8 B at K=300. About 1 minute."""
    out = _compile_check("--launch", "--k", "100", "--dtype", "fp16", "--window", "7", "--max-spill", "32")
    boundary = [line for line in out.splitlines() if "window=" in line and "_kernel" in line]
    assert any("window=7" in line for line in boundary) and any("shape=16x16," in line for line in boundary)
    assert not [line for line in boundary if not line.startswith("ok ")], out[-4000:]
    assert "B=1" in out and "shape=3x5x7" in out
    out = _compile_check("--launch", "--ops", "boundary", "--k", "300", "--dtype", "fp16",
                         "--window", "5", "7", "--max-spill", "32")
    gradient = [line for line in out.splitlines() if "_boundary_grad_kernel" in line]
    assert {"window=5", "window=7"} <= {part for line in gradient for part in line.replace("]", ",").split(",")}
    assert any("shape=16x16," in line and "K_PAD=128" in line for line in gradient)
    assert "_joint_counts" not in out
    assert not [line for line in gradient if not line.startswith("ok ")], out[-4000:]


def test_the_compile_check_names_32_bit_products_of_a_size():
    """What the --wide check fails on, read from Triton's IR: a size argument times anything in
    32 bits (as the edge map's (H - 1) W and the box sums' dy W were), not 64-bit products or
    32-bit ones of other values."""
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
    try:
        from triton_compile_check import _narrow_size_products
    finally:
        sys.path.pop(0)
    ttir = "\n".join([
        "%before_y_26 = arith.muli %before_y_25, %W : i32 loc(#loc123)",
        "%at_420 = arith.muli %W, %c2_i32 : i32 loc(#loc414)",
        "%3 = arith.muli %W, %c2_i64 : i64 loc(#loc9)",
        "%4 = arith.muli %tiles_z, %tiles_y : i32 loc(#loc10)",
        "%5 = arith.muli %r, %cst_9 : tensor<512xi32> loc(#loc11)",
        "%6 = arith.muli %N_2, %H : tensor<64xi32> loc(#loc12)",
    ])
    found = _narrow_size_products(ttir)
    assert [line.split(" = ")[0] for line in found] == ["%before_y_26", "%at_420", "%6"]


def test_64_bit_index_kernels_compile_for_h100_without_gpu():
    """The WIDE=True variants (a sample of more than 2^31 - 2^16 elements) compile too; their 64-bit
    offsets and coordinates cost a few registers, and where that tips a kernel over 255, a spill
    of up to 32 bytes is accepted (next to the gigabytes such a launch moves). No variant multiplies a size (D, H, W, N: each
    fits in 32 bits) in 32 bits: a row offset dy W or a wrap-around (H - 1) W need not."""
    out = _compile_check("--quick", "--wide", "--max-spill", "32", "--k", "10", "--dtype", "bf16", "fp32")
    assert out.count("wide=True") >= 20
