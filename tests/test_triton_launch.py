"""Launch geometry of the Triton kernels: tiles, chunks of partner rows, grids, strides and the
64-bit index arithmetic, each against `bimi_kernels.reference` (docs/contract.md §3, §5, §8).

Under the interpreter every test here runs with an address guard: each load and store of an
interpreted kernel is checked, before it touches memory, to lie inside the storage of one of
that launch's tensor arguments (the interpreter itself has no bounds checks). Shapes and grids
are small: the interpreter pays ~0.1 ms per operation and ~0.6 ms per nested @triton.jit call,
so tiles are chosen to give a few tiles per sample, not many. (tests/conftest.py switches the
interpreter on where there is no GPU, before triton is first imported.) The checks and
tolerances are the conformance suite's (tests/backends/cases.py), with launch settings bound.
"""
import threading
from typing import NamedTuple, Optional

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cases import BF16, F16, F32, F64, RTOL, BoundaryCase, assert_relative, bound, joint_maps
from cases import boundary_inputs as case_boundary_inputs
from cases import check_boundary as check_boundary_kernels
from cases import check_joint as check_joint_kernels
from cases import random_grad_j as case_random_grad_j
from helpers import random_image, random_mask, random_maps

from bimi_kernels import backends, reference
from bimi_kernels.offsets import flatten, make_offsets

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_REASON = backends.unavailable_reason("triton", DEVICE)
if _REASON is not None:
    pytest.skip(f"triton backend unavailable on {DEVICE}: {_REASON}", allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from bimi_kernels.triton import INTERPRETED, boundary, joint  # noqa: E402
from bimi_kernels.triton.backend import BACKEND  # noqa: E402
from bimi_kernels.triton.tiles import (  # noqa: E402
    INDEX_HEADROOM, INT32_LIMIT, make_tile, needs_wide_index, tile_geometry)

pytestmark = pytest.mark.filterwarnings(
    "ignore:Conversion of an array with ndim > 0:DeprecationWarning"
)


# ------------------------------------------------------------------------------------------------
# the address guard
# ------------------------------------------------------------------------------------------------
class OutOfBounds(AssertionError):
    pass


@pytest.fixture(autouse=True)
def address_guard(monkeypatch):
    """Every interpreted load and store must address the storage of a tensor argument of its
    launch. Yields the list of the launches' guarded address counts."""
    if not INTERPRETED:
        yield None
        return
    from triton.runtime import interpreter

    ranges = []
    checked = []

    def storages(args):
        found = []
        for arg in args:
            if isinstance(arg, torch.Tensor):
                storage = arg.untyped_storage()
                found.append((storage.data_ptr(), storage.data_ptr() + storage.nbytes()))
        return found

    original_call = interpreter.GridExecutor.__call__

    def guarded_call(self, *args, **kwargs):
        ranges[:] = storages(list(args) + list(kwargs.values()))
        return original_call(self, *args, **kwargs)

    def check(ptrs, mask, what):
        addresses = np.asarray(ptrs.data).astype(np.uint64)
        active = np.broadcast_to(np.asarray(mask.data, dtype=bool), addresses.shape)
        addresses = addresses[active]
        if addresses.size == 0:
            return
        size = np.dtype(interpreter._get_np_dtype(ptrs.get_element_ty())).itemsize
        ok = np.zeros(addresses.shape, dtype=bool)
        for start, end in ranges:
            ok |= (addresses >= np.uint64(start)) & (addresses + np.uint64(size) <= np.uint64(end))
        checked.append(addresses.size)
        if not ok.all():
            bad = int(addresses[~ok][0])
            raise OutOfBounds(f"{what} at {bad:#x} outside every tensor argument {ranges}")

    builder = interpreter.interpreter_builder
    original_load, original_store = builder.create_masked_load, builder.create_masked_store

    def load(ptrs, mask, other, *rest):
        check(ptrs, mask, "load")
        return original_load(ptrs, mask, other, *rest)

    def store(ptrs, value, mask, *rest):
        check(ptrs, mask, "store")
        return original_store(ptrs, value, mask, *rest)

    monkeypatch.setattr(interpreter.GridExecutor, "__call__", guarded_call)
    monkeypatch.setattr(builder, "create_masked_load", load)
    monkeypatch.setattr(builder, "create_masked_store", store)
    yield checked


def test_address_guard_catches_an_out_of_bounds_load(address_guard):
    if not INTERPRETED:
        pytest.skip("the guard watches the interpreter")

    @triton.jit
    def read_past_end(x_ptr, y_ptr, n):
        i = tl.arange(0, 16)
        tl.store(y_ptr + i, tl.load(x_ptr + n + i))

    x = torch.zeros(16)
    y = torch.zeros(16)
    read_past_end[(1,)](x, y, 0)
    with pytest.raises(Exception, match="outside every tensor argument"):
        read_past_end[(1,)](x, y, 8)


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def make_inputs(shape, dtype, masked, seed=0):
    return joint_maps(shape, dtype, masked, DEVICE, seed)


def random_grad_j(n_offsets, k, dtype):
    return case_random_grad_j(n_offsets, k, dtype, DEVICE)


def tile_of(pixels, shape):
    """An explicit tile of `pixels` pixels for maps of `shape` (None: the launcher's choice): 8
    wide, then tall, then deep (a volume of depth 1 gets a flat tile, as a 2-D map)."""
    if pixels is None:
        return None
    width = min(8, pixels)
    if len(shape) == 4 or shape[2] == 1:
        return (1, pixels // width, width)
    height = min(4, pixels // width)
    return (pixels // (width * height), height, width)


def check_joint(p1, p2, offsets, mask, **launch):
    """The joint-count kernels with these launch settings against the reference
    (`max_programs` is the forward's only, `split` the backward's)."""
    kernels = bound(joint, forward_only=("max_programs",), backward_only=("split",), **launch)
    check_joint_kernels(kernels, p1, p2, offsets, mask, truncating_cast=INTERPRETED)


# ------------------------------------------------------------------------------------------------
# joint counts: tiles, chunks, grids
# ------------------------------------------------------------------------------------------------
class JointLaunch(NamedTuple):
    shape: tuple
    offsets: object  # a radius or a list of n-tuples
    masked: bool = False
    tile: Optional[tuple] = None  # None: the launcher's choice
    rows: Optional[int] = None  # partner rows per chunk (None: the default config)
    max_programs: Optional[int] = None
    dilation: int = 1
    dtype: torch.dtype = F64


JOINT_GEOMETRY = {
    "2d-sizes-not-multiples-of-tile": JointLaunch((2, 3, 13, 19), 1, True, (1, 4, 8), None, 3),
    "2d-one-row": JointLaunch((2, 3, 1, 9), [(0, 0), (0, 2), (0, -5)], False, (1, 1, 16)),
    "2d-one-column": JointLaunch((2, 3, 7, 1), [(0, 0), (3, 0), (-1, 0)], True, (1, 4, 4), None, 2),
    "2d-one-pixel": JointLaunch((3, 2, 1, 1), 0, True),
    "2d-offsets-larger-than-tile": JointLaunch((1, 3, 12, 13), [(5, -7), (-9, 10), (0, 1)], True, (1, 2, 8), None, 3),
    "2d-radius-3-several-chunks": JointLaunch((1, 2, 9, 10), 3, False, (1, 4, 8), 32, 3),
    "2d-radius-5": JointLaunch((1, 2, 12, 13), 5, True, (1, 8, 8)),
    "2d-zero-offset-flat-runs": JointLaunch((2, 5, 9, 7), 0, True, (1, 2, 8), None, 3),
    "2d-repeated-zero-offsets": JointLaunch((2, 3, 5, 6), [(0, 0), (0, 0)]),
    "2d-K3-r1-mask-7tiles": JointLaunch((2, 3, 9, 11), 1, True, (1, 4, 8)),
    "2d-K17-r1-dilation2-mask": JointLaunch((1, 17, 13, 10), 1, True, (1, 4, 8), dilation=2),
    "2d-K3-list-mask": JointLaunch((2, 3, 8, 9), [(0, 0), (0, 1), (1, 0), (-2, 3), (5, -7)], True, (1, 8, 8)),
    "2d-K10-r1-mask-f32-tile16": JointLaunch((2, 10, 9, 11), 1, True, (1, 2, 8), dtype=F32),
    "3d-tile-every-dim": JointLaunch((1, 3, 4, 5, 6), 1, True, (2, 2, 4), 32, 3),
    "3d-one-deep": JointLaunch((1, 3, 1, 5, 6), [(0, 0, 0), (0, 1, -2)], False, (1, 2, 8)),
    "3d-one-high-one-wide": JointLaunch((2, 2, 6, 1, 1), [(0, 0, 0), (2, 0, 0), (-4, 0, 0)], True, (4, 1, 4), None, 2),
    "3d-offsets-larger-than-tile": JointLaunch((1, 2, 6, 7, 8), [(4, -5, 6), (0, 0, 0), (-3, 2, -7)], True, (2, 2, 4)),
    "3d-K3-r1-mask-4tiles": JointLaunch((2, 3, 5, 6, 7), 1, True, (4, 4, 8)),
    "3d-K4-r1-dilation2-tile32": JointLaunch((1, 4, 5, 6, 7), 1, False, (1, 4, 8), dilation=2),
    "3d-K3-list-mask": JointLaunch((2, 3, 4, 5, 6), [(0, 0, 0), (1, -1, 2), (-3, 0, 1)], True, (2, 4, 8)),
    "3d-K3-r1-f32-tile16": JointLaunch((2, 3, 5, 6, 7), 1, False, (1, 2, 8), dtype=F32),
}


@pytest.mark.parametrize("case", list(JOINT_GEOMETRY), ids=list(JOINT_GEOMETRY))
def test_joint_counts_tile_geometry(case):
    c = JOINT_GEOMETRY[case]
    p1, p2, mask = make_inputs(c.shape, c.dtype, c.masked)
    offsets = make_offsets(c.offsets, len(c.shape) - 2, c.dilation)
    config = None if c.rows is None else joint.JointConfig(rows=c.rows, tile_pixels=64, num_warps=4)
    check_joint(p1, p2, offsets, mask, tile=c.tile, config=config, max_programs=c.max_programs)


@pytest.mark.parametrize("max_rows", [16, 32])
def test_joint_counts_grid_split_along_partner_rows(max_rows):
    """On a GPU the forward grid also splits the |O| K partner rows into chunks (the last one
    padded), each chunk a column of programs."""
    p1, p2, mask = make_inputs((2, 5, 9, 11), F64, True)
    config = joint.JointConfig(rows=max_rows, tile_pixels=64, num_warps=4)
    check_joint(p1, p2, make_offsets(1, 2), mask, config=config, max_programs=3)


@pytest.mark.parametrize("shape", [(2, 17, 9, 11), (1, 5, 4, 5, 6)], ids=["2d", "3d"])
def test_joint_counts_backward_in_two_launches(shape):
    """The GPU launch config computes dL/dp1 and dL/dp2 in separate launches for K > 16."""
    p1, p2, mask = make_inputs(shape, F64, True)
    check_joint(p1, p2, make_offsets(1, len(shape) - 2), mask, tile=tile_of(64, shape), split=True)


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
    """Hypothesis over shapes, explicit offsets and tile choices."""
    shape, offsets, masked, tile_pixels = problem
    p1, p2, mask = make_inputs(shape, F64, masked, seed=sum(shape))
    check_joint(p1, p2, offsets, mask, tile=tile_of(tile_pixels, shape))


@pytest.mark.parametrize("k", [2, 3, 17, 33, 64, 128])
@pytest.mark.parametrize("dtype", [F64, F32])
def test_joint_counts_every_k(k, dtype):
    """K up to 128 in float64 and float32: tiles sized from K and the dtype (float64 at
    K >= 33 used to exceed Triton's largest tensor)."""
    shape = (1, k, 5, 6) if k > 33 else (2, k, 6, 7)
    p1, p2, mask = make_inputs(shape, dtype, masked=k == 17)
    check_joint(p1, p2, make_offsets(1, 2), mask)


@pytest.mark.parametrize("shape,channel_block,split", [
    ((2, 40, 9, 11), 16, None), ((2, 37, 6, 7), 24, False), ((1, 19, 4, 5, 6), 16, None)],
    ids=["2d-three-blocks", "2d-uneven-blocks-split-asked-off", "3d-two-blocks"])
@pytest.mark.parametrize("dtype", [F64, F32])
def test_joint_counts_in_channel_blocks(shape, channel_block, split, dtype):
    """K above the channel block (CHANNEL_BLOCK = 128 on a GPU) runs one forward launch per
    block of p1's channels and, per gradient, one backward launch per block of its channels
    (split even when asked not to be); a small block here gives the same launches under the
    interpreter."""
    p1, p2, mask = make_inputs(shape, dtype, masked=True)
    check_joint(p1, p2, make_offsets(1, len(shape) - 2), mask, channel_block=channel_block,
                split=split)


@pytest.mark.parametrize("k,dtype", [(129, F32), (1000, F64), (2000, F32)])
def test_large_k_launches_stay_within_the_tuned_blocks(k, dtype, monkeypatch):
    """On a GPU, K above 128 keeps K_PAD at 128 (the largest launch-table entry: no spills, and
    shared memory within sm_90's 227 KB; K_PAD 1024 in float64 asked 264 KB) and covers the
    channels in blocks."""
    monkeypatch.setattr(joint, "INTERPRETED", False)
    joint._cached_problem.cache_clear()
    try:
        p = torch.empty((2, k, 16, 16), dtype=dtype, device="meta")
        prob = joint._problem(p, p, None, (0, 0, 0, 1), None, None)
        table = joint.FLOAT64_CONFIGS if dtype == F64 else joint.CONFIGS
        assert prob.k_pad == 128 and prob.config == table[128]
        blocks = prob.channel_blocks()
        assert blocks[0] == (0, 128) and sum(n for _, n in blocks) == k
        assert all(i0 == 128 * b for b, (i0, _) in enumerate(blocks))
        assert joint.backward_passes(prob, split=False) == [(True, False), (False, True)]
    finally:
        joint._cached_problem.cache_clear()


@pytest.mark.parametrize("dtype", [F16, BF16])
def test_joint_counts_half_precision_rule(dtype):
    """docs/contract.md §8 with several tiles and a mask."""
    p1, p2, mask = make_inputs((2, 10, 9, 11), dtype, True)
    check_joint(p1, p2, make_offsets(1, 2), mask, tile=(1, 4, 8))


def test_joint_counts_fixed_order_reduction_is_bitwise_repeatable():
    """Several programs per grid dimension (chunks x pixel programs), each adding its own
    partial sums; the partials are added in program order: reruns agree bitwise."""
    p1, p2, mask = make_inputs((2, 4, 9, 10), F32, True)
    flat = flatten(make_offsets(1, 2))
    config = joint.JointConfig(rows=16, tile_pixels=32, num_warps=4)
    first = joint.joint_counts(p1, p2, flat, mask, config=config, tile=(1, 2, 8), max_programs=3)
    again = joint.joint_counts(p1, p2, flat, mask, config=config, tile=(1, 2, 8), max_programs=3)
    assert torch.equal(first, again)


def test_an_explicit_tile_with_depth_is_refused_for_a_2d_map():
    """The kernels test no z bound on a 2-D map: a tile deeper than 1 would load and store past
    the sample, so the tests' and tuners' tile shapes are checked."""
    p1, p2, _ = make_inputs((1, 3, 6, 9), F32, False)
    with pytest.raises(ValueError, match="tile depth: expected 1 for a 2-D map"):
        joint.joint_counts(p1, p2, flatten(make_offsets(1, 2)), None, tile=(2, 2, 8))


def test_an_explicit_tile_below_16_pixels_is_refused():
    """A tile is one matrix dimension of the kernels' tl.dot, at least 16 on a GPU: a smaller
    explicit tile (which the interpreter would run) is refused before any compilation."""
    p1, p2, _ = make_inputs((1, 3, 6, 9), F32, False)
    with pytest.raises(ValueError, match="tile: expected at least 16 pixels, got 1 x 2 x 4"):
        joint.joint_counts(p1, p2, flatten(make_offsets(1, 2)), None, tile=(1, 2, 4))
    with pytest.raises(ValueError, match="at least 16 pixels"):
        boundary.boundary_cc(p1, boundary_inputs((1, 3, 6, 9), F32)[1], 3, tile=(1, 1, 8))


def test_joint_counts_take_batch_and_channel_strides():
    """Maps that are channel slices of a larger map and every other sample of a batch run in
    place (no copy): the kernels take the batch and channel strides."""
    big1, big2, _ = make_inputs((4, 7, 6, 9), F64, False)
    p1, p2 = big1[::2, 1:5], big2[1::2, 2:6]
    mask = random_mask((4, 1, 6, 9), device=DEVICE)[::2, 0].to(F64)
    assert not p1.is_contiguous() and joint._dense_spatial(p1, 2) is p1
    offsets = make_offsets(1, 2)
    check_joint(p1, p2, offsets, mask, tile=(1, 2, 8))


def test_partner_table_columns_and_cache():
    geo = joint.geometry((0, 0, 1, -2), 2, (1, 5, 6))
    table = joint.partner_table(geo, 3, 30, False, 16, torch.device("cpu"))
    assert table.shape == (joint.TABLE_COLUMNS, 16)
    column = {name: table[getattr(joint, name).value].tolist() for name in (
        "COL_MAP_OFFSET", "COL_SHIFT", "COL_Y_LO", "COL_Y_HI", "COL_X_LO", "COL_X_HI",
        "COL_GRAD_INDEX")}
    # row 4 = offset 1 (d = (1, -2): shift 1 * 6 - 2 = 4), channel 1
    assert column["COL_SHIFT"][4] == 4 and column["COL_MAP_OFFSET"][4] == 30 + 4
    assert (column["COL_Y_LO"][4], column["COL_Y_HI"][4]) == (0, 4)
    assert (column["COL_X_LO"][4], column["COL_X_HI"][4]) == (2, 6)
    assert column["COL_GRAD_INDEX"][4] == 9 + 1  # dL/dJ[1, i, j=1] at 9 + 1 + 3 i
    assert column["COL_Y_HI"][6:] == [0] * 10  # padding rows: no partner inside
    reverse = joint.partner_table(geo, 3, 30, True, 16, torch.device("cpu"))
    assert reverse[joint.COL_SHIFT.value, 4] == -4 and reverse[joint.COL_GRAD_INDEX.value, 4] == 12
    assert joint.partner_table(geo, 3, 30, False, 16, torch.device("cpu")) is table


@pytest.mark.parametrize("k", [2, 10, 16, 40, 64, 128])
@pytest.mark.parametrize("dtype", [F16, BF16, F32, F64])
def test_default_configs_fit_triton_tensors(k, dtype, monkeypatch):
    """Every tensor a kernel builds stays under Triton's 2^20 elements, with the GPU settings
    and the interpreter's, for every K up to 128 and dtype."""
    from bimi_kernels.triton import padded_k

    for interpreted in (False, True):
        monkeypatch.setattr(joint, "INTERPRETED", interpreted)
        monkeypatch.setattr(boundary, "INTERPRETED", interpreted)
        k_pad = padded_k(k)
        config = joint.default_config(k_pad, dtype)
        rows = joint.chunk_rows(490 * k, k_pad, config.rows)
        for elements in (rows * config.tile_pixels, config.tile_pixels * k_pad, rows * k_pad):
            assert elements <= 1 << 20
        if not interpreted:
            assert config.tile_pixels >= 16 and rows >= 16  # tl.dot's minimum on a GPU
        b_config = boundary.default_config(k_pad, dtype)
        assert k_pad * max(b_config.run_pixels, b_config.grad_tile_pixels) <= 1 << 20


def test_make_tile_shapes():
    """As wide as the sample (up to 64), then as tall (up to 8 in a volume), then deep."""
    assert make_tile((1, 256, 256), 64) == (1, 1, 64, 1, 256, 4)
    assert make_tile((1, 256, 256), 256) == (1, 4, 64, 1, 64, 4)
    assert make_tile((1, 5, 3), 64) == (1, 8, 4, 1, 1, 1)
    assert make_tile((1, 1, 1), 64) == (1, 1, 16, 1, 1, 1)  # tl.dot's minimum
    assert make_tile((7, 9, 5), 128) == (2, 8, 8, 4, 2, 1)
    assert make_tile((32, 32, 32), 256) == (1, 8, 32, 32, 4, 1)


# ------------------------------------------------------------------------------------------------
# boundary term: tiles, windows, programs per sample
# ------------------------------------------------------------------------------------------------
def boundary_inputs(shape, dtype, seed=0):
    """p and an edge map for a shape, without a case."""
    return case_boundary_inputs(BoundaryCase(tuple(shape), 3), dtype, DEVICE, seed)


def check_boundary(p, edge, window, **launch):
    """The boundary kernels with these launch settings against the reference."""
    check_boundary_kernels(bound(boundary, **launch), p, edge, window, truncating_cast=INTERPRETED)


class BoundaryLaunch(NamedTuple):
    shape: tuple
    window: int
    tile: Optional[tuple] = None  # None: the launcher's choice
    max_programs: Optional[int] = None
    dtype: torch.dtype = F64


BOUNDARY_GEOMETRY = {
    "2d-sizes-not-multiples-of-tile-w5": BoundaryLaunch((2, 3, 11, 13), 5, (1, 4, 8), 3),
    "2d-window-7-interior-tile": BoundaryLaunch((1, 2, 22, 22), 7, (1, 8, 8), 2),
    "2d-window-9-rows-loop-interior-tile": BoundaryLaunch((1, 2, 24, 24), 9, (1, 8, 8), 2),
    "2d-one-row-w3": BoundaryLaunch((2, 4, 1, 9), 3),
    "2d-one-pixel-w5": BoundaryLaunch((2, 3, 1, 1), 5),
    "2d-K3-w5-tile16": BoundaryLaunch((2, 3, 9, 11), 5, (1, 2, 8)),
    "2d-K10-w3-7tiles": BoundaryLaunch((2, 10, 13, 17), 3, (1, 8, 8)),
    "2d-K2-w5-f32-tile32": BoundaryLaunch((2, 2, 13, 17), 5, (1, 4, 8), dtype=F32),
    "3d-tile-every-dim-w3": BoundaryLaunch((1, 3, 5, 6, 7), 3, (2, 4, 8), 2),
    "3d-one-deep-w5": BoundaryLaunch((2, 2, 1, 6, 7), 5),
    "3d-K17-w3-tile64": BoundaryLaunch((2, 17, 5, 6, 7), 3, (2, 4, 8)),
}


@pytest.mark.parametrize("case", list(BOUNDARY_GEOMETRY), ids=list(BOUNDARY_GEOMETRY))
def test_boundary_tile_geometry(case):
    c = BOUNDARY_GEOMETRY[case]
    p, edge = boundary_inputs(c.shape, c.dtype)
    check_boundary(p, edge, c.window, tile=c.tile, max_programs=c.max_programs)


@st.composite
def boundary_problems(draw):
    ndim = draw(st.sampled_from([2, 3]))
    spatial = tuple(draw(st.integers(1, 12 if ndim == 2 else 5)) for _ in range(ndim))
    shape = (draw(st.integers(1, 2)), draw(st.integers(2, 18))) + spatial
    return shape, draw(st.sampled_from([1, 3, 5])), draw(st.sampled_from([32, None]))


@settings(max_examples=5, deadline=None)
@given(boundary_problems())
def test_boundary_property(problem):
    """Hypothesis over shapes, windows and tile choices."""
    shape, window, tile_pixels = problem
    p, edge = boundary_inputs(shape, F64, seed=sum(shape))
    check_boundary(p, edge, window, tile=tile_of(tile_pixels, shape))


@pytest.mark.parametrize("k", [2, 33, 128])
def test_boundary_every_k_float64(k):
    p, edge = boundary_inputs((1, k, 5, 6), F64)
    check_boundary(p, edge, 3)


@pytest.mark.parametrize("shape,channel_block", [((2, 40, 9, 11), 16), ((1, 37, 4, 5, 6), 24)],
                         ids=["2d-three-blocks", "3d-uneven-blocks"])
@pytest.mark.parametrize("dtype", [F64, F32])
def test_boundary_in_channel_blocks(shape, channel_block, dtype):
    """K above the channel block (CHANNEL_BLOCK = 128 on a GPU): U summed over blocks of
    channels, each block read again for its gradient; a small block here gives the same
    kernels under the interpreter."""
    p, edge = boundary_inputs(shape, dtype)
    check_boundary(p, edge, 3, channel_block=channel_block, tile=tile_of(32, shape))


def test_large_k_boundary_plans_run_in_channel_blocks(monkeypatch):
    """On a GPU, K above 128 keeps K_PAD at 128 (a (K_PAD, pixels) block of 1024 float64
    channels spilled 6.5 KB of registers a thread) and turns the blocked kernels on."""
    monkeypatch.setattr(boundary, "INTERPRETED", False)
    boundary._cached_plan.cache_clear()
    try:
        for k, one_block in ((128, True), (129, False), (1000, False)):
            p = torch.empty((2, k, 64, 64), dtype=F64, device="meta")
            plan = boundary._plan(p, 5, None, None, max_programs=4)
            assert plan.k_pad == 128 and plan.one_block is one_block
    finally:
        boundary._cached_plan.cache_clear()


def test_boundary_several_runs_per_program():
    """The uncertainty pass walks several runs per program and reduces the running min/max
    across programs of a sample."""
    p, edge = boundary_inputs((2, 3, 9, 10), F64)
    config = boundary.BoundaryConfig(run_pixels=16, tile_pixels=32, grad_tile_pixels=16,
                                     num_warps=4)
    check_boundary(p, edge, 5, config=config, max_programs=2)


def test_boundary_takes_batch_and_channel_strides():
    big, _, _ = make_inputs((4, 6, 7, 8), F64, False)
    p = big[1::2, 1:4]
    edge = boundary_inputs((4, 1, 7, 8), F64)[1][::2]
    assert boundary._dense_pixels(p) is p and boundary._dense_pixels(edge) is edge
    check_boundary(p, edge, 3, tile=(1, 4, 8))


def test_boundary_index_width_covers_the_gradient_of_an_expanded_map():
    """An expanded map (channel stride 0) spans N elements a sample, but its contiguous gradient
    K N: 64-bit offsets once K N reaches 2^31, even while N does not."""
    n_side = 1 << 13  # N = 2^26
    for k, wide in ((16, False), (32, True)):
        p = torch.empty((1, 1, n_side, n_side), device="meta").expand(1, k, n_side, n_side)
        assert boundary._plan(p, 5, None, None).wide is wide


@pytest.mark.parametrize("shape", [(2, 3, 9, 11), (1, 2, 5, 6, 7), (2, 1, 1, 13), (1, 2, 4, 1, 1)],
                         ids=["2d", "3d", "one-row", "3d-one-column"])
@pytest.mark.parametrize("gamma", [0.75, 0.0])
def test_edge_map_runs_and_programs(shape, gamma, monkeypatch):
    """The fused edge map: wrap-around differences at every border, several runs per program
    and several programs per sample (their minima and maxima reduced per sample), gamma = 0."""
    monkeypatch.setattr(boundary, "INTERPRETER_RUN_PIXELS", 16)
    image = random_image(shape, channels=shape[1], dtype=F64, device=DEVICE)
    got = boundary.edge_map(image, gamma)
    expected = reference.edge_map(image, gamma)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    assert_relative(got, expected, RTOL[F64], "edge")


def test_the_batch_is_on_grid_axis_0(monkeypatch):
    """CUDA allows at most 65535 programs on grid axes 1 and 2, 2^31 - 1 on axis 0: the boundary
    and edge-map kernels put the batch on axis 0 and their programs per sample (a few hundred at
    most) on axis 1, so a batch of any size launches."""
    launched = []

    class Recorder:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            launched.append((self.name, tuple(grid)))
            return self.kernel[grid]

    names = ("_uncertainty_kernel", "_ncc_kernel", "_boundary_grad_kernel", "_edge_magnitude_kernel",
             "_edge_normalise_kernel")
    for name in names:
        monkeypatch.setattr(boundary, name, Recorder(name, getattr(boundary, name)))
    batch = 5
    p, edge = boundary_inputs((batch, 3, 6, 7), F32)
    cc, u_range = BACKEND.boundary_cc(p, edge, 3)
    BACKEND.boundary_cc_backward(torch.ones_like(cc), p, edge, u_range, 3)
    BACKEND.edge_map(random_image((batch, 2, 6, 7), channels=2, device=DEVICE), 0.75)
    assert sorted({name for name, _ in launched}) == sorted(names)
    for name, grid in launched:
        assert grid[0] == batch and len(grid) == 2 and grid[1] < batch * 6 * 7, (name, grid)


# ------------------------------------------------------------------------------------------------
# host side: no synchronisation, cheap
# ------------------------------------------------------------------------------------------------
def test_a_table_first_needed_inside_a_graph_capture_is_a_clear_error(monkeypatch):
    """The partner table is copied to the device on its first use; inside a CUDA graph capture
    that copy is not allowed, and the error says to warm up first (the check runs before any
    device work, so it is tested here on a CUDA device descriptor)."""
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    geo = joint.geometry(flatten(make_offsets(1, 2)), 2, (1, 5, 7))
    with pytest.raises(RuntimeError, match="run the loss once before capturing"):
        joint.partner_table(geo, 3, 35, False, 32, torch.device("cuda"))


def test_tables_are_copied_to_the_device_by_another_thread(monkeypatch):
    """torch.compile(mode="reduce-overhead") sends the calling thread's allocations during its
    warm-up runs to its CUDA-graph pool and frees what it does not track there when it records
    another graph: a cached partner table must come from another thread's allocations (checked
    here with a device that needs no GPU; the GPU case runs in tests/backends)."""
    threads = []
    real_to = torch.Tensor.to

    def recording_to(self, *args, **kwargs):
        threads.append(threading.get_ident())
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", recording_to)
    copied = joint._copy_outside_graph_pools(torch.arange(6), torch.device("meta"))
    assert copied.device.type == "meta" and copied.shape == (6,)
    assert threads and threading.get_ident() not in threads

    def failing_to(self, *args, **kwargs):
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(torch.Tensor, "to", failing_to)
    with pytest.raises(RuntimeError, match="out of memory"):  # the thread's error reaches the caller
        joint._copy_outside_graph_pools(torch.arange(6), torch.device("meta"))

    monkeypatch.setattr(torch.Tensor, "to", real_to)
    copies = []
    monkeypatch.setattr(joint, "_copy_outside_graph_pools",
                        lambda host, device: copies.append(device) or host)
    monkeypatch.setattr(joint, "_partner_tables", {})
    geo = joint.geometry(flatten(make_offsets(1, 2)), 2, (1, 5, 7))
    joint.partner_table(geo, 3, 35, False, 32, torch.device("cpu"))
    assert copies == [torch.device("cpu")]


def test_launchers_never_read_tensor_values_on_the_host(monkeypatch):
    """No .item(), bool() or tolist() on a tensor inside the four kernels: they can be
    captured by CUDA graphs and never wait for the device."""
    p1, p2, mask = make_inputs((1, 3, 6, 7), F32, True)
    flat = flatten(make_offsets(1, 2))
    edge = boundary_inputs((1, 3, 6, 7), F32)[1]
    BACKEND.joint_counts(p1, p2, flat, mask)  # warm the table caches first

    def refuse(*args, **kwargs):
        raise AssertionError("a launcher read a tensor value on the host")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    counts = BACKEND.joint_counts(p1, p2, flat, mask)
    BACKEND.joint_counts_backward(torch.ones_like(counts), p1, p2, flat, mask)
    cc, u_range = BACKEND.boundary_cc(p1, edge, 3)
    BACKEND.boundary_cc_backward(torch.ones_like(cc), p1, edge, u_range, 3)
    BACKEND.edge_map(random_image((1, 2, 6, 7), channels=2, device=DEVICE), 0.75)


# ------------------------------------------------------------------------------------------------
# 64-bit index arithmetic
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def huge_buffer():
    """A float16 buffer of 3.3e9 elements (6.6 GB). On the CPU only the pages the tests write
    and the kernels touch are ever backed by memory (a few MB); on a GPU it is allocated (the
    compiled kernels' 64-bit offsets run there)."""
    try:
        return torch.empty(3 * 2**30 + 2**28, dtype=F16, device=DEVICE)
    except (RuntimeError, MemoryError) as exc:  # an address-space or device-memory limit
        pytest.skip(f"cannot reserve 6.6 GB on {DEVICE}: {exc}")


def strided_maps(buffer, shape, stride_b, stride_k, offset, seed):
    """A (B, K, H, W) map viewing `buffer` with the given batch and channel strides, filled
    with a random softmax (only its own elements are written)."""
    b, k, h, w = shape
    view = buffer.as_strided(shape, (stride_b, stride_k, w, 1), offset)
    view.copy_(random_maps(shape, dtype=F16, seed=seed)[0])
    return view


def test_the_offset_table_cache_starts_over_but_keeps_captured_tables(monkeypatch):
    """The partner tables are cached per shape and offsets; a process that meets more than
    PARTNER_TABLES_KEPT of them starts the cache over, except for the tables a CUDA graph capture
    used (marked at lookup during the capture, simulated here): the graph replays their
    addresses, so freeing them would let it read reused memory."""
    monkeypatch.setattr(joint, "_partner_tables", {})
    monkeypatch.setattr(joint, "_captured_tables", set())
    monkeypatch.setattr(joint, "PARTNER_TABLES_KEPT", 2)
    cpu = torch.device("cpu")

    def table(radius):
        geo = joint.geometry(tuple(flatten(make_offsets(radius, 2))), 2, (1, 6, 7))
        return joint.partner_table(geo, 3, 42, False, 256, cpu)

    captured = table(1)
    joint._captured_tables.update(joint._partner_tables)
    table(2)
    assert len(joint._partner_tables) == 2
    table(3)  # a third: the cache starts over with the captured table and the new one
    assert len(joint._partner_tables) == 2
    assert table(1) is captured
    assert joint._captured_tables <= set(joint._partner_tables)


def test_positions_past_a_sample_just_below_2_31_are_64_bit():
    """A run or tile position is formed before it is tested against the sample's extent, up to
    a run (at most a few thousand pixels) past it: for a sample of 2^31 - 100 pixels the last
    run's 32-bit positions would wrap to negative values that pass `s < N`, so such a sample gets
    the 64-bit kernels too."""
    sizes = [boundary.EDGE_RUN_PIXELS, boundary.INTERPRETER_RUN_PIXELS]
    for k_pad in (16, 32, 64, 128):
        for dtype in (F32, F64):
            sizes += list(boundary.default_config(k_pad, dtype)[:3]) + [joint.default_config(k_pad, dtype).tile_pixels]
    sizes += [c.tile_pixels for c in (*joint.CONFIGS.values(), *joint.FLOAT64_CONFIGS.values())]
    assert max(sizes) <= INDEX_HEADROOM // 8
    assert needs_wide_index(INT32_LIMIT - 100)
    assert needs_wide_index(6, INT32_LIMIT - INDEX_HEADROOM + 1)
    assert not needs_wide_index(INT32_LIMIT - INDEX_HEADROOM)
    assert not needs_wide_index(1, 2**30)


def test_offsets_reaching_past_2_31_get_the_64_bit_kernels():
    """A tile is interior when its coordinates plus the tile plus the offsets' reach lie inside
    the sample (`x0 + TILE_W + halo_x <= W`): with an offset as long as the row, that sum passes
    2^31 in a sample whose element offsets all fit, and a 32-bit sum wraps to a value that
    passes the test (unmasked loads past the map). Such a problem gets the 64-bit kernels."""
    width = INT32_LIMIT - 2 * INDEX_HEADROOM
    p = torch.empty((1, 1, 1, width), device="meta")
    assert not joint._problem(p, p, None, (0, 0, 0, 1), None, None).wide
    assert joint._problem(p, p, None, (0, 0, 0, 2**30), None, None).wide


def test_more_joint_counts_than_32_bit_indices_reach_are_refused():
    """J's entries and the partial sums' rows are indexed in 32 bits: |O| K^2 past 2^31 (J alone
    8.6 GB in float32) is a clear error, not a wrapped index."""
    p = torch.empty((1, 1000, 4, 4), device="meta")
    offsets = tuple(flatten(make_offsets(24, 2)))  # 2401 offsets: 2.4e9 entries
    with pytest.raises(ValueError, match="past the 2\\^31"):
        joint._problem(p, p, None, offsets, None, None)
    assert not joint._problem(p, p, None, tuple(flatten(make_offsets(20, 2))), None, None).wide


@triton.jit
def _clamped_window_terms(value_ptr, out_ptr):
    """ncc_terms of a window with zero means and every raw term equal to the stored value."""
    value = tl.load(value_ptr + tl.arange(0, 16))
    zero = tl.zeros_like(value)
    _, _, _, _, cross, var_u, var_e = boundary.ncc_terms(zero, value, value, zero, value,
                                                         1.0, boundary.EPS_CC)
    lanes = tl.arange(0, 16)
    tl.store(out_ptr + lanes, cross)
    tl.store(out_ptr + 16 + lanes, var_u)
    tl.store(out_ptr + 32 + lanes, var_e)


def test_float64_clamps_compare_with_eps_in_float64():
    """The NCC terms are clamped at eps = 1e-5 as the reference's clamp does in the maps' dtype:
    a float64 value just below 1e-5 (but above its float32 rounding, 9.99999975e-6) is clamped;
    compared with a bare constant, the kernel compared against the float32 rounding and kept it."""
    just_below = torch.full((16,), 9.9999999e-6, dtype=F64, device=DEVICE)
    out = torch.zeros(48, dtype=F64, device=DEVICE)
    _clamped_window_terms[(1,)](just_below, out)
    assert torch.equal(out, torch.full_like(out, boundary.EPS_CC))


@triton.jit
def _flat_last_tile(table_ptr, s_ptr, inside_ptr, ok_ptr, tile, tiles_x, W,
                    ROWS: tl.constexpr, TILE_W: tl.constexpr):
    """A 64-bit flat tile's offsets, pixel test and partner test, stored."""
    b, z0, y0, x0, z, y, x, s, inside = tile_geometry(
        tile, 1, 1, tiles_x, 1, 1, W, 1, 1, TILE_W, False, True)
    ok = joint.partner_inside(table_ptr, tl.arange(0, ROWS), ROWS, z, y, x, inside, False, True)
    lanes = tl.arange(0, TILE_W)
    tl.store(s_ptr + lanes, s)
    tl.store(inside_ptr + lanes, inside.to(tl.int32))
    tl.store(ok_ptr + tl.arange(0, ROWS)[:, None] * TILE_W + lanes[None, :], ok.to(tl.int32))


def test_a_flat_sample_past_2_31_has_64_bit_coordinates():
    """With every offset 0 the joint kernels run a sample flat, as (1, 1, N): x runs up to N.
    For N past 2^31 the 64-bit kernels must form the coordinates (not only the offsets) in 64
    bits, and read the partner table's x range (which reaches N) in 64 bits: a 32-bit x of the
    last tile wraps to a negative value that passes `x < W`, and the kernels read (and the
    backward writes) before the sample. Checked on the index arithmetic alone (no 2^31 map)."""
    rows, tile_w = 16, 64
    n = INT32_LIMIT + 1000
    assert needs_wide_index(n)
    tiles_x = triton.cdiv(n, tile_w)
    table = torch.zeros(joint.TABLE_COLUMNS, rows, dtype=torch.int64, device=DEVICE)
    table[joint.COL_Y_HI.value] = 1  # offset 0: the partner of every pixel of the row is inside
    table[joint.COL_X_HI.value] = n
    s = torch.zeros(tile_w, dtype=torch.int64, device=DEVICE)
    inside = torch.zeros(tile_w, dtype=torch.int32, device=DEVICE)
    ok = torch.zeros(rows, tile_w, dtype=torch.int32, device=DEVICE)
    _flat_last_tile[(1,)](table, s, inside, ok, tiles_x - 1, tiles_x, n, ROWS=rows, TILE_W=tile_w)
    expected = (tiles_x - 1) * tile_w + torch.arange(tile_w, device=DEVICE)
    assert torch.equal(s, expected)
    assert torch.equal(inside.bool(), expected < n)
    assert torch.equal(ok.bool(), (expected < n).expand(rows, tile_w))


@pytest.mark.parametrize("where", ["batch", "channel"])
def test_index_arithmetic_past_2_31(huge_buffer, where, address_guard):
    """Maps whose element offsets pass 2^31 while the strides themselves fit in 32 bits (so
    Triton passes them as int32): the third sample starts at 3 * 3 * 2^29 elements (batch), or
    the third channel at 2 * (2^30 + 64) (channel, which makes the launchers compile the
    kernels with 64-bit per-element offsets). Every kernel must give the result of the same map
    made contiguous (bitwise under the interpreter; on a GPU within RTOL, as the 64-bit variant
    is a different compiled kernel), and (interpreter) never address memory outside its tensors.
    Before the 64-bit sample bases, each of these read and wrote outside the maps."""

    def same(actual, expected, what):
        if INTERPRETED:
            assert torch.equal(actual, expected), what
        else:
            assert_relative(actual, expected, RTOL[F32], what)

    shape = (3, 2, 6, 7) if where == "batch" else (1, 3, 6, 7)
    stride_b, stride_k = (3 * 2**29, 64) if where == "batch" else (4096, 2**30 + 64)
    assert max(stride_b, stride_k) < INT32_LIMIT
    assert (shape[0] - 1) * stride_b + (shape[1] - 1) * stride_k >= INT32_LIMIT
    p1 = strided_maps(huge_buffer, shape, stride_b, stride_k, 0, seed=1)
    p2 = strided_maps(huge_buffer, shape, stride_b, stride_k, 1024, seed=2)
    mask = huge_buffer.as_strided((shape[0],) + shape[2:], (stride_b, shape[3], 1), 2048)
    mask.copy_(random_mask(shape, seed=3)[:, 0].to(F16))
    edge = boundary_inputs(shape, F16)[1]
    dense = [t.contiguous() for t in (p1, p2, mask)]
    flat = flatten(make_offsets(1, 2))
    tile = (1, 4, 8)

    counts = joint.joint_counts(p1, p2, flat, mask, tile=tile)
    same(counts, joint.joint_counts(dense[0], dense[1], flat, dense[2], tile=tile), "J")
    grad_j = random_grad_j(9, shape[1], F32)
    grads = joint.joint_counts_backward(grad_j, p1, p2, flat, mask, tile=tile)
    expected = joint.joint_counts_backward(grad_j, dense[0], dense[1], flat, dense[2], tile=tile)
    for what, got, want in zip(("dL/dp1", "dL/dp2"), grads, expected):
        same(got, want, what)

    cc, u_range = boundary.boundary_cc(p1, edge, 3, tile=tile)
    cc_dense, u_range_dense = boundary.boundary_cc(dense[0], edge, 3, tile=tile)
    same(cc, cc_dense, "CC")
    same(u_range, u_range_dense, "U range")
    grad_cc = torch.tensor(0.7, device=DEVICE)
    same(boundary.boundary_cc_backward(grad_cc, p1, edge, u_range, 3, tile=tile),
         boundary.boundary_cc_backward(grad_cc, dense[0], edge, u_range, 3, tile=tile), "dCC/dp")

    # the edge map's image, channels (or samples) as far apart as the maps'
    image = huge_buffer.as_strided(shape, (stride_b, stride_k, shape[3], 1), 4096)
    image.copy_(random_image(shape, channels=shape[1], seed=4).to(F16))
    same(boundary.edge_map(image, 0.75), boundary.edge_map(image.contiguous(), 0.75), "edge map")
    if INTERPRETED:
        assert sum(address_guard) > 0  # the guard saw the kernels' accesses
