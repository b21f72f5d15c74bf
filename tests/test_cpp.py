"""The `cpp` backend (C++ CPU kernels of csrc/, bimi_kernels._C) against the plain-PyTorch
reference (SPEC §3, §5, §8), plus determinism, low precision and the public API through it.

The checks are written for any device and kernel set; tests/test_cuda.py runs the same ones on
CUDA tensors with the `cuda` backend.
"""
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import random_image, random_mask, random_maps

import bimi_kernels
from bimi_kernels import backends, reference
from bimi_kernels.native import CPP_BACKEND, CUDA_BACKEND
from bimi_kernels.offsets import flatten, make_offsets

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
# relative tolerance (against the largest reference magnitude) per accumulation dtype, SPEC §8
RTOL = {F64: 1e-10, F32: 1e-5}


def relative_error(actual, expected):
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def assert_close_rel(actual, expected, rtol, what):
    error = relative_error(actual, expected)
    assert error <= rtol, f"{what}: relative error {error:.3g} > {rtol:g}"


def make_inputs(shape, dtype, masked, device, seed=0):
    p1, p2 = random_maps(shape, dtype=dtype, seed=seed, device=device)
    mask = None
    if masked:
        mask = random_mask(shape, seed=seed + 2, keep=0.7, device=device)[:, 0].to(dtype).contiguous()
    return p1, p2, mask


def random_grad_j(n_offsets, k, dtype, device, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n_offsets, k, k), generator=g, dtype=torch.float64).to(device, dtype)


def edge_for(shape, device, dtype=F64, seed=1):
    return reference.edge_map(random_image(shape, channels=2, seed=seed)).to(device, dtype)


def check_joint(kernels, p1, p2, offsets, mask, rtol):
    """Forward and backward of the joint counts against the reference (computed on CPU)."""
    flat = flatten(offsets)
    counts = kernels.joint_counts(p1, p2, flat, mask)
    cpu = lambda t: None if t is None else t.cpu()  # noqa: E731
    expected = reference.joint_counts(cpu(p1), cpu(p2), offsets, cpu(mask))
    assert counts.shape == expected.shape and counts.dtype == expected.dtype
    assert counts.device == p1.device
    assert_close_rel(counts.cpu(), expected, rtol, "J")

    grad_j = random_grad_j(len(offsets), p1.shape[1], counts.dtype, p1.device)
    grad_p1, grad_p2 = kernels.joint_counts_backward(grad_j, p1, p2, flat, mask)
    expected_p1, expected_p2 = reference.joint_counts_backward(
        grad_j.cpu(), cpu(p1), cpu(p2), offsets, cpu(mask)
    )
    assert grad_p1.dtype == p1.dtype and grad_p2.dtype == p2.dtype
    assert grad_p1.shape == p1.shape and grad_p2.shape == p2.shape
    assert_close_rel(grad_p1.cpu(), expected_p1, rtol, "dL/dp1")
    assert_close_rel(grad_p2.cpu(), expected_p2, rtol, "dL/dp2")


def reference_boundary(p, edge, window):
    """CC and dCC/dp of the reference (autograd), on CPU."""
    x = p.detach().cpu().requires_grad_(True)
    cc = reference.boundary_cc(x, edge.cpu(), window)
    (grad,) = torch.autograd.grad(cc, x)
    return cc.detach(), grad


def kernel_boundary(kernels, p, edge, window, grad_scale=1.0):
    cc, u_range = kernels.boundary_cc(p, edge, window)
    grad_cc = torch.tensor(grad_scale, dtype=cc.dtype, device=p.device)
    grad = kernels.boundary_cc_backward(grad_cc, p, edge, u_range, window)
    return cc, u_range, grad


def check_boundary(kernels, p, edge, window):
    """CC, u_range and dCC/dp against the reference. float64 to 1e-10; float32 within twice the
    reference's own float32 error against float64 (box sums cancel: S(U^2) - S(U)^2 / n) or 1e-5."""
    cc, u_range, grad = kernel_boundary(kernels, p, edge, window, grad_scale=0.5)
    assert cc.dim() == 0 and cc.dtype == reference.accumulation_dtype(p.dtype)
    assert u_range.shape == (p.shape[0], 2) and grad.shape == p.shape and grad.dtype == p.dtype
    u = reference.uncertainty_map(p.cpu()).flatten(1)
    assert_close_rel(u_range.cpu(), torch.stack([u.min(1).values, u.max(1).values], 1), RTOL[cc.dtype], "u_range")
    ref_cc, ref_grad = reference_boundary(p, edge, window)
    if p.dtype == F64:
        assert_close_rel(cc.cpu(), ref_cc, 1e-10, "CC")
        assert_close_rel(grad.cpu(), 0.5 * ref_grad, 1e-10, "dCC/dp")
        return
    cc64, grad64 = reference_boundary(p.double(), edge.double(), window)
    for what, got, own, exact in (("CC", cc, ref_cc, cc64), ("dCC/dp", grad / 0.5, ref_grad, grad64)):
        bound = max(2 * relative_error(own, exact), RTOL[F32])
        error = relative_error(got.cpu(), exact)
        assert error <= bound, f"{what}: relative error {error:.3g} > {bound:.3g}"


