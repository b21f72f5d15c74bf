"""The C++ CPU kernels (csrc/cpu) beyond agreement on the common cases: the rows of p2 a
joint-count tile stages (so the cost follows the work, not the spread of the offsets), offset
sets far apart, and offset counts above the old limit of 4096, each against the reference."""
import pytest
import torch

from cases import F32, F64, check_joint
from helpers import random_mask, random_maps

import bimi_kernels
from bimi_kernels.native import CPP_BACKEND
from bimi_kernels.offsets import flatten, make_offsets

TILE_ROWS = 8  # kTileRows of csrc/cpu/joint.cpp: image rows per tile


# ------------------------------------------------------------------------------------------------
# the band of p2 rows one tile stages
# ------------------------------------------------------------------------------------------------
def staged_segments(shape, offsets):
    """(dz, first dy, rows) of each band segment the kernel stages per tile, from the kernel."""
    p = torch.empty(shape)
    return [tuple(r) for r in torch.ops.bimi_C.joint_counts_band_layout(p, list(flatten(offsets))).tolist()]


def reached_segments(offsets):
    """The rows the offsets reach from one tile: for each dz, the runs y0 + dy .. y0 + dy + 7 of
    every distinct dy, overlapping or touching runs merged."""
    by_plane = {}
    for d in offsets:
        dz, dy = (0, d[0]) if len(d) == 2 else (d[0], d[1])
        by_plane.setdefault(dz, set()).add(dy)
    segments = []
    for dz in sorted(by_plane):
        for dy in sorted(by_plane[dz]):
            if segments and segments[-1][0] == dz and dy <= segments[-1][1] + segments[-1][2]:
                segments[-1] = (dz, segments[-1][1], dy + TILE_ROWS - segments[-1][1])
            else:
                segments.append((dz, dy, TILE_ROWS))
    return segments


@pytest.mark.parametrize(
    "shape,offsets,expected",
    [
        # sparse offsets far apart: two runs of 8 rows, not the 1008 rows between them
        ((1, 10, 1024, 512), [(0, 0), (1000, 0)], [(0, 0, 8), (0, 1000, 8)]),
        ((1, 10, 1024, 512), [(-1000, 0), (1000, 0)], [(0, -1000, 8), (0, 1000, 8)]),
        # a dilated window: three runs
        ((1, 10, 128, 128), make_offsets(1, 2, 20), [(0, -20, 8), (0, 0, 8), (0, 20, 8)]),
        # dense windows: one run of 8 + 2r rows per plane, as before
        ((4, 10, 128, 128), make_offsets(3, 2), [(0, -3, 14)]),
        ((1, 4, 8, 16, 16), make_offsets(1, 3), [(-1, -1, 10), (0, -1, 10), (1, -1, 10)]),
        # 3-D: each plane only the rows of its own offsets
        ((1, 4, 9, 600, 16), [(0, 0, 0), (8, 500, 1), (8, -3, 0)], [(0, 0, 8), (8, -3, 8), (8, 500, 8)]),
    ],
)
def test_band_stages_only_the_rows_the_offsets_reach(shape, offsets, expected):
    """The cost of a tile follows the rows its offsets reach, not the spread between the lowest and
    the highest offset (which once made [(0, 0), (1000, 0)] on 1024 x 512 stage 1008 rows a tile,
    where the two offsets reach 16)."""
    segments = staged_segments(shape, offsets)
    assert segments == expected
    assert segments == reached_segments(offsets)


@pytest.mark.parametrize("seed", range(20))
def test_staged_rows_never_exceed_eight_per_distinct_row_shift(seed):
    g = torch.Generator().manual_seed(seed)
    ndim = 2 + seed % 2
    size = (6, 300, 40)[-ndim:]
    count = int(torch.randint(1, 12, (1,), generator=g))
    offsets = [tuple(int(torch.randint(-(s - 1), s, (1,), generator=g)) for s in size) for _ in range(count)]
    segments = staged_segments((1, 3, *size), offsets)
    distinct_shifts = {tuple(d[:-1]) for d in offsets}
    assert sum(rows for _, _, rows in segments) <= TILE_ROWS * len(distinct_shifts)
    assert segments == reached_segments(offsets)


# ------------------------------------------------------------------------------------------------
# far offsets against the reference (along y: the band stages only the rows they reach; along
# x: only the vectors of columns with a partner are multiplied)
# ------------------------------------------------------------------------------------------------
FAR_CASES = [
    # shape, offsets, masked
    ((1, 3, 300, 20), [(0, 0), (290, 0)], False),
    ((2, 3, 300, 19), [(-290, 1), (290, -2)], True),
    ((1, 5, 120, 32), [(-100, 0), (0, 3), (100, 0), (37, -1), (-37, 31)], False),  # rows of whole vectors
    ((1, 3, 40, 9, 16), [(0, 0, 0), (30, 4, 1), (-35, -8, 0)], True),
    ((1, 2, 3, 200, 11), [(0, -150, 0), (2, 150, 1), (1, 0, -10)], False),
    # far along x: the kernels skip the vectors without a partner (a few columns overlap)
    ((2, 3, 6, 200), [(0, 0), (0, 190), (1, -195), (-2, 3)], True),
    ((1, 2, 3, 4, 150), [(0, 0, 140), (1, -1, -145), (0, 0, 0)], False),
]


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("shape,offsets,masked", FAR_CASES)
def test_far_offsets_match_reference(shape, offsets, masked, dtype):
    p1, p2 = random_maps(shape, dtype=dtype, seed=11)
    mask = random_mask(shape, seed=12, keep=0.7)[:, 0].to(dtype).contiguous() if masked else None
    check_joint(CPP_BACKEND, p1, p2, make_offsets(offsets, len(shape) - 2), mask)


# ------------------------------------------------------------------------------------------------
# more than 4096 offsets (the CPU kernels once refused them; the kernels alone are checked by
# the conformance suite, tests/backends/test_joint_counts.py)
# ------------------------------------------------------------------------------------------------
def test_loss_with_more_than_4096_offsets_through_auto_backend(monkeypatch):
    """`auto` picks cpp on CPU; the loss and its gradients match the reference backend's."""
    monkeypatch.delenv("BIMI_BACKEND", raising=False)
    shape = (1, 2, 33, 33)
    results = []
    for backend in ("auto", "reference"):
        p1, p2 = random_maps(shape, seed=15, requires_grad=True)
        loss = bimi_kernels.RegularizedMILoss(offsets=32, backend=backend)(p1, p2)
        loss.backward()
        results.append((loss.detach(), p1.grad, p2.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# index arithmetic at the ends of int64
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("offset", [[-(2**63), 0], [0, -(2**63)], [2**63 - 1, 0], [-9, 0], [0, 10]])
def test_kernels_refuse_offsets_outside_the_map(offset):
    """Called directly (past the Python checks), the C++ op refuses an offset that does not fit,
    including -2^63, whose absolute value does not exist in int64 (it once passed |d| < size as
    a negative number and the kernel indexed with it)."""
    p = torch.rand(1, 2, 9, 10).softmax(1)
    with pytest.raises(RuntimeError, match="does not fit"):
        torch.ops.bimi_C.joint_counts(p, p, offset, None)
    with pytest.raises(RuntimeError, match="does not fit"):
        torch.ops.bimi_C.joint_counts_backward(torch.ones(1, 2, 2), p, p, offset, None)
