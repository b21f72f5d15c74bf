"""The `triton` backend against the plain-PyTorch reference (docs/contract.md §3, §5, §8).

Without a GPU the kernels run on CPU tensors under Triton's interpreter, which has to be switched
on before triton is first imported (conftest.py does the same). The interpreter pays
milliseconds per tile and offset, so shapes are small and the tile size is lowered explicitly
where a case needs several tiles. On a GPU machine the same tests run compiled on CUDA tensors.
"""
import os

if not os.path.exists("/dev/nvidiactl"):  # no GPU: Triton kernels run in the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from helpers import random_image, random_mask, random_maps  # noqa: E402

import bimi_kernels  # noqa: E402
from bimi_kernels import backends, reference  # noqa: E402
from bimi_kernels.offsets import flatten, make_offsets  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_REASON = backends.unavailable_reason("triton", DEVICE)
if _REASON is not None:
    pytest.skip(f"triton backend unavailable on {DEVICE}: {_REASON}", allow_module_level=True)

from bimi_kernels.triton import boundary, joint  # noqa: E402
from bimi_kernels.triton.backend import BACKEND  # noqa: E402

# the interpreter indexes with 1-element arrays, which numpy >= 1.25 warns about on every step
pytestmark = pytest.mark.filterwarnings(
    "ignore:Conversion of an array with ndim > 0:DeprecationWarning"
)

F64, F32 = torch.float64, torch.float32
# relative tolerance (against the largest reference magnitude) per accumulation dtype,
# docs/contract.md §8
RTOL = {F64: 1e-10, F32: 1e-5}


def assert_close_rel(actual, expected, rtol, what):
    actual, expected = actual.double(), expected.double()
    scale = expected.abs().max().clamp_min(1e-30)
    error = ((actual - expected).abs().max() / scale).item()
    assert error <= rtol, f"{what}: relative error {error:.3g} > {rtol:g}"


def make_inputs(shape, dtype, masked, seed=0):
    p1, p2 = random_maps(shape, dtype=dtype, seed=seed, device=DEVICE)
    mask = None
    if masked:
        mask = random_mask(shape, seed=seed + 2, keep=0.7, device=DEVICE)[:, 0]
        mask = mask.to(dtype).contiguous()
    return p1, p2, mask


def check_low_precision_rule(what, ours, theirs, truth):
    """docs/contract.md §8: the kernel's error against the float64 result is at most twice the
    reference's own error in the low-precision dtype, plus a small absolute floor."""
    truth = truth.double()
    floor = 1e-6 * truth.abs().max().item()
    error = (ours.double() - truth).abs().max().item()
    reference_error = (theirs.double() - truth).abs().max().item()
    assert error <= 2 * reference_error + floor, f"{what}: {error:.3g} vs {reference_error:.3g}"


def random_grad_j(n_offsets, k, dtype, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n_offsets, k, k), generator=g, dtype=torch.float64).to(DEVICE, dtype)


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
    "2d-K2-r0": ((2, 2, 7, 9), 0, 1, False, None, F64),
    "2d-K3-r1-mask-7tiles": ((2, 3, 9, 11), 1, 1, True, 32, F64),
    "2d-K10-r2": ((2, 10, 11, 13), 2, 1, False, None, F64),
    "2d-K17-r1-dilation2-mask": ((1, 17, 13, 10), 1, 2, True, 32, F64),
    "2d-K3-list-mask": ((2, 3, 8, 9), [(0, 0), (0, 1), (1, 0), (-2, 3), (5, -7)], 1, True, 64, F64),
    "2d-K3-r1-larger-than-tile": ((2, 3, 37, 41), 1, 1, True, None, F64),
    "2d-K10-r1-mask-f32": ((2, 10, 9, 11), 1, 1, True, None, F32),
    "3d-K3-r1-mask-4tiles": ((2, 3, 5, 6, 7), 1, 1, True, 128, F64),
    "3d-K10-r0": ((2, 10, 4, 5, 6), 0, 1, False, None, F64),
    "3d-K17-r2": ((1, 17, 5, 6, 7), 2, 1, False, None, F64),
    "3d-K4-r1-dilation2": ((1, 4, 5, 6, 7), 1, 2, False, None, F64),
    "3d-K3-list-mask": ((2, 3, 4, 5, 6), [(0, 0, 0), (1, -1, 2), (-3, 0, 1)], 1, True, 64, F64),
    "3d-K3-r1-f32": ((2, 3, 5, 6, 7), 1, 1, False, None, F32),
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