# ------------------------------------------------------------------------------------------------
# the backend objects
# ------------------------------------------------------------------------------------------------
def test_cpp_backend_is_registered_and_auto_picks_it(monkeypatch):
    monkeypatch.delenv("BIMI_BACKEND", raising=False)
    assert CPP_BACKEND.name == "cpp" and CPP_BACKEND.devices == frozenset({"cpu"})
    assert bimi_kernels.available_backends("cpu")["cpp"] is None
    assert backends.resolve("auto", "cpu") == "cpp"
    for op in ("joint_counts", "joint_counts_backward", "boundary_cc", "boundary_cc_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"bimi_C::{op}", "CPU")


def test_cuda_backend_says_why_it_is_unavailable():
    assert CUDA_BACKEND.name == "cuda" and CUDA_BACKEND.devices == frozenset({"cuda"})
    reason = CUDA_BACKEND.unavailable_reason("cuda")
    if not torch.cuda.is_available():
        assert isinstance(reason, str) and reason
    assert "cuda" in backends.unavailable_reason("cuda", "cpu")  # serves CUDA tensors only


# ------------------------------------------------------------------------------------------------
# joint counts: fixed table
# ------------------------------------------------------------------------------------------------
JOINT_CASES = [
    # shape, offsets, dilation, masked
    ((2, 3, 9, 11), 1, 1, False),
    ((2, 3, 9, 11), 1, 1, True),
    ((1, 2, 3, 4), 1, 1, True),  # smaller than one tile and one vector
    ((2, 10, 20, 37), 3, 1, True),  # several tiles, a ragged last vector
    ((1, 17, 19, 23), 2, 2, False),
    ((1, 40, 12, 21), 0, 1, True),
    ((1, 10, 18, 30), [(0, 0), (2, -5), (-7, 3), (0, 29)], 1, True),
    ((2, 3, 5, 6, 7), 1, 1, True),
    ((1, 10, 4, 9, 10), [(0, 0, 0), (1, -2, 3), (-3, 0, -1)], 1, False),
    ((1, 2, 6, 11, 9), 1, 2, True),
    # rows of whole vectors without a mask: the backward writes the gradient in place
    ((2, 10, 20, 32), 1, 1, False),
    ((1, 3, 3, 5, 16), 1, 1, False),
]


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("shape,offsets,dilation,masked", JOINT_CASES)
def test_joint_counts_match_reference(shape, offsets, dilation, masked, dtype):
    p1, p2, mask = make_inputs(shape, dtype, masked, "cpu")
    check_joint(CPP_BACKEND, p1, p2, make_offsets(offsets, len(shape) - 2, dilation), mask, RTOL[dtype])


def test_generic_and_avx2_loops_agree(monkeypatch):
    """The baseline-ISA build of the inner loops (BIMI_CPU_ISA=generic) against the reference too."""
    monkeypatch.setenv("BIMI_CPU_ISA", "generic")
    for shape, offsets, dilation, masked in (JOINT_CASES[3], JOINT_CASES[7], JOINT_CASES[-2]):
        for dtype in (F64, F32):
            p1, p2, mask = make_inputs(shape, dtype, masked, "cpu")
            check_joint(CPP_BACKEND, p1, p2, make_offsets(offsets, len(shape) - 2, dilation), mask, RTOL[dtype])
    for shape, window in (((2, 3, 70, 65), 5), ((1, 2, 9, 30, 20), 3)):
        for dtype in (F64, F32):
            p, _ = random_maps(shape, dtype=dtype, seed=4)
            check_boundary(CPP_BACKEND, p, edge_for(shape, "cpu", reference.accumulation_dtype(dtype)), window)
    for shape, dtype in (((2, 3, 9, 17), F64), ((2, 1, 5, 9, 11), F32)):
        image = random_image(shape, channels=shape[1], dtype=dtype, seed=3)
        assert_close_rel(CPP_BACKEND.edge_map(image, 0.75), reference.edge_map(image, 0.75),
                         1e-12 if dtype == F64 else 1e-6, "edge map")


@settings(max_examples=int(os.environ.get("BIMI_CPP_EXAMPLES", "25")))
@given(
    data=st.data(),
    ndim=st.sampled_from([2, 3]),
    k=st.sampled_from([2, 3, 10, 17, 40]),
    radius=st.integers(0, 3),
    dilation=st.integers(1, 2),
    explicit=st.booleans(),
    masked=st.booleans(),
    dtype=st.sampled_from([F64, F32]),
)
def test_joint_counts_property(data, ndim, k, radius, dilation, explicit, masked, dtype):
    if ndim == 3:
        radius = min(radius, 1)
        k = min(k, 10)
    reach = radius * dilation
    sizes = [data.draw(st.integers(reach + 1, reach + (6 if ndim == 3 else 24)), label=f"size{d}") for d in range(ndim)]
    if explicit:
        count = data.draw(st.integers(1, 5), label="count")
        offsets = [
            tuple(data.draw(st.integers(-(s - 1), s - 1), label="d") for s in sizes) for _ in range(count)
        ]
    else:
        offsets = make_offsets(radius, ndim, dilation)
    shape = (data.draw(st.integers(1, 2), label="batch"), k, *sizes)
    p1, p2, mask = make_inputs(shape, dtype, masked, "cpu", seed=data.draw(st.integers(0, 99), label="seed"))
    check_joint(CPP_BACKEND, p1, p2, make_offsets(offsets, ndim), mask, RTOL[dtype])


# ------------------------------------------------------------------------------------------------
# boundary term
# ------------------------------------------------------------------------------------------------
BOUNDARY_CASES = [
    ((2, 3, 9, 11), 3),
    ((2, 10, 37, 41), 5),  # several regions of rows
    ((1, 4, 6, 5), 7),  # window larger than the map
    ((1, 3, 8, 8), 1),
    ((2, 3, 5, 6, 7), 3),
    ((1, 10, 9, 18, 10), 5),  # several regions of planes
    ((2, 3, 70, 65), 5),  # several chunks of the uncertainty map, ragged last vectors
    ((1, 2, 9, 30, 20), 3),  # the same in 3-D
    ((1, 3, 20, 24), 11),  # windows of more than 7 rows
]


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("shape,window", BOUNDARY_CASES)
def test_boundary_matches_reference(shape, window, dtype):
    p, _ = random_maps(shape, dtype=dtype, seed=4)
    check_boundary(CPP_BACKEND, p, edge_for(shape, "cpu", reference.accumulation_dtype(dtype)), window)


@pytest.mark.parametrize("dtype", [F64, F32])
def test_boundary_uncertainty_range_spans_every_chunk(dtype):
    """The per-sample min and max of U come from every chunk of the map: here the minimum (a
    one-hot pixel, U = 0) is the last pixel and the maximum (uniform, U = log K) the first."""
    shape = (2, 3, 70, 65)
    p, _ = random_maps(shape, dtype=dtype, seed=6)
    p[:, :, -1, -1] = torch.tensor([1.0, 0.0, 0.0], dtype=dtype)
    p[:, :, 0, 0] = 1.0 / 3
    check_boundary(CPP_BACKEND, p, edge_for(shape, "cpu", reference.accumulation_dtype(dtype)), 5)


@settings(max_examples=int(os.environ.get("BIMI_CPP_EXAMPLES", "15")))
@given(
    data=st.data(),
    ndim=st.sampled_from([2, 3]),
    k=st.sampled_from([2, 3, 10, 17]),
    window=st.sampled_from([1, 3, 5]),
)
def test_boundary_property(data, ndim, k, window):
    sizes = [data.draw(st.integers(1, 8 if ndim == 3 else 30), label=f"size{d}") for d in range(ndim)]
    shape = (data.draw(st.integers(1, 2), label="batch"), k, *sizes)
    p, _ = random_maps(shape, seed=data.draw(st.integers(0, 99), label="seed"))
    check_boundary(CPP_BACKEND, p, edge_for(shape, "cpu"), window)


# ------------------------------------------------------------------------------------------------
# edge map (the cpp backend's fused one)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "shape,dtype,gamma",
    [
        ((4, 1, 32, 40), F32, 0.75),
        ((2, 3, 9, 17), F64, 0.75),  # three channels: their mean
        ((2, 2, 5, 9, 11), F32, 1.5),  # 3-D
        ((1, 1, 1, 7), F32, 0.75),  # one row: its difference along y is zero
        ((2, 1, 16, 33), F16, 0.3),  # half image, computed in float32
    ],
)
def test_edge_map_matches_reference(shape, dtype, gamma):
    """float32: exp(gamma log v) with the vectorised log and exp, within 1e-6 of the reference's
    pow relative to the largest value (1); float64: std::pow, 1e-12."""
    image = random_image(shape, channels=shape[1], dtype=dtype, seed=3)
    got = CPP_BACKEND.edge_map(image, gamma)
    expected = reference.edge_map(image, gamma)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    assert_close_rel(got, expected, 1e-12 if dtype == F64 else 1e-6, "edge map")


