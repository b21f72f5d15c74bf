"""Every backend's boundary-term kernels (docs/contract.md §5) and fused edge map against the
reference."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cases import (
    BF16, BOUNDARY_CASES, EDGE_CASES, EDGE_RTOL, F16, F32, F64, BoundaryCase, assert_relative, boundary_inputs,
    case_params, check_boundary, edge_image, run_kernels,
)

from bimi_kernels import reference
from bimi_kernels.numerics import accumulation_dtype

BOUNDARY_PARAMS = case_params(BOUNDARY_CASES)


@pytest.mark.parametrize("name,dtype", BOUNDARY_PARAMS)
def test_boundary_matches_reference(backend, name, dtype):
    case = BOUNDARY_CASES[name]
    backend.skip_if_too_slow(case)
    p, edge = boundary_inputs(case, dtype, backend.device)
    check_boundary(backend.kernels, p, edge, case.window)


@pytest.mark.parametrize("dtype", [F16, BF16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("name", ["2d-K10-w3", "3d-K3-w3"])
def test_low_precision_rule(backend, name, dtype):
    case = BOUNDARY_CASES[name]
    p, edge = boundary_inputs(case, dtype, backend.device)
    check_boundary(backend.kernels, p, edge, case.window, truncating_cast=backend.interpreted)


def test_inputs_are_not_modified(backend):
    p, edge = boundary_inputs(BOUNDARY_CASES["2d-K3-w3"], F32, backend.device)
    before = (p.clone(), edge.clone())
    run_kernels(backend.kernels, p, edge, 3, 1.0)
    assert torch.equal(before[0], p) and torch.equal(before[1], edge)


@st.composite
def boundary_problems(draw, small: bool):
    ndim = draw(st.sampled_from([2, 3]))
    limit = (12 if ndim == 2 else 5) if small else (30 if ndim == 2 else 8)
    spatial = tuple(draw(st.integers(1, limit), label=f"size{d}") for d in range(ndim))
    shape = (draw(st.integers(1, 2), label="batch"), draw(st.sampled_from([2, 3, 10, 17]), label="K")) + spatial
    return BoundaryCase(shape, draw(st.sampled_from([1, 3, 5]), label="window")), draw(st.integers(0, 99), label="seed")


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_boundary_property(backend, data):
    case, seed = data.draw(boundary_problems(small=backend.interpreted))
    p, edge = boundary_inputs(case, F64, backend.device, seed)
    check_boundary(backend.kernels, p, edge, case.window)


@pytest.mark.parametrize("name", list(EDGE_CASES))
def test_edge_map_matches_reference(backend, name):
    """The backend's fused edge map where it has one, else the torch definition (via the op)."""
    case = EDGE_CASES[name]
    image = edge_image(case, backend.device)
    got = torch.ops.bimi.edge_map(image, case.gamma, backend.name)
    expected = reference.edge_map(image.cpu(), case.gamma)
    assert got.shape == expected.shape and got.dtype == expected.dtype and got.device == image.device
    assert_relative(got, expected, EDGE_RTOL[accumulation_dtype(case.dtype)], "edge map")


@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")  # Triton's interpreter
@pytest.mark.parametrize("dtype", [F32, F64], ids=["float32", "float64"])
def test_a_nan_propagates_as_in_the_reference(backend, dtype):
    """A NaN in the image makes its sample's edge map NaN, and a NaN in a map its sample's
    uncertainty range, as torch's amin/amax do in the reference (min/max instructions that skip
    a NaN used to give a finite, wrong loss); the loss is NaN on every backend."""
    shape = (2, 3, 10, 12)
    generator = torch.Generator().manual_seed(0)
    p = torch.randn(shape, generator=generator, dtype=dtype).softmax(1).to(backend.device)
    image = torch.rand((2, 1) + shape[2:], generator=generator, dtype=dtype)
    image[0, 0, 3, 4] = float("nan")
    image = image.to(backend.device)
    edge = torch.ops.bimi.edge_map(image, 0.75, backend.name)
    expected = reference.edge_map(image.cpu(), 0.75)
    assert torch.equal(torch.isnan(edge).cpu(), torch.isnan(expected))
    assert torch.isnan(edge[0]).all() and not torch.isnan(edge[1]).any()

    clean_edge = torch.ops.bimi.edge_map(image.nan_to_num(0.5), 0.75, backend.name)
    for nan_map in (False, True):
        q = p.clone()
        if nan_map:
            q[1, 0, 5, 6] = float("nan")
        cc, u_range = torch.ops.bimi.boundary_cc(q, edge if not nan_map else clean_edge, 5, backend.name)
        assert torch.isnan(cc), f"nan {'map' if nan_map else 'image'}: a finite CC"
        if nan_map:
            assert torch.isnan(u_range[1]).all() and not torch.isnan(u_range[0]).any()
