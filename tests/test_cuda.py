"""The `cuda` backend (CUDA kernels of csrc/cuda, bimi_kernels._C_cuda) against the reference:
the checks of tests/test_cpp.py on CUDA tensors. Skipped, with the reason, where no GPU is
visible or the CUDA extension was not built (a CPU-only torch); `.ci/check_cuda_build.sh` proves
the CUDA code compiles on machines without a GPU."""
import pytest
import torch

from bimi_kernels import backends
from bimi_kernels.native import CUDA_BACKEND
from bimi_kernels.offsets import make_offsets

import test_cpp as checks  # the device-generic checks (a module attribute, so not collected twice)

_REASON = backends.unavailable_reason("cuda", "cuda")
if _REASON is not None:
    pytest.skip(f"cuda backend unavailable: {_REASON}", allow_module_level=True)

DEVICE = "cuda"
F32, F64, F16, BF16 = torch.float32, torch.float64, torch.float16, torch.bfloat16


def test_cuda_backend_is_available_and_registered():
    assert backends.unavailable_reason("cuda", "cuda") is None
    for op in ("joint_counts", "joint_counts_backward", "boundary_cc", "boundary_cc_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"bimi_C::{op}", "CUDA")


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("shape,offsets,dilation,masked", checks.JOINT_CASES)
def test_joint_counts_match_reference(shape, offsets, dilation, masked, dtype):
    p1, p2, mask = checks.make_inputs(shape, dtype, masked, DEVICE)
    offsets = make_offsets(offsets, len(shape) - 2, dilation)
    checks.check_joint(CUDA_BACKEND, p1, p2, offsets, mask, checks.RTOL[dtype])


def test_joint_counts_large_k_and_many_chunks():
    p1, p2, mask = checks.make_inputs((2, 40, 70, 150), F32, True, DEVICE)
    checks.check_joint(CUDA_BACKEND, p1, p2, make_offsets(1, 2), mask, checks.RTOL[F32])


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("shape,window", checks.BOUNDARY_CASES)
def test_boundary_matches_reference(shape, window, dtype):
    p, _ = checks.random_maps(shape, dtype=dtype, seed=4, device=DEVICE)
    edge = checks.edge_for(shape, DEVICE, checks.reference.accumulation_dtype(dtype))
    checks.check_boundary(CUDA_BACKEND, p, edge, window)


@pytest.mark.parametrize("dtype", [F32, F64])
def test_bitwise_identical_reruns(dtype):
    inputs = checks.determinism_inputs(DEVICE, dtype)
    first = checks.all_outputs(CUDA_BACKEND, inputs)
    second = checks.all_outputs(CUDA_BACKEND, inputs)
    checks.assert_bitwise_equal(first, second)


@pytest.mark.parametrize("dtype", [F16, BF16])
def test_half_precision_within_twice_the_reference_error(dtype):
    checks.check_half_precision(CUDA_BACKEND, DEVICE, dtype)


@pytest.mark.parametrize("shape", [(2, 3, 6, 7), (1, 3, 4, 5, 6)])
def test_gradcheck_bimi_loss(shape):
    checks.check_gradcheck_bimi_loss("cuda", DEVICE, shape)


def test_compile_fullgraph_through_bimi_loss():
    checks.check_compile_bimi_loss("cuda", DEVICE)


def test_opcheck_custom_ops_with_cuda_backend():
    checks.check_opcheck("cuda", DEVICE)