# ------------------------------------------------------------------------------------------------
# determinism: thread count and reruns
# ------------------------------------------------------------------------------------------------
def determinism_inputs(device, dtype):
    """Inputs made once: torch's own ops (the edge map's pow, say) may round differently with
    another thread count, and only the kernels are under test here."""
    shape = (2, 10, 45, 37)
    p1, p2, mask = make_inputs(shape, dtype, True, device, seed=7)
    acc = reference.accumulation_dtype(dtype)
    p3 = random_maps((1, 3, 6, 21, 19), dtype=dtype, seed=8, device=device)[0]
    return dict(
        p1=p1, p2=p2, mask=mask, offsets=flatten(make_offsets(2, 2)), grad_j=random_grad_j(25, 10, acc, device),
        edge=edge_for(shape, device, acc), p3=p3, edge3=edge_for(p3.shape, device, acc),
    )


def all_outputs(kernels, x):
    counts = kernels.joint_counts(x["p1"], x["p2"], x["offsets"], x["mask"])
    grads = kernels.joint_counts_backward(x["grad_j"], x["p1"], x["p2"], x["offsets"], x["mask"])
    return (counts, *grads, *kernel_boundary(kernels, x["p1"], x["edge"], 5),
            *kernel_boundary(kernels, x["p3"], x["edge3"], 3))