def test_joint_counts_fully_masked_is_zero():
    p1, p2, _ = make_inputs((2, 3, 6, 7), F64, False)
    mask = torch.zeros((2, 6, 7), dtype=F64, device=DEVICE)
    offsets = make_offsets(1, 2)
    counts = joint.joint_counts(p1, p2, flatten(offsets), mask)
    assert torch.count_nonzero(counts) == 0
    grads = joint.joint_counts_backward(torch.ones_like(counts), p1, p2, flatten(offsets), mask)
    assert all(torch.count_nonzero(g) == 0 for g in grads)


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


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_joint_counts_low_precision_rule(dtype):
    """docs/contract.md §8: error vs the float64 reference <= 2x the reference's own error in
    that dtype, plus a small absolute floor."""
    p1, p2, mask = make_inputs((2, 10, 9, 11), dtype, True)
    offsets = make_offsets(1, 2)
    flat = flatten(offsets)
    exact = [t.double() for t in (p1, p2, mask)]  # the same values, computed in float64

    counts = joint.joint_counts(p1, p2, flat, mask)
    counts_low = reference.joint_counts(p1, p2, offsets, mask)
    counts_64 = reference.joint_counts(*exact[:2], offsets, exact[2])
    grad_j = random_grad_j(len(offsets), 10, F32)
    grads = joint.joint_counts_backward(grad_j, p1, p2, flat, mask)
    grads_low = reference.joint_counts_backward(grad_j, p1, p2, offsets, mask)
    grads_64 = reference.joint_counts_backward(grad_j.double(), *exact[:2], offsets, exact[2])

    check_low_precision_rule("J", counts, counts_low, counts_64)
    for i in range(2):
        check_low_precision_rule(f"dL/dp{i + 1}", grads[i], grads_low[i], grads_64[i])


# ------------------------------------------------------------------------------------------------
# boundary cross-correlation: forward and gradient
# ------------------------------------------------------------------------------------------------
def boundary_inputs(shape, dtype, seed=0):
    p = random_maps(shape, dtype=dtype, seed=seed, device=DEVICE)[0]
    acc = reference.accumulation_dtype(dtype)
    image = random_image(shape, channels=2, dtype=torch.float64, seed=seed + 1, device=DEVICE)
    edge = reference.edge_map(image.to(acc)).contiguous()
    return p, edge


def reference_boundary_gradient(grad_cc, p, edge, window):
    """dL/dp by autograd through the reference forward (independent of any written-out backward)."""
    with torch.enable_grad():
        x = p.detach().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(reference.boundary_cc(x, edge, window), x, grad_cc)
    return grad


BOUNDARY_CASES = {
    # name: (shape, window, dtype, tile_pixels)
    "2d-K3-w5": ((2, 3, 9, 11), 5, F64, None),
    "2d-K10-w3-7tiles": ((2, 10, 13, 17), 3, F64, 64),
    "2d-K4-w1-all-clamped": ((2, 4, 8, 9), 1, F64, None),
    "2d-K2-w5-f32": ((2, 2, 13, 17), 5, F32, None),
    "3d-K17-w3": ((2, 17, 5, 6, 7), 3, F64, None),
    "3d-K2-w5-window-larger-than-depth": ((1, 2, 4, 5, 6), 5, F64, None),
}


@pytest.mark.parametrize("case", list(BOUNDARY_CASES), ids=list(BOUNDARY_CASES))
def test_boundary_cc_matches_reference(case):
    shape, window, dtype, tile_pixels = BOUNDARY_CASES[case]
    p, edge = boundary_inputs(shape, dtype)
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
    p, edge = boundary_inputs(shape, F64, seed=sum(shape))
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


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_boundary_cc_low_precision_rule(dtype):
    p, edge = boundary_inputs((2, 10, 13, 17), dtype)
    exact = p.double()
    cc, u_range = boundary.boundary_cc(p, edge, 5)
    grad = boundary.boundary_cc_backward(torch.tensor(1.0, device=DEVICE), p, edge, u_range, 5)
    cc_low = reference.boundary_cc(p, edge, 5)
    cc_64 = reference.boundary_cc(exact, edge.double(), 5)
    grad_low = reference_boundary_gradient(torch.tensor(1.0, device=DEVICE), p, edge, 5)
    one = torch.tensor(1.0, dtype=F64, device=DEVICE)
    grad_64 = reference_boundary_gradient(one, exact, edge.double(), 5)
    check_low_precision_rule("CC", cc, cc_low, cc_64)
    check_low_precision_rule("dL/dp", grad, grad_low, grad_64)


