"""What is specific to the `triton` backend's launchers: explicit tile sizes, the grid split
along partner rows, the backward in two launches, hypothesis over tile choices, and the sm_90
compile of every kernel without a GPU. Everything every backend must do (against the reference,
low precision, determinism, the API) is the conformance suite in tests/backends/, which runs the
Triton kernels too: compiled on CUDA tensors, under Triton's interpreter on CPU tensors
(tests/conftest.py switches it on before triton is first imported)."""
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cases import F32, F64, RTOL, BoundaryCase, JointCase, boundary_inputs, joint_inputs, relative_error
from cases import random_grad_j as _random_grad_j
from helpers import random_maps  # noqa: F401

import bimi_kernels
from bimi_kernels import backends, reference
from bimi_kernels.offsets import flatten, make_offsets

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_REASON = backends.unavailable_reason("triton", DEVICE)
if _REASON is not None:
    pytest.skip(f"triton backend unavailable on {DEVICE}: {_REASON}", allow_module_level=True)

from bimi_kernels.triton import boundary, joint  # noqa: E402
from bimi_kernels.triton.backend import BACKEND  # noqa: E402


def assert_close_rel(actual, expected, rtol, what):
    error = relative_error(actual, expected)
    assert error <= rtol, f"{what}: relative error {error:.3g} > {rtol:g}"


def random_grad_j(n_offsets, k, dtype):
    return _random_grad_j(n_offsets, k, dtype, DEVICE)


def make_inputs(shape, dtype, masked, seed=0):
    return joint_inputs(JointCase(shape, 0, mask="binary" if masked else "none"), dtype, DEVICE, seed)