def assert_bitwise_equal(first, second):
    for a, b in zip(first, second):
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("dtype", [F32, F64])
def test_bitwise_identical_for_one_and_two_threads_and_reruns(dtype):
    inputs = determinism_inputs("cpu", dtype)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = all_outputs(CPP_BACKEND, inputs)
        torch.set_num_threads(2)
        double = all_outputs(CPP_BACKEND, inputs)
        again = all_outputs(CPP_BACKEND, inputs)
    finally:
        torch.set_num_threads(threads)
    assert_bitwise_equal(single, double)
    assert_bitwise_equal(double, again)


# ------------------------------------------------------------------------------------------------
# float16 / bfloat16: accumulate in float32, error at most twice the reference's own
# ------------------------------------------------------------------------------------------------
def check_half_precision(kernels, device, dtype):
    shape = (2, 10, 20, 27)
    offsets = make_offsets(1, 2)
    p1, p2, mask = make_inputs(shape, F64, True, "cpu", seed=5)
    half = [t.to(device, dtype) for t in (p1, p2, mask)]
    flat = flatten(offsets)
    floor = 1e-6

    counts = kernels.joint_counts(*half[:2], flat, half[2])
    assert counts.dtype == F32
    exact = reference.joint_counts(p1, p2, offsets, mask)
    own = reference.joint_counts(*[t.cpu() for t in half[:2]], offsets, half[2].cpu())
    assert relative_error(counts.cpu(), exact) <= 2 * relative_error(own, exact) + floor

    grad_j = random_grad_j(len(offsets), 10, F32, device)
    grads = kernels.joint_counts_backward(grad_j, *half[:2], flat, half[2])
    exact_grads = reference.joint_counts_backward(grad_j.cpu().double(), p1, p2, offsets, mask)
    own_grads = reference.joint_counts_backward(grad_j.cpu(), *[t.cpu() for t in half[:2]], offsets, half[2].cpu())
    for got, exact_g, own_g in zip(grads, exact_grads, own_grads):
        assert got.dtype == dtype
        assert relative_error(got.cpu(), exact_g) <= 2 * relative_error(own_g, exact_g) + 1e-3

    edge = edge_for(shape, "cpu")
    cc, _, grad = kernel_boundary(kernels, half[0], edge.to(device, F32), 5)
    assert cc.dtype == F32 and grad.dtype == dtype
    exact_cc, exact_grad = reference_boundary(p1, edge, 5)
    own_cc, own_grad = reference_boundary(half[0].cpu(), edge.float(), 5)
    assert relative_error(cc.cpu(), exact_cc) <= 2 * relative_error(own_cc, exact_cc) + floor
    assert relative_error(grad.cpu(), exact_grad) <= 2 * relative_error(own_grad, exact_grad) + 1e-3