# ------------------------------------------------------------------------------------------------
# determinism: bitwise-equal reruns
# ------------------------------------------------------------------------------------------------
def test_reruns_are_bitwise_equal():
    p1, p2, mask = make_inputs((2, 10, 19, 23), F32, True)
    flat = flatten(make_offsets(1, 2))
    edge = boundary_inputs((2, 10, 19, 23), F32)[1]

    def run():
        counts = BACKEND.joint_counts(p1, p2, flat, mask)
        grads = BACKEND.joint_counts_backward(torch.ones_like(counts), p1, p2, flat, mask)
        cc, u_range = BACKEND.boundary_cc(p1, edge, 5)
        grad_p = BACKEND.boundary_cc_backward(torch.ones_like(cc), p1, edge, u_range, 5)
        return (counts, *grads, cc, u_range, grad_p)

    for first, second in zip(run(), run()):
        assert torch.equal(first, second)


# ------------------------------------------------------------------------------------------------
# through the public API
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "shape, offsets, window",
    [((2, 4, 9, 11), 1, 5), ((1, 3, 4, 5, 6), [(0, 0, 0), (1, 0, -1)], 3)],
    ids=["2d", "3d"],
)
def test_bimi_loss_matches_reference_backend(shape, offsets, window):
    from bimi_kernels import functional

    image = random_image(shape, channels=1, device=DEVICE)
    mask = random_mask(shape, device=DEVICE)
    results = {}
    for name in ("reference", "triton"):
        p1, p2 = random_maps(shape, device=DEVICE, requires_grad=True)
        loss = functional.bimi_loss(
            p1, p2, image, mask=mask, offsets=offsets, window=window, backend=name
        )
        loss.backward()
        results[name] = (loss.detach(), p1.grad, p2.grad)
    names = ("loss", "dL/dp1", "dL/dp2")
    for what, ours, theirs in zip(names, results["triton"], results["reference"]):
        assert_close_rel(ours, theirs, RTOL[F64], what)


def test_torch_compile_fullgraph_bimi_loss():
    """The triton kernels sit behind the custom ops, so a full graph compiles through them.
    aot_eager traces forward and backward with the fake kernels without a C++ toolchain run."""
    shape = (1, 3, 8, 8)
    image = random_image(shape, dtype=F32, device=DEVICE)
    module = bimi_kernels.BIMILoss(offsets=1, window=3, backend="triton")
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    p1, p2 = random_maps(shape, dtype=F32, device=DEVICE, requires_grad=True)
    loss = compiled(p1, p2, image)
    loss.backward()
    q1, q2 = random_maps(shape, dtype=F32, device=DEVICE, requires_grad=True)
    expected = bimi_kernels.BIMILoss(offsets=1, window=3, backend="reference")(q1, q2, image)
    expected.backward()
    assert_close_rel(loss.detach(), expected.detach(), RTOL[F32], "loss")
    assert_close_rel(p1.grad, q1.grad, RTOL[F32], "dL/dp1")
    assert_close_rel(p2.grad, q2.grad, RTOL[F32], "dL/dp2")


# ------------------------------------------------------------------------------------------------
# the GPU compiler, without a GPU
# ------------------------------------------------------------------------------------------------
def test_kernels_compile_for_h100_without_gpu():
    """Compile every kernel (a representative set of dtypes, K, layouts) for sm_90 with Triton's
    real compiler and ptxas (scripts/triton_compile_check.py --quick), so GPU-only compile errors
    and register spills show up in CPU-only CI too."""
    import subprocess
    import sys

    import triton.backends

    if "nvidia" not in triton.backends.backends:
        pytest.skip("this triton install has no NVIDIA backend to compile with")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run(
        [sys.executable, os.path.join(root, "scripts", "triton_compile_check.py"), "--quick",
         "--k", "10", "--dtype", "bf16", "fp32", "fp64"],
        env=env, cwd=root, capture_output=True, text=True, timeout=1200,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert done.stdout.count("ok ") >= 20
