"""What is specific to the `cpp` backend (C++ CPU kernels of csrc/, bimi_kernels._C): it is
registered and `auto` picks it on CPU, its baseline-ISA build of the vectorised loops, and its
results' independence of the thread count. Everything every backend must do is checked by the
conformance suite in tests/backends/, which runs the `cpp` backend too."""
import pytest
import torch

from cases import (
    BOUNDARY_CASES, EDGE_CASES, EDGE_RTOL, F32, F64, JOINT_CASES, boundary_inputs, check_boundary,
    check_joint, edge_image, joint_inputs, random_grad_j, relative_error, run_kernels,
)

import bimi_kernels
from bimi_kernels import backends, reference
from bimi_kernels.native import CPP_BACKEND, CUDA_BACKEND
from bimi_kernels.numerics import accumulation_dtype
from bimi_kernels.offsets import flatten, make_offsets


def test_cpp_backend_is_registered_and_auto_picks_it(monkeypatch):
    monkeypatch.delenv("BIMI_BACKEND", raising=False)
    assert CPP_BACKEND.name == "cpp" and CPP_BACKEND.devices == frozenset({"cpu"})
    assert bimi_kernels.available_backends("cpu")["cpp"] is None
    assert backends.resolve("auto", "cpu") == "cpp"
    for op in ("joint_counts", "joint_counts_backward", "boundary_cc", "boundary_cc_backward", "edge_map"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"bimi_C::{op}", "CPU")


def test_cuda_backend_says_why_it_is_unavailable():
    assert CUDA_BACKEND.name == "cuda" and CUDA_BACKEND.devices == frozenset({"cuda"})
    reason = CUDA_BACKEND.unavailable_reason("cuda")
    if not torch.cuda.is_available():
        assert isinstance(reason, str) and reason
    assert "cuda" in backends.unavailable_reason("cuda", "cpu")  # serves CUDA tensors only


@pytest.mark.parametrize("dtype", [F64, F32])
def test_generic_isa_build_matches_reference(monkeypatch, dtype):
    """The baseline-ISA build of the inner loops (BIMI_CPU_ISA=generic) against the reference."""
    monkeypatch.setenv("BIMI_CPU_ISA", "generic")
    for name in ("2d-K10-r3-mask-ragged", "3d-K3-r1-mask", "3d-K3-whole-rows", "2d-K10-sparse-far-rows"):
        case = JOINT_CASES[name]
        p1, p2, mask = joint_inputs(case, dtype, "cpu")
        check_joint(CPP_BACKEND, p1, p2, case.offset_set(), mask)
    for name in ("2d-K3-w5-several-chunks", "3d-K2-w3-several-chunks"):
        p, edge = boundary_inputs(BOUNDARY_CASES[name], dtype, "cpu")
        check_boundary(CPP_BACKEND, p, edge, BOUNDARY_CASES[name].window)
    for name in ("2d-C3-f64-mean-over-channels", "3d-C2-f32-gamma1.5"):
        case = EDGE_CASES[name]
        image = edge_image(case, "cpu")
        error = relative_error(CPP_BACKEND.edge_map(image, case.gamma), reference.edge_map(image, case.gamma))
        assert error <= EDGE_RTOL[accumulation_dtype(case.dtype)]


# ------------------------------------------------------------------------------------------------
# determinism across thread counts (every backend's reruns are checked in tests/backends)
# ------------------------------------------------------------------------------------------------
def all_outputs(x):
    counts = CPP_BACKEND.joint_counts(x["p1"], x["p2"], x["offsets"], x["mask"])
    grads = CPP_BACKEND.joint_counts_backward(x["grad_j"], x["p1"], x["p2"], x["offsets"], x["mask"])
    return (counts, *grads, *run_kernels(CPP_BACKEND, x["p1"], x["edge"], 5, 0.5),
            *run_kernels(CPP_BACKEND, x["p3"], x["edge3"], 3, 0.5))


@pytest.mark.parametrize("dtype", [F32, F64])
def test_bitwise_identical_for_one_and_two_threads_and_reruns(dtype):
    """Inputs are made once: torch's own ops (the edge map's pow, say) may round differently with
    another thread count, and only the kernels are under test here."""
    p1, p2, mask = joint_inputs(JOINT_CASES["2d-K10-r3-mask-ragged"], dtype, "cpu", seed=7)
    p3, edge3 = boundary_inputs(BOUNDARY_CASES["3d-K2-w3-several-chunks"], dtype, "cpu", seed=8)
    _, edge = boundary_inputs(BOUNDARY_CASES["2d-K10-w5-several-row-regions"], dtype, "cpu", seed=9)
    edge = edge[:, :, :20, :37].contiguous()
    inputs = dict(p1=p1, p2=p2, mask=mask, offsets=flatten(make_offsets(2, 2)),
                  grad_j=random_grad_j(25, 10, accumulation_dtype(dtype), "cpu"), edge=edge, p3=p3, edge3=edge3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = all_outputs(inputs)
        torch.set_num_threads(2)
        double = all_outputs(inputs)
        again = all_outputs(inputs)
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(single, double, again):
        assert a.dtype == b.dtype and torch.equal(a, b) and torch.equal(b, c)