@pytest.mark.parametrize("dtype", [F16, BF16])
def test_half_precision_within_twice_the_reference_error(dtype):
    check_half_precision(CPP_BACKEND, "cpu", dtype)


# ------------------------------------------------------------------------------------------------
# through the public API: gradcheck, torch.compile, opcheck
# ------------------------------------------------------------------------------------------------
def freeze_uncertainty_extremes(p):
    """The min-max normalisation of U is detached, so a finite difference at the pixel holding a
    sample's min or max of U moves the normaliser, which the analytic gradient ignores: hold
    those pixels fixed for gradcheck."""
    u = reference.uncertainty_map(p.detach()).flatten(1)
    keep = torch.ones_like(u)
    rows = torch.arange(u.shape[0], device=p.device)
    keep[rows, u.argmin(1)] = 0
    keep[rows, u.argmax(1)] = 0
    keep = keep.reshape(p.shape[0], 1, *p.shape[2:])
    frozen = p.detach() * (1 - keep)
    return lambda x: x * keep + frozen


def check_gradcheck_bimi_loss(backend, device, shape):
    p1, p2 = random_maps(shape, device=device, requires_grad=True)
    image, mask = random_image(shape, device=device), random_mask(shape, device=device)
    freeze1, freeze2 = freeze_uncertainty_extremes(p1), freeze_uncertainty_extremes(p2)
    loss_fn = bimi_kernels.BIMILoss(offsets=1, window=3, backend=backend)
    f = lambda a, b: loss_fn(freeze1(a), freeze2(b), image, mask)  # noqa: E731
    # fast mode: the analytic and numerical Jacobians projected on random vectors (the full
    # Jacobians cost a loss evaluation per input element through the custom ops)
    assert torch.autograd.gradcheck(f, (p1, p2), fast_mode=True)


@pytest.mark.parametrize("shape", [(2, 3, 6, 7), (1, 3, 4, 5, 6)])
def test_gradcheck_bimi_loss(shape):
    check_gradcheck_bimi_loss("cpp", "cpu", shape)


def check_compile_bimi_loss(backend, device):
    torch._dynamo.reset()
    loss_fn = bimi_kernels.BIMILoss(offsets=1, window=3, backend=backend)
    compiled = torch.compile(loss_fn, fullgraph=True)
    shape = (2, 4, 12, 13)
    image, mask = random_image(shape, dtype=F32, device=device), random_mask(shape, device=device)
    results = []
    for fn in (loss_fn, compiled):
        p1, p2 = random_maps(shape, dtype=F32, device=device, requires_grad=True)
        loss = fn(p1, p2, image, mask)
        loss.backward()
        results.append((loss.detach(), p1.grad, p2.grad))
    for eager, traced in zip(*results):
        torch.testing.assert_close(traced, eager, rtol=1e-5, atol=1e-6)


def test_compile_fullgraph_through_bimi_loss():
    check_compile_bimi_loss("cpp", "cpu")


def check_opcheck(backend, device):
    shape = (2, 3, 7, 8)
    p1, p2, mask = make_inputs(shape, F64, True, device)
    flat = list(flatten(make_offsets(1, 2)))
    edge = edge_for(shape, device)
    a, b = p1.clone().requires_grad_(True), p2.clone().requires_grad_(True)
    torch.library.opcheck(torch.ops.bimi.joint_counts.default, (a, b, flat, mask, backend))
    torch.library.opcheck(torch.ops.bimi.joint_counts.default, (a, b, flat, None, backend))
    torch.library.opcheck(torch.ops.bimi.boundary_cc.default, (a, edge, 3, backend))
    grad_j = random_grad_j(9, 3, F64, device)
    torch.library.opcheck(torch.ops.bimi.joint_counts_backward.default, (grad_j, p1, p2, flat, mask, backend))
    _, u_range = torch.ops.bimi.boundary_cc(p1, edge, 3, backend)
    grad_cc = torch.tensor(1.0, dtype=F64, device=device)
    torch.library.opcheck(torch.ops.bimi.boundary_cc_backward.default, (grad_cc, p1, edge, u_range, 3, backend))


def test_opcheck_custom_ops_with_cpp_backend():
    check_opcheck("cpp", "cpu")
