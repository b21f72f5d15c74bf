"""Every backend's joint-counts kernels (docs/contract.md §3) against the reference."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cases import BF16, F16, F32, F64, JOINT_CASES, JointCase, case_params, check_joint, joint_inputs

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


@pytest.mark.parametrize("case", [JointCase((1, 2, 33, 34), 32, mask="binary", interpreter=False),
                                  JointCase((1, 2, 9, 9, 10), 8, interpreter=False)], ids=["2d-r32", "3d-r8"])
def test_more_than_4096_offsets(backend, case):
    """A 2-D window of radius 32 has 65^2 = 4225 offsets, a 3-D one of radius 8 17^3 = 4913:
    every backend serves them (the CPU kernels once refused more than 4096)."""
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
    check_joint(backend.kernels, p1, p2, case.offset_set(), mask, truncating_cast=backend.interpreted)


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
