"""What is specific to the `cuda` backend (csrc/cuda, bimi_kernels._C_cuda). The conformance suite
(tests/backends/) runs the common case table on it like on every backend; this file adds:

- on every machine: the host emulations of the CUDA kernels (csrc/cuda/tests/*.cpp), which run the
  kernels' own per-thread steps and launch plans on the CPU against direct loops (the CUDA code's
  index arithmetic, tiles, halo windows, offset tables and reduction trees, checked without a GPU);
- on a GPU: every kernel against the reference for float16/bfloat16/float32/float64, 2-D/3-D,
  masks, K in {2, 3, 17, 40, 128}, radius 0/1/3 and sparse far offsets (the launch shapes: several
  offset tables, shared memory past 48 KB, one chunk), the current stream, a non-default device,
  CUDA graph capture, bitwise reruns and indices past 2^31 (marked slow).
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import cases
from cases import BF16, F16, F32, F64, random_grad_j, relative_error
from helpers import random_image, random_maps

from bimi_kernels import backends, reference
from bimi_kernels.native import CUDA_BACKEND
from bimi_kernels.numerics import accumulation_dtype
from bimi_kernels.offsets import flatten, make_offsets

ROOT = Path(__file__).resolve().parents[1]

_REASON = backends.unavailable_reason("cuda", "cuda")
needs_gpu = pytest.mark.skipif(_REASON is not None, reason=f"cuda backend unavailable: {_REASON}")


# ------------------------------------------------------------------------------------------------
# host emulation of the kernels (no GPU needed)
# ------------------------------------------------------------------------------------------------
def _compile(source: Path, out: Path) -> Path:
    compiler = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler to build the host emulation")
    base = [compiler, "-std=c++17", "-O1", "-g", "-I", str(ROOT / "csrc"), str(source), "-o", str(out)]
    # with the sanitizers where the toolchain has them: an access past the shared memory the
    # launcher sizes is then an error, not a silent read
    for extra in (["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"], []):
        if subprocess.run(base[:1] + extra + base[1:], capture_output=True).returncode == 0:
            return out
    result = subprocess.run(base, capture_output=True, text=True)
    raise AssertionError(f"could not compile {source.name}:\n{result.stderr[-4000:]}")


@pytest.mark.parametrize("name", ["emulate_joint", "emulate_boundary"])
def test_host_emulation_of_the_kernels(name, tmp_path):
    binary = _compile(ROOT / "csrc" / "cuda" / "tests" / f"{name}.cpp", tmp_path / name)
    result = subprocess.run([str(binary)], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "ASAN_OPTIONS": "detect_leaks=0"})
    assert result.returncode == 0 and result.stdout.strip().endswith(f"{name}: OK"), (
        result.stdout[-6000:] + result.stderr[-4000:])


# ------------------------------------------------------------------------------------------------
# helpers (the checks and tolerances are the conformance suite's: tests/backends/cases.py)
# ------------------------------------------------------------------------------------------------
def make_mask(shape, dtype, device):
    return cases.make_mask(shape, "binary", dtype, device)


def check_joint(p1, p2, offsets, mask):
    cases.check_joint(CUDA_BACKEND, p1, p2, offsets, mask)


def check_boundary(p, edge, window):
    cases.check_boundary(CUDA_BACKEND, p, edge, window)


def edge_for(shape, device, dtype, seed=1):
    image = random_image(shape, channels=2, dtype=F64, seed=seed)
    return reference.edge_map(image).to(device, accumulation_dtype(dtype)).contiguous()


# ------------------------------------------------------------------------------------------------
# every kernel against the reference (GPU)
# ------------------------------------------------------------------------------------------------
DTYPES = [F16, BF16, F32, F64]
DTYPE_IDS = ["float16", "bfloat16", "float32", "float64"]
OFFSET_SETS = {
    # 2-D maps (2, K, 19, 37), 3-D maps (1, K, 5, 9, 11)
    "r0": (0, 0),
    "r1": (1, 1),
    "r3": (3, 3),  # 3-D: 343 offsets in 7 clusters, 4 offset tables (launches)
    "sparse-far": ([(0, 0), (2, -5), (-7, 3), (0, 29), (18, -30)], [(0, 0, 0), (4, -8, 10), (-3, 7, -9)]),
}


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("k", [2, 3, 17, 40, 128])
@pytest.mark.parametrize("offsets", list(OFFSET_SETS))
@pytest.mark.parametrize("ndim", [2, 3])
def test_joint_counts_match_reference(ndim, offsets, k, dtype):
    shape = (2, k, 19, 37) if ndim == 2 else (1, k, 5, 9, 11)
    p1, p2 = random_maps(shape, dtype=dtype, seed=k, device="cuda")
    mask = make_mask(shape, dtype, "cuda") if ndim == 2 else None
    check_joint(p1, p2, make_offsets(OFFSET_SETS[offsets][ndim - 2], ndim), mask)


@needs_gpu
@pytest.mark.parametrize("dtype", [F32, F64], ids=["float32", "float64"])
def test_joint_counts_window_past_48_kb_of_shared_memory(dtype):
    """K = 17 (16 channels a block side) and a 32 x 32 window per channel: 80 KB forward, 64 KB
    backward, launched with the opt-in above 48 KB (on a GPU with 64 KB per block, sm_75, the
    offsets are cut into smaller windows instead; the emulation checks both give the same bits)."""
    shape = (2, 17, 40, 50)
    p1, p2 = random_maps(shape, dtype=dtype, seed=5, device="cuda")
    check_joint(p1, p2, make_offsets([(0, 0), (24, 0), (-24, 0), (24, 0)], 2), make_mask(shape, dtype, "cuda"))


@needs_gpu
def test_joint_counts_one_tile_and_one_pixel():
    for shape, offsets in (((1, 3, 4, 5), 1), ((2, 5, 1, 1), 0), ((2, 4, 1, 40), [(0, 3), (0, -3)])):
        p1, p2 = random_maps(shape, dtype=F32, seed=1, device="cuda")
        check_joint(p1, p2, make_offsets(offsets, 2), make_mask(shape, F32, "cuda"))


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "shape,window,scale",
    [((2, 3, 37, 41), 5, 1.0), ((2, 2, 9, 11), 1, 1.0), ((1, 17, 5, 6, 7), 3, 1.0), ((1, 128, 12, 13), 3, 3.0),
     ((1, 4, 6, 5), 7, 1.0), ((2, 3, 70, 65), 5, 1.0)],
    ids=["2d-K3-w5", "2d-K2-w1", "3d-K17-w3", "2d-K128-w3", "2d-w7-wider-than-map", "2d-several-parts"],
)
def test_boundary_matches_reference(shape, window, scale, dtype):
    g = torch.Generator().manual_seed(4)
    p = (scale * torch.randn(shape, generator=g, dtype=F64)).softmax(1).to("cuda", dtype)
    check_boundary(p, edge_for(shape, "cuda", dtype), window)


# ------------------------------------------------------------------------------------------------
# streams, devices, graphs, determinism (GPU)
# ------------------------------------------------------------------------------------------------
def all_outputs(p1, p2, mask, offsets, edge, grad_j):
    flat = flatten(offsets)
    counts = CUDA_BACKEND.joint_counts(p1, p2, flat, mask)
    grads = CUDA_BACKEND.joint_counts_backward(grad_j, p1, p2, flat, mask)
    cc, u_range = CUDA_BACKEND.boundary_cc(p1, edge, 5)
    grad_cc = torch.full((), 0.5, dtype=cc.dtype, device=cc.device)
    return (counts, *grads, cc, u_range, CUDA_BACKEND.boundary_cc_backward(grad_cc, p1, edge, u_range, 5))


def inputs_on(device, dtype=F32, shape=(2, 10, 45, 37), radius=2):
    p1, p2 = random_maps(shape, dtype=dtype, seed=7, device=device)
    offsets = make_offsets(radius, len(shape) - 2)
    return dict(p1=p1, p2=p2, mask=make_mask(shape, dtype, device), offsets=offsets,
                edge=edge_for(shape, device, dtype),
                grad_j=random_grad_j(len(offsets), shape[1], accumulation_dtype(dtype), device))


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_reruns_are_bitwise_equal(dtype):
    x = inputs_on("cuda", dtype, shape=(2, 10, 45, 37), radius=7)  # 225 offsets: two tables
    first, second = all_outputs(**x), all_outputs(**x)
    for a, b in zip(first, second):
        assert a.dtype == b.dtype and torch.equal(a, b)


@needs_gpu
def test_kernels_run_on_the_current_stream():
    """The inputs are written on a side stream behind a 50 ms sleep and the ops called on that
    stream without a sync: a kernel launched on any other stream would read them unwritten."""
    x = inputs_on("cuda")
    expected = all_outputs(**x)
    stale = {name: torch.full_like(t, float("nan")) if isinstance(t, torch.Tensor) else t for name, t in x.items()}
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)
        for name in ("p1", "p2", "mask", "edge", "grad_j"):
            stale[name].copy_(x[name])
        got = all_outputs(**stale)
    side.synchronize()
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


@needs_gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tensors_on_a_device_other_than_the_current_one():
    expected = [t.cpu() for t in all_outputs(**inputs_on("cuda:0"))]
    with torch.cuda.device(0):
        got = all_outputs(**inputs_on("cuda:1"))
    for a, b in zip(got, expected):
        assert a.device == torch.device("cuda:1") and torch.equal(a.cpu(), b)


@needs_gpu
def test_capture_in_a_cuda_graph():
    """No host sync and no pageable host-to-device copy inside the ops: a CUDA graph captures them
    and its replays on new inputs give the eager results."""
    x = inputs_on("cuda", radius=1)
    static = {name: t.clone() if isinstance(t, torch.Tensor) else t for name, t in x.items()}
    all_outputs(**static)  # warm-up outside the capture (allocator, kernel attributes)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = all_outputs(**static)
    for seed in (11, 12):
        fresh = random_maps(static["p1"].shape, dtype=F32, seed=seed, device="cuda")
        static["p1"].copy_(fresh[0])
        static["p2"].copy_(fresh[1])
        graph.replay()
        expected = all_outputs(**{**x, "p1": fresh[0], "p2": fresh[1]})
        for a, b in zip(outputs, expected):
            assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
# indices past 2^31 (GPU, about 40 GB of device memory)
# ------------------------------------------------------------------------------------------------
def _needs_memory(gigabytes):
    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        if free < gigabytes * 2**30:
            pytest.skip(f"needs {gigabytes} GB of free device memory")


@needs_gpu
@pytest.mark.slow
def test_joint_counts_past_2_31_elements():
    """B identical samples of (2, 256, 256), B * K * H * W > 2^31: J is B times one sample's J and
    every sample's gradient is the one sample's gradient, bitwise (the last sample's elements sit
    past 2^31)."""
    _needs_memory(48)
    small = random_maps((1, 2, 256, 256), dtype=F32, seed=3, device="cuda")
    batch = 2**31 // small[0].numel() + 7
    offsets = make_offsets(1, 2)
    flat = flatten(offsets)
    grad_j = random_grad_j(len(offsets), 2, F32, "cuda")
    j_small = CUDA_BACKEND.joint_counts(*small, flat, None)
    g_small = CUDA_BACKEND.joint_counts_backward(grad_j, *small, flat, None)
    big = [p.expand(batch, -1, -1, -1).contiguous() for p in small]
    assert big[0].numel() > 2**31
    j_big = CUDA_BACKEND.joint_counts(*big, flat, None)
    assert relative_error(j_big, batch * j_small.double()) <= 1e-5
    g_big = CUDA_BACKEND.joint_counts_backward(grad_j, *big, flat, None)
    del big
    for got, one in zip(g_big, g_small):
        for b in (0, batch // 2, batch - 1):
            assert torch.equal(got[b], one[0])


@needs_gpu
@pytest.mark.slow
def test_boundary_past_2_31_elements():
    """B identical samples, B * K * H * W > 2^31 and 3 * B * H * W (the coefficient maps) > 2^31:
    CC and the range equal one sample's, the gradient is one sample's divided by B."""
    _needs_memory(48)
    shape = (1, 2, 256, 256)
    p_small = random_maps(shape, dtype=F32, seed=5, device="cuda")[0]
    edge_small = edge_for(shape, "cuda", F32)
    batch = 2**31 // p_small.numel() + 7
    grad_cc = torch.tensor(1.0, device="cuda")
    cc_small, range_small = CUDA_BACKEND.boundary_cc(p_small, edge_small, 5)
    grad_small = CUDA_BACKEND.boundary_cc_backward(grad_cc, p_small, edge_small, range_small, 5)
    p_big = p_small.expand(batch, -1, -1, -1).contiguous()
    edge_big = edge_small.expand(batch, -1, -1, -1).contiguous()
    cc_big, range_big = CUDA_BACKEND.boundary_cc(p_big, edge_big, 5)
    # the block partials are each sample's own (a sample is 256 whole blocks), added in double:
    # B times one sample's sum to a rounding (a float32 total, 16k partials a thread, drifted by
    # ~4e-5)
    assert relative_error(cc_big, cc_small) <= 1e-6
    assert torch.equal(range_big, range_small.expand(batch, 2))
    grad_big = CUDA_BACKEND.boundary_cc_backward(grad_cc, p_big, edge_big, range_big, 5)
    for b in (0, batch // 2, batch - 1):
        assert relative_error(grad_big[b] * batch, grad_small[0]) <= 1e-5


@needs_gpu
def test_registered_for_cuda_tensors():
    for op in ("joint_counts", "joint_counts_backward", "boundary_cc", "boundary_cc_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"bimi_C::{op}", "CUDA")
