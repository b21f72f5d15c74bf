"""Every backend's joint-counts kernels (docs/contract.md §3) against the reference."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cases import (
    case_params,
    BF16, F16, F32, F64, JOINT_CASES, JointCase, assert_low_precision_rule, check_joint, cpu,
    joint_inputs, random_grad_j,
)

from bimi_kernels import reference
from bimi_kernels.offsets import flatten, make_offsets

JOINT_PARAMS = case_params(JOINT_CASES)


@pytest.mark.parametrize("name,dtype", JOINT_PARAMS)
def test_joint_counts_match_reference(backend, name, dtype):
    case = JOINT_CASES[name]
    backend.skip_if_too_slow(case)
    p1, p2, mask = joint_inputs(case, dtype, backend.device)
    check_joint(backend.kernels, p1, p2, case.offset_set(), mask)


def test_everything_masked_gives_zero_counts_and_gradients(backend):
    case = JOINT_CASES["2d-K3-r1-all-masked"]
    p1, p2, mask = joint_inputs(case, F64, backend.device)
    flat = flatten(case.offset_set())
    counts = backend.kernels.joint_counts(p1, p2, flat, mask)
    assert torch.count_nonzero(counts) == 0
    grads = backend.kernels.joint_counts_backward(torch.ones_like(counts), p1, p2, flat, mask)
    assert all(torch.count_nonzero(g) == 0 for g in grads)


def test_more_than_4096_offsets(backend):
    """A 2-D window of radius 32 has 65^2 = 4225 offsets: every backend serves it."""
    case = JointCase((1, 2, 33, 34), 32, interpreter=False)
    backend.skip_if_too_slow(case)
    p1, p2, mask = joint_inputs(case, F64, backend.device)
    check_joint(backend.kernels, p1, p2, case.offset_set(), mask)


def test_inputs_are_not_modified(backend):
    case = JOINT_CASES["2d-K3-r1-mask"]
    p1, p2, mask = joint_inputs(case, F32, backend.device)
    before = [t.clone() for t in (p1, p2, mask)]
    flat = flatten(case.offset_set())
    counts = backend.kernels.joint_counts(p1, p2, flat, mask)
    backend.kernels.joint_counts_backward(torch.ones_like(counts), p1, p2, flat, mask)
    assert all(torch.equal(a, b) for a, b in zip(before, (p1, p2, mask)))


@pytest.mark.parametrize("dtype", [F16, BF16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("name", ["2d-K10-r2", "3d-K3-r1-mask", "2d-K3-r1-weights", "2d-K33-r0"])
def test_low_precision_rule(backend, name, dtype):
    """docs/contract.md §8: float16/bfloat16 maps accumulate in float32; the error against the
    float64 result on the same values is at most twice the reference's own in that dtype."""
    case = JOINT_CASES[name]
    p1, p2, mask = joint_inputs(case, dtype, backend.device)
    offsets = case.offset_set()
    flat = flatten(offsets)
    exact = [None if t is None else t.cpu().double() for t in (p1, p2, mask)]
    low = [cpu(t) for t in (p1, p2, mask)]

    counts = backend.kernels.joint_counts(p1, p2, flat, mask)
    assert counts.dtype == F32
    assert_low_precision_rule(
        "J", counts, reference.joint_counts(low[0], low[1], offsets, low[2]),
        reference.joint_counts(exact[0], exact[1], offsets, exact[2]),
    )
    grad_j = random_grad_j(len(offsets), case.shape[1], F32, backend.device)
    grads = backend.kernels.joint_counts_backward(grad_j, p1, p2, flat, mask)
    own = reference.joint_counts_backward(grad_j.cpu(), low[0], low[1], offsets, low[2])
    truth = reference.joint_counts_backward(grad_j.cpu().double(), exact[0], exact[1], offsets, exact[2])
    for i in range(2):
        assert grads[i].dtype == dtype
        assert_low_precision_rule(f"dL/dp{i + 1}", grads[i], own[i], truth[i], backend.interpreted)


@st.composite
def joint_problems(draw, small: bool):
    ndim = draw(st.sampled_from([2, 3]))
    limit = (9 if ndim == 2 else 5) if small else (24 if ndim == 2 else 7)
    spatial = tuple(draw(st.integers(1, limit), label=f"size{d}") for d in range(ndim))
    k = draw(st.sampled_from([2, 3, 10, 17, 40] if not small else [2, 3, 17]), label="K")
    shape = (draw(st.integers(1, 2), label="batch"), k) + spatial
    if draw(st.booleans(), label="explicit"):
        offset = st.tuples(*[st.integers(-(size - 1), size - 1) for size in spatial])
        offsets = tuple(draw(st.lists(offset, min_size=1, max_size=4), label="offsets"))
        dilation = 1
    else:
        dilation = draw(st.integers(1, 2), label="dilation")
        radius = min(draw(st.integers(0, 3), label="radius"), *[(size - 1) // dilation for size in spatial])
        offsets = radius
    mask = draw(st.sampled_from(["none", "binary", "weights"]), label="mask")
    dtype = draw(st.sampled_from([F64, F32]), label="dtype")
    return JointCase(shape, offsets, dilation, mask), dtype, draw(st.integers(0, 99), label="seed")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_joint_counts_property(backend, data):
    case, dtype, seed = data.draw(joint_problems(small=backend.interpreted))
    p1, p2, mask = joint_inputs(case, dtype, backend.device, seed)
    check_joint(backend.kernels, p1, p2, make_offsets(case.offsets, len(case.shape) - 2, case.dilation), mask)