def tile_of(pixels, ndim):
    """An explicit tile of `pixels` pixels (None: the launcher's choice): 8 wide, then tall,
    then (3-D) deep."""
    if pixels is None:
        return None
    width = min(8, pixels)
    if ndim == 2:
        return (1, pixels // width, width)
    height = min(4, pixels // width)
    return (pixels // (width * height), height, width)


def check_joint(p1, p2, offsets, mask, rtol, tile_pixels=None):
    flat = flatten(offsets)
    tile = tile_of(tile_pixels, p1.dim() - 2)
    counts = joint.joint_counts(p1, p2, flat, mask, tile=tile)
    expected = reference.joint_counts(p1, p2, offsets, mask)
    assert counts.shape == expected.shape and counts.dtype == expected.dtype
    assert_close_rel(counts, expected, rtol, "J")

    grad_j = random_grad_j(len(offsets), p1.shape[1], counts.dtype)
    grad_p1, grad_p2 = joint.joint_counts_backward(grad_j, p1, p2, flat, mask, tile=tile)
    expected_p1, expected_p2 = reference.joint_counts_backward(grad_j, p1, p2, offsets, mask)
    assert grad_p1.dtype == p1.dtype and grad_p2.dtype == p2.dtype
    assert_close_rel(grad_p1, expected_p1, rtol, "dL/dp1")
    assert_close_rel(grad_p2, expected_p2, rtol, "dL/dp2")


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
# joint counts: forward and both gradients
# ------------------------------------------------------------------------------------------------
JOINT_CASES = {
    # name: (shape, offsets (radius or list), dilation, masked, tile_pixels, dtype)
    "2d-K3-r1-mask-7tiles": ((2, 3, 9, 11), 1, 1, True, 32, F64),
    "2d-K17-r1-dilation2-mask": ((1, 17, 13, 10), 1, 2, True, 32, F64),
    "2d-K3-list-mask": ((2, 3, 8, 9), [(0, 0), (0, 1), (1, 0), (-2, 3), (5, -7)], 1, True, 64, F64),
    "2d-K10-r1-mask-f32-tile16": ((2, 10, 9, 11), 1, 1, True, 16, F32),
    "3d-K3-r1-mask-4tiles": ((2, 3, 5, 6, 7), 1, 1, True, 128, F64),
    "3d-K4-r1-dilation2-tile32": ((1, 4, 5, 6, 7), 1, 2, False, 32, F64),
    "3d-K3-list-mask": ((2, 3, 4, 5, 6), [(0, 0, 0), (1, -1, 2), (-3, 0, 1)], 1, True, 64, F64),
    "3d-K3-r1-f32-tile16": ((2, 3, 5, 6, 7), 1, 1, False, 16, F32),
}


@pytest.mark.parametrize("case", list(JOINT_CASES), ids=list(JOINT_CASES))
def test_joint_counts_match_reference(case):
    shape, spec, dilation, masked, tile_pixels, dtype = JOINT_CASES[case]
    p1, p2, mask = make_inputs(shape, dtype, masked)
    offsets = make_offsets(spec, len(shape) - 2, dilation)
    check_joint(p1, p2, offsets, mask, RTOL[dtype], tile_pixels)


@pytest.mark.parametrize("max_rows", [16, 32])
def test_joint_counts_grid_split_along_partner_rows(max_rows):
    """On a GPU the forward grid also splits the |O| K partner rows into chunks (the last one
    padded), each chunk a column of programs."""
    p1, p2, mask = make_inputs((2, 5, 9, 11), F64, True)
    offsets = make_offsets(1, 2)
    config = joint.JointConfig(rows=max_rows, tile_pixels=64, num_warps=4)
    counts = joint.joint_counts(p1, p2, flatten(offsets), mask, config=config, max_programs=3)
    assert_close_rel(counts, reference.joint_counts(p1, p2, offsets, mask), RTOL[F64], "J")


@pytest.mark.parametrize("shape", [(2, 17, 9, 11), (1, 5, 4, 5, 6)], ids=["2d", "3d"])
def test_joint_counts_backward_in_two_launches(shape):
    """The GPU launch config computes dL/dp1 and dL/dp2 in separate launches for K > 16."""
    p1, p2, mask = make_inputs(shape, F64, True)
    offsets = make_offsets(1, len(shape) - 2)
    grad_j = random_grad_j(len(offsets), shape[1], F64)
    flat = flatten(offsets)
    tile = tile_of(64, len(shape) - 2)
    grads = joint.joint_counts_backward(grad_j, p1, p2, flat, mask, tile=tile, split=True)
    expected = reference.joint_counts_backward(grad_j, p1, p2, offsets, mask)
    for i in range(2):
        assert_close_rel(grads[i], expected[i], RTOL[F64], f"dL/dp{i + 1}")


@st.composite
def joint_problems(draw):
    ndim = draw(st.sampled_from([2, 3]))
    spatial = tuple(draw(st.integers(1, 9 if ndim == 2 else 5)) for _ in range(ndim))
    shape = (draw(st.integers(1, 2)), draw(st.integers(2, 18))) + spatial
    offset = st.tuples(*[st.integers(-(size - 1), size - 1) for size in spatial])
    offsets = tuple(draw(st.lists(offset, min_size=1, max_size=3)))
    return shape, offsets, draw(st.booleans()), draw(st.sampled_from([16, 64, None]))


@settings(max_examples=8, deadline=None)
@given(joint_problems())
def test_joint_counts_property(problem):
    shape, offsets, masked, tile_pixels = problem
    p1, p2, mask = make_inputs(shape, F64, masked, seed=sum(shape))
    check_joint(p1, p2, offsets, mask, RTOL[F64], tile_pixels)


# ------------------------------------------------------------------------------------------------
# boundary cross-correlation: forward and gradient
# ------------------------------------------------------------------------------------------------
def local_boundary_inputs(shape, dtype, seed=0):
    return boundary_inputs(BoundaryCase(shape, 3), dtype, DEVICE, seed)


def reference_boundary_gradient(grad_cc, p, edge, window):
    """dL/dp by autograd through the reference forward (independent of any written-out backward)."""
    with torch.enable_grad():
        x = p.detach().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(reference.boundary_cc(x, edge, window), x, grad_cc)
    return grad


BOUNDARY_CASES = {
    # name: (shape, window, dtype, tile_pixels)
    "2d-K3-w5-tile16": ((2, 3, 9, 11), 5, F64, 16),
    "2d-K10-w3-7tiles": ((2, 10, 13, 17), 3, F64, 64),
    "2d-K2-w5-f32-tile32": ((2, 2, 13, 17), 5, F32, 32),
    "3d-K17-w3-tile64": ((2, 17, 5, 6, 7), 3, F64, 64),
}


@pytest.mark.parametrize("case", list(BOUNDARY_CASES), ids=list(BOUNDARY_CASES))
def test_boundary_cc_matches_reference(case):
    shape, window, dtype, tile_pixels = BOUNDARY_CASES[case]
    p, edge = local_boundary_inputs(shape, dtype)
    rtol = RTOL[reference.accumulation_dtype(dtype)]
    tile = tile_of(tile_pixels, len(shape) - 2)
    cc, u_range = boundary.boundary_cc(p, edge, window, tile=tile)
    expected = reference.boundary_cc(p, edge, window)
    u = reference.uncertainty_map(p).flatten(1)
    assert cc.shape == () and cc.dtype == expected.dtype
    assert_close_rel(cc, expected, rtol, "CC")
    assert_close_rel(u_range, torch.stack([u.amin(1), u.amax(1)], 1), rtol, "u_range")

    grad_cc = torch.tensor(1.7, dtype=cc.dtype, device=DEVICE)
    grad = boundary.boundary_cc_backward(grad_cc, p, edge, u_range, window, tile=tile)
    expected_grad = reference_boundary_gradient(grad_cc, p, edge, window)
    assert grad.dtype == p.dtype
    if window == 1:  # every variance is clamped: no gradient anywhere
        assert torch.count_nonzero(grad) == 0 and torch.count_nonzero(expected_grad) == 0
    else:
        assert_close_rel(grad, expected_grad, rtol, "dL/dp")


@st.composite
def boundary_problems(draw):
    ndim = draw(st.sampled_from([2, 3]))
    spatial = tuple(draw(st.integers(1, 12 if ndim == 2 else 5)) for _ in range(ndim))
    shape = (draw(st.integers(1, 2)), draw(st.integers(2, 18))) + spatial
    return shape, draw(st.sampled_from([1, 3, 5])), draw(st.sampled_from([32, None]))


@settings(max_examples=5, deadline=None)
@given(boundary_problems())
def test_boundary_cc_property(problem):
    shape, window, tile_pixels = problem
    p, edge = local_boundary_inputs(shape, F64, seed=sum(shape))
    tile = tile_of(tile_pixels, len(shape) - 2)
    cc, u_range = boundary.boundary_cc(p, edge, window, tile=tile)
    assert_close_rel(cc, reference.boundary_cc(p, edge, window), RTOL[F64], "CC")
    grad_cc = torch.tensor(0.9, dtype=F64, device=DEVICE)
    grad = boundary.boundary_cc_backward(grad_cc, p, edge, u_range, window, tile=tile)
    expected = reference_boundary_gradient(grad_cc, p, edge, window)
    if torch.count_nonzero(expected) == 0:
        assert torch.count_nonzero(grad) == 0
    else:
        assert_close_rel(grad, expected, RTOL[F64], "dL/dp")


# ------------------------------------------------------------------------------------------------
# the GPU compiler, without a GPU
# ------------------------------------------------------------------------------------------------
def _compile_check(*args: str) -> str:
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
        env=env, cwd=root, capture_output=True, text=True, timeout=1200,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done.stdout


def test_kernels_compile_for_h100_without_gpu():
    """Compile every kernel (a representative set of dtypes, K, layouts) for sm_90 with Triton's
    real compiler and ptxas (scripts/triton_compile_check.py --quick), so GPU-only compile errors
    and register spills show up in CPU-only CI too."""
    out = _compile_check("--quick", "--k", "10", "--dtype", "bf16", "fp32", "fp64")
    assert out.count("ok ") >= 20


def test_64_bit_index_kernels_compile_for_h100_without_gpu():
    """The WIDE=True variants (a sample of 2^31 elements or more) compile too; their 64-bit
    offsets cost a few registers, and where that tips a kernel over 255, a spill of up to 16
    bytes is accepted (next to the gigabytes such a launch moves)."""
    out = _compile_check("--quick", "--wide", "--max-spill", "16", "--k", "10", "--dtype", "bf16", "fp32")
    assert out.count("wide=True") >= 20
