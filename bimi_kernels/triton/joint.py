"""Triton kernels for the all-offset joint counts (docs/contract.md §3), forward and backward.

Partner rows. The |O| offsets and the K channels of the partner map give |O| K "partner rows"
r = (o, k): row r of a pixel tile is map[k] at s + d_o. A chunk of ROWS such rows (ROWS a power
of two, rows packed across offsets, so only the last chunk is padded) is gathered straight from
the map as a (ROWS, TILE) operand; no shifted or unfolded copy of a map is ever made. One small
table per (offsets, shape) on the device (`partner_table`, cached) gives each row its element
offset k*stride_k + shift, its flat shift (for the mask), the coordinate range whose partner is
inside, and where its entries of dL/dJ sit.

Forward, J[o, i, j] = sum_s m p1[i, s] m p2[j, s + d_o]: grid (chunks, pixel programs). Program
(c, q) keeps a (ROWS, K_PAD) accumulator in registers while it walks the spatial tiles q,
q + Q, ... (tiles of one sample, x fastest); per tile it loads p1's (TILE, K_PAD) block once and
the chunk's partner rows, and adds partner_rows @ p1_tile (one tl.dot). At the end it writes the
accumulator once to partial[q]; `_sum_partials_kernel` adds the Q partials in program order and
writes J (deterministic, no atomics). Tiles whose halo lies inside the sample skip every bounds
test. All offsets zero (the authors' setting) is run as a 1-D problem: tiles are runs of a
flattened sample, a K x K product streamed at the memory rate. K above CHANNEL_BLOCK (128) runs
as one launch per block of p1's channels (the partner rows still cover all of p2's), so the
operands stay within the shared memory and the tuned launch tables.

Backward, one pass over the pixel tiles: for each tile, for each chunk, gather the partner rows
of p2 (offsets d) and of p1 (offsets -d) and accumulate
    dL/dp1[s, i] += rows_p2(s)^T @ G1[rows, i],   G1[(o, j), i] = G_o[i, j]
    dL/dp2[t, j] += rows_p1(t)^T @ G2[rows, j],   G2[(o, i), j] = G_o[i, j]
in registers ((TILE, K_PAD) each), then write each gradient element once. The partner rows come
from the tile's neighbourhood, so each map is read from memory about once plus its halo. Where
two (TILE, K_PAD) accumulators do not fit in registers (K_PAD >= 32, and float64 at any K: the
`split_backward` column of the launch tables), the same kernel runs twice, one gradient each, and
each pass reads both maps again; above CHANNEL_BLOCK channels, each pass runs once per block
of its gradient's channels.

Products: tl.dot everywhere. float32 maps use 3xTF32 on the GPU (error about float32's; plain
TF32 truncates and is not), or FMAs where few partner rows make the product memory-bound
(`product_precision`: offset 0 alone, for one); float16/bfloat16 maps without a mask use their
native tensor-core product with float32 accumulation in the forward (the products of two
half-precision numbers are exact in float32; with a mask they are widened first, `native_dot`),
and are widened to float32 (exact) against dL/dJ in the backward; float64 uses the float64
tensor-core product (DMMA). The interpreter computes every dot exactly in the accumulation dtype.

Roofline, H200 (4.3 TB/s copy, 67 TFLOP/s FP32 FMA, ~495 TFLOP/s dense TF32, so ~165 with
3xTF32), float32 maps, forward + backward. Bytes: read p1, p2 (forward), read both and write both
gradients (backward): 6 K B N words. FLOPs (useful): 6 |O| K^2 B N. The tensor cores do
(rows_pad K_PAD) / (|O| K K) times that (partner rows and K padded), and every gathered element
costs ~3 integer instructions (address) plus the 3xTF32 split on the CUDA cores:
- B=16 K=10 256x256 r=1 (|O|=9): 252 MB -> 59 us; 5.7 GFLOP -> 85 us FMA, 34 us 3xTF32, x1.7
  padded (96 rows, K_PAD 16) -> 58 us; 0.30 G gathered elements -> ~0.1 ms of integer issue.
  Expected: bound by the gather's issue rate and the tensor cores together, ~0.1-0.2 ms.
- B=16 K=10 256x256 r=3 (|O|=49): 252 MB -> 59 us; 31 GFLOP -> 460 us FMA, 186 us 3xTF32,
  x1.67 padded -> 310 us; 1.6 G gathered elements -> ~0.3-0.5 ms. Compute-bound, ~0.5 ms.
- B=16 K=40 256x256 r=1: 1.0 GB -> 234 us; 91 GFLOP -> 1.35 ms FMA, 0.55 ms 3xTF32, x1.64
  padded (K_PAD 64) -> 0.9 ms. Compute-bound, ~1 ms (the FP32-FMA roofline is 1.35 ms).
- offset 0 alone (B=16 K=10): 84 MB read -> 20 us; 16 x 16 padded products on FMAs are under
  the memory time (`product_precision`): memory-bound, like torch.mm at best.
What a GPU run must confirm (scripts/gpu_check.sh, scripts/triton_profile.py): these times
within 5x (>= 20 % of the roofline), no spills, the products on HMMA/HGMMA (DMMA for float64)
in the SASS, and offset 0 at least as fast as torch.einsum / torch.bmm on the same maps.
"""
from __future__ import annotations

import functools
import math
import threading
from typing import NamedTuple, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ..numerics import accumulation_dtype
from . import (
    CHANNEL_BLOCK,
    INTERPRETED,
    PARTIAL_BYTES_BUDGET,
    dot_precision,
    grid_size,
    multiprocessor_count,
    padded_k,
    spatial_dims,
)
from .tiles import (
    INT32_LIMIT,
    Tile,
    channel_axis,
    coordinate_in_range,
    grid_position,
    make_tile,
    map_extent,
    needs_wide_index,
    next_power_of_2,
    sample_pointer,
    tile_geometry,
    tile_is_interior,
    with_tile_shape,
)

# Columns of the partner table (column-major: column c of row r at c * rows_stride + r).
COL_MAP_OFFSET = tl.constexpr(0)  # k * stride_k + flat shift of the row's offset
COL_SHIFT = tl.constexpr(1)  # flat shift alone (the mask has no channel)
COL_Z_LO = tl.constexpr(2)  # pixels with z_lo <= z < z_hi have their partner inside
COL_Z_HI = tl.constexpr(3)
COL_Y_LO = tl.constexpr(4)
COL_Y_HI = tl.constexpr(5)
COL_X_LO = tl.constexpr(6)
COL_X_HI = tl.constexpr(7)
COL_GRAD_INDEX = tl.constexpr(8)  # index in dL/dJ of the row's entry for column 0
TABLE_COLUMNS = 9


# ------------------------------------------------------------------------------------------------
# @triton.jit helpers
# ------------------------------------------------------------------------------------------------
@triton.jit
def load_partner_rows(rows_ptr, rows, rows_stride, WIDE: tl.constexpr):
    """(map offset, flat shift) of a chunk of partner rows, each a (ROWS,) vector."""
    map_offset = tl.load(rows_ptr + COL_MAP_OFFSET * rows_stride + rows)
    shift = tl.load(rows_ptr + COL_SHIFT * rows_stride + rows)
    if WIDE:
        return map_offset, shift
    else:
        return map_offset.to(tl.int32), shift.to(tl.int32)


@triton.jit
def partner_inside(rows_ptr, rows, rows_stride, z, y, x, inside, IS_3D: tl.constexpr, WIDE: tl.constexpr):
    """(ROWS, TILE) validity: the pixel is in the sample and its partner s + d_o too. The
    ranges are read here, for the border tiles only, rather than held in registers; 32-bit like
    the coordinates unless WIDE (a flat sample's x range reaches N)."""
    y_lo = tl.load(rows_ptr + COL_Y_LO * rows_stride + rows)
    y_hi = tl.load(rows_ptr + COL_Y_HI * rows_stride + rows)
    x_lo = tl.load(rows_ptr + COL_X_LO * rows_stride + rows)
    x_hi = tl.load(rows_ptr + COL_X_HI * rows_stride + rows)
    if not WIDE:
        y_lo, y_hi, x_lo, x_hi = y_lo.to(tl.int32), y_hi.to(tl.int32), x_lo.to(tl.int32), x_hi.to(tl.int32)
    ok = inside[None, :] & coordinate_in_range(y, y_lo, y_hi)
    ok = ok & coordinate_in_range(x, x_lo, x_hi)
    if IS_3D:
        z_lo = tl.load(rows_ptr + COL_Z_LO * rows_stride + rows)
        z_hi = tl.load(rows_ptr + COL_Z_HI * rows_stride + rows)
        if not WIDE:
            z_lo, z_hi = z_lo.to(tl.int32), z_hi.to(tl.int32)
        ok = ok & coordinate_in_range(z, z_lo, z_hi)
    return ok


@triton.jit
def gather_partner_rows(map_base, mask_base, map_offset, shift, s, ok, OUT_DTYPE: tl.constexpr,
                        CHECK: tl.constexpr, HAS_MASK: tl.constexpr):
    """(ROWS, TILE) block in OUT_DTYPE: row r at pixel s is map[k_r, s + d_r] (times the mask
    there). CHECK=False for interior tiles: every address is inside, no predicate."""
    if CHECK:
        rows = tl.load(map_base + (map_offset[:, None] + s[None, :]), mask=ok, other=0.0)
    else:
        rows = tl.load(map_base + (map_offset[:, None] + s[None, :]))
    rows = rows.to(OUT_DTYPE)
    if HAS_MASK:
        if CHECK:
            weight = tl.load(mask_base + (shift[:, None] + s[None, :]), mask=ok, other=0.0)
        else:
            weight = tl.load(mask_base + (shift[:, None] + s[None, :]))
        rows = rows * weight.to(OUT_DTYPE)
    return rows


@triton.jit
def partner_block(map_base, mask_base, map_offset, shift, rows_ptr, rows, rows_stride, row_ok,
                  s, z, y, x, inside, interior, OUT_DTYPE: tl.constexpr,
                  IS_3D: tl.constexpr, HAS_MASK: tl.constexpr, WIDE: tl.constexpr):
    """The chunk's (ROWS, TILE) partner rows of a tile: on an interior tile, where every partner
    lies inside the sample, masked by row alone (rows past the table's end read as zero); on a
    border tile, with the partner test of every pixel."""
    if interior:
        block = gather_partner_rows(map_base, mask_base, map_offset, shift, s, row_ok[:, None],
                                    OUT_DTYPE, True, HAS_MASK)
    else:
        ok = partner_inside(rows_ptr, rows, rows_stride, z, y, x, inside, IS_3D, WIDE)
        block = gather_partner_rows(map_base, mask_base, map_offset, shift, s, ok,
                                    OUT_DTYPE, True, HAS_MASK)
    return block


@triton.jit
def accumulate_gradient(acc, grad_j_ptr, map_base, mask_base, rows_ptr, rows, rows_stride,
                        row_ok, column_stride, k, k_ok, s, z, y, x, inside, interior,
                        DOT_PRECISION: tl.constexpr, IS_3D: tl.constexpr,
                        HAS_MASK: tl.constexpr, WIDE: tl.constexpr):
    """acc (TILE, K_PAD) += partner_rows^T @ G_rows: the chunk's contribution to one map's
    gradient. G_rows[r, c] = dL/dJ[index_r + c * column_stride] (the table's COL_GRAD_INDEX)."""
    map_offset, shift = load_partner_rows(rows_ptr, rows, rows_stride, WIDE)
    block = partner_block(map_base, mask_base, map_offset, shift, rows_ptr, rows, rows_stride,
                          row_ok, s, z, y, x, inside, interior, acc.dtype, IS_3D, HAS_MASK, WIDE)
    g_index = tl.load(rows_ptr + COL_GRAD_INDEX * rows_stride + rows)
    g = tl.load(grad_j_ptr + (g_index[:, None] + k[None, :] * column_stride),
                mask=row_ok[:, None] & k_ok[None, :], other=0.0)
    return tl.dot(tl.trans(block), g, acc, input_precision=DOT_PRECISION, out_dtype=acc.dtype)


@triton.jit
def store_gradient(grad_ptr, b, stride_b, out_channel, acc, weight, s, inside, k_ok,
                   HAS_MASK: tl.constexpr):
    """Write a tile's (TILE, K_PAD) gradient once, times the mask at the pixel."""
    if HAS_MASK:
        acc = acc * weight
    out = sample_pointer(grad_ptr, b, stride_b) + (s[:, None] + out_channel[None, :])
    tl.store(out, acc.to(grad_ptr.dtype.element_ty), mask=inside[:, None] & k_ok[None, :])


# ------------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------------
@triton.jit
def _joint_counts_forward_kernel(
    p1_ptr, p2_ptr, mask_ptr, rows_ptr, partial_ptr,
    p1_stride_b, p1_stride_k, p2_stride_b, mask_stride_b,
    K, D, H, W, n_rows, rows_stride,
    tiles_z, tiles_y, tiles_x, n_tiles, halo_z, halo_y, halo_x,
    IS_3D: tl.constexpr, HAS_MASK: tl.constexpr, WIDE: tl.constexpr,
    NATIVE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    K_PAD: tl.constexpr, ROWS: tl.constexpr,
    TILE_D: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr,
):
    chunk, pid, n_programs = grid_position()
    acc_dtype = partial_ptr.dtype.element_ty
    if NATIVE_DOT:
        operand_dtype = p1_ptr.dtype.element_ty
    else:
        operand_dtype = acc_dtype

    rows = chunk * ROWS + tl.arange(0, ROWS)
    map_offset, shift = load_partner_rows(rows_ptr, rows, rows_stride, WIDE)  # for every tile
    k, k_ok, channel = channel_axis(K, K_PAD, p1_stride_k, WIDE)
    row_ok = rows < n_rows
    acc = tl.zeros((ROWS, K_PAD), dtype=acc_dtype)
    for tile in range(pid, n_tiles, n_programs):
        b, z0, y0, x0, z, y, x, s, inside = tile_geometry(
            tile, tiles_z, tiles_y, tiles_x, D, H, W, TILE_D, TILE_H, TILE_W, IS_3D, WIDE)
        mask_base = sample_pointer(mask_ptr, b, mask_stride_b)
        # p1's (TILE, K_PAD) block, read once for every partner row of the chunk
        a = tl.load(sample_pointer(p1_ptr, b, p1_stride_b) + (s[:, None] + channel[None, :]),
                    mask=inside[:, None] & k_ok[None, :], other=0.0).to(operand_dtype)
        if HAS_MASK:
            a = a * tl.load(mask_base + s, mask=inside, other=0.0).to(operand_dtype)[:, None]
        interior = tile_is_interior(z0, y0, x0, D, H, W, halo_z, halo_y, halo_x,
                                    TILE_D, TILE_H, TILE_W, IS_3D)
        c = partner_block(sample_pointer(p2_ptr, b, p2_stride_b), mask_base, map_offset, shift,
                          rows_ptr, rows, rows_stride, row_ok, s, z, y, x, inside, interior,
                          operand_dtype, IS_3D, HAS_MASK, WIDE)
        if NATIVE_DOT:
            acc = tl.dot(c, a, acc)
        else:
            acc = tl.dot(c, a, acc, input_precision=DOT_PRECISION, out_dtype=acc_dtype)

    kk = tl.arange(0, K_PAD)
    out = partial_ptr + pid.to(tl.int64) * rows_stride * K_PAD
    tl.store(out + rows[:, None] * K_PAD + kk[None, :], acc)


@triton.jit
def _sum_partials_kernel(partial_ptr, out_ptr, n_partials, partial_stride, K, K_BLOCK, I0, n_out,
                         K_PAD: tl.constexpr, BLOCK: tl.constexpr):
    """J[o, I0 + i, j] = sum over programs q, in order, of partial[q, o K + j, i], for the
    K_BLOCK channels i of p1 that one forward launch covered (n_out = |O| K_BLOCK K)."""
    index = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = index < n_out
    o = index // (K_BLOCK * K)
    i = (index // K) % K_BLOCK
    j = index % K
    source = (o * K + j) * K_PAD + i
    total = tl.zeros((BLOCK,), dtype=out_ptr.dtype.element_ty)
    for q in range(0, n_partials):
        total += tl.load(partial_ptr + q * partial_stride + source, mask=ok, other=0.0)
    tl.store(out_ptr + (o * K + I0 + i) * K + j, total, mask=ok)


@triton.jit
def _joint_counts_backward_kernel(
    grad_j_ptr, p1_ptr, p2_ptr, mask_ptr, rows_ptr, reverse_rows_ptr, grad_p1_ptr, grad_p2_ptr,
    p1_stride_b, p2_stride_b, mask_stride_b, grad_stride_b, grad_stride_k,
    K, D, H, W, n_rows, rows_stride, n_chunks,
    tiles_z, tiles_y, tiles_x, n_tiles, halo_z, halo_y, halo_x, K_OUT,
    GRAD_P1: tl.constexpr, GRAD_P2: tl.constexpr, BLOCKED: tl.constexpr,
    IS_3D: tl.constexpr, HAS_MASK: tl.constexpr, WIDE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, K_PAD: tl.constexpr, ROWS: tl.constexpr,
    TILE_D: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr,
):
    # GRAD_P1 / GRAD_P2 pick the gradients of this launch: both in one pass over the pixels,
    # or one each in two launches when both accumulators would not fit the registers. BLOCKED:
    # K_OUT of the K channels are written, one block (the launcher offsets the gradient and
    # dL/dJ pointers to the block's first channel); else all K, K_OUT unused. Both that and
    # K_OUT's place last among the arguments keep ptxas from spilling in some variants
    # (float32 K=10 offset 0, float64 K=40 3-D: scripts/triton_compile_check.py).
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    acc_dtype = grad_j_ptr.dtype.element_ty
    if BLOCKED:
        k, k_ok, out_channel = channel_axis(K_OUT, K_PAD, grad_stride_k, WIDE)
    else:
        k, k_ok, out_channel = channel_axis(K, K_PAD, grad_stride_k, WIDE)
    for tile in range(pid, n_tiles, n_programs):
        b, z0, y0, x0, z, y, x, s, inside = tile_geometry(
            tile, tiles_z, tiles_y, tiles_x, D, H, W, TILE_D, TILE_H, TILE_W, IS_3D, WIDE)
        interior = tile_is_interior(z0, y0, x0, D, H, W, halo_z, halo_y, halo_x,
                                    TILE_D, TILE_H, TILE_W, IS_3D)
        mask_base = sample_pointer(mask_ptr, b, mask_stride_b)
        grad1 = tl.zeros((TILE_D * TILE_H * TILE_W, K_PAD), dtype=acc_dtype)
        grad2 = tl.zeros((TILE_D * TILE_H * TILE_W, K_PAD), dtype=acc_dtype)
        for chunk in range(0, n_chunks):
            rows = chunk * ROWS + tl.arange(0, ROWS)
            row_ok = rows < n_rows
            if GRAD_P1:
                # dL/dp1[s, i] += sum_(o, j) p2[j, s + d_o] G_o[i, j]: rows (o, j), stride K
                grad1 = accumulate_gradient(
                    grad1, grad_j_ptr, sample_pointer(p2_ptr, b, p2_stride_b), mask_base,
                    rows_ptr, rows, rows_stride, row_ok, K, k, k_ok, s, z, y, x, inside,
                    interior, DOT_PRECISION, IS_3D, HAS_MASK, WIDE)
            if GRAD_P2:
                # dL/dp2[t, j] += sum_(o, i) p1[i, t - d_o] G_o[i, j]: rows (o, i), stride 1
                grad2 = accumulate_gradient(
                    grad2, grad_j_ptr, sample_pointer(p1_ptr, b, p1_stride_b), mask_base,
                    reverse_rows_ptr, rows, rows_stride, row_ok, 1, k, k_ok, s, z, y, x,
                    inside, interior, DOT_PRECISION, IS_3D, HAS_MASK, WIDE)
        if HAS_MASK:
            weight = tl.load(mask_base + s, mask=inside, other=0.0).to(acc_dtype)[:, None]
        else:
            weight = tl.full((1, 1), 1.0, acc_dtype)  # not applied
        if GRAD_P1:
            store_gradient(grad_p1_ptr, b, grad_stride_b, out_channel, grad1, weight, s, inside,
                           k_ok, HAS_MASK)
        if GRAD_P2:
            store_gradient(grad_p2_ptr, b, grad_stride_b, out_channel, grad2, weight, s, inside,
                           k_ok, HAS_MASK)


# ------------------------------------------------------------------------------------------------
# host side: partner tables, launch settings, launchers
# ------------------------------------------------------------------------------------------------
class Geometry(NamedTuple):
    """What the kernels see of a problem. All-zero offsets run as a 1-D problem (D = H = 1,
    W = N): the partner is the pixel itself, so tiles can be plain runs of a sample."""

    dims: Tuple[int, int, int]
    ndim: int
    offsets: Tuple[int, ...]  # flat, ndim values per offset
    halo: Tuple[int, int, int]  # max |d| per dim (z, y, x)
    flat: bool  # all offsets zero, run as (1, 1, N)


@functools.lru_cache(maxsize=256)
def geometry(flat_offsets: Tuple[int, ...], ndim: int, dims: Tuple[int, int, int]) -> Geometry:
    if not any(flat_offsets):
        n_offsets = len(flat_offsets) // ndim
        return Geometry((1, 1, dims[0] * dims[1] * dims[2]), 2, (0, 0) * n_offsets, (0, 0, 0),
                        True)
    per_dim = [flat_offsets[i::ndim] for i in range(ndim)]
    halo = tuple(max(abs(v) for v in values) for values in per_dim)
    return Geometry(dims, ndim, flat_offsets, (0,) * (3 - ndim) + halo, False)


class _CachedTable:
    """A partner table on its device and the streams (handles) it was used on."""

    __slots__ = ("table", "streams")

    def __init__(self, table: torch.Tensor):
        self.table = table
        self.streams: set = set()


_partner_tables: dict = {}  # key -> _CachedTable
_captured_tables: set = set()  # keys of tables a CUDA graph capture used: never freed
_partner_tables_lock = threading.Lock()
PARTNER_TABLES_KEPT = 512


def partner_table(geo: Geometry, k: int, stride_k: int, reverse: bool, rows_pad: int,
                  device: torch.device) -> torch.Tensor:
    """The (TABLE_COLUMNS, rows_pad) int64 table of the partner rows r = o K + k (offset d_o,
    or -d_o when `reverse`) on `device`; rows past |O| K are padding (no pixel has its partner
    inside them, and their dL/dJ entries are masked off). Cached: a training loop copies each
    table to the device once."""
    key = (geo, k, stride_k, reverse, rows_pad, str(device))
    cuda = device.type == "cuda"
    capturing = cuda and torch.cuda.is_current_stream_capturing()
    with _partner_tables_lock:
        entry = _partner_tables.get(key)
        if entry is not None:
            if capturing:  # the graph keeps this table's address: it must outlive the graph
                _captured_tables.add(key)
            elif cuda:
                _note_stream(entry, device)
            return entry.table
    if capturing:
        raise RuntimeError(
            "bimi_kernels (triton): the first call with these shapes and offsets copies a table "
            "to the GPU, which a CUDA graph capture does not allow; run the loss once before "
            "capturing (torch.compile(mode=\"reduce-overhead\") does: it warms up first)")
    depth, height, width = geo.dims
    sign = -1 if reverse else 1
    columns = [[0] * rows_pad for _ in range(TABLE_COLUMNS)]
    flat = geo.offsets
    for o in range(len(flat) // geo.ndim):
        d = (0,) * (3 - geo.ndim) + tuple(sign * v for v in flat[o * geo.ndim:(o + 1) * geo.ndim])
        shift = (d[0] * height + d[1]) * width + d[2]
        ranges = []
        for delta, size in zip(d, geo.dims):
            ranges += [max(0, -delta), size - max(0, delta)]
        for channel in range(k):
            r = o * k + channel
            columns[COL_MAP_OFFSET.value][r] = channel * stride_k + shift
            columns[COL_SHIFT.value][r] = shift
            for column, value in zip(range(COL_Z_LO.value, COL_X_HI.value + 1), ranges):
                columns[column][r] = value
            # forward table: rows (o, j), dL/dJ[o, i, j] at o K^2 + j + i K (column stride K);
            # reverse table: rows (o, i), dL/dJ[o, i, j] at o K^2 + i K + j (column stride 1)
            columns[COL_GRAD_INDEX.value][r] = o * k * k + (channel * k if reverse else channel)
    table = _copy_outside_graph_pools(torch.tensor(columns, dtype=torch.int64), device)
    with _partner_tables_lock:
        entry = _partner_tables.get(key)  # another thread may have made it meanwhile
        if entry is None:
            if len(_partner_tables) >= PARTNER_TABLES_KEPT:
                _forget_partner_tables()
            entry = _partner_tables[key] = _CachedTable(table)
        if cuda:
            _note_stream(entry, device)
        return entry.table


def _copy_outside_graph_pools(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`host` copied to `device` by a short-lived thread of its own. A cached table outlives the
    call that made it, but torch.compile(mode="reduce-overhead") sends every allocation the
    calling thread makes during its warm-up runs to its CUDA-graph memory pool, which it takes
    back (freeing all it does not track) when it records another graph: a table made there would
    be freed under the cache, and replays would read reused memory. Another thread allocates
    from the ordinary pool; the copy from pageable memory has finished when .to() returns (it
    ends with a stream synchronisation), so any stream may read the table at once."""
    if device.type == "cpu":
        return host
    if device.type == "cuda" and device.index is None:  # the other thread has its own current device
        device = torch.device("cuda", torch.cuda.current_device())
    result: dict = {}

    def copy() -> None:
        try:
            result["table"] = host.to(device)
        except BaseException as exc:  # re-raised in the caller
            result["error"] = exc

    thread = threading.Thread(target=copy, name="bimi-partner-table-copy")
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["table"]


def _note_stream(entry: _CachedTable, device: torch.device) -> None:
    """The first use of a table on a stream is recorded with the allocator, so that once the
    cache forgets the table its memory is handed out again only after the work then queued on
    every stream that used it (the allocator alone knows the stream it was made on)."""
    stream = torch.cuda.current_stream(device)
    if stream.cuda_stream not in entry.streams:
        entry.streams.add(stream.cuda_stream)
        entry.table.record_stream(stream)


def _forget_partner_tables() -> None:
    """A long-running process with many shapes: start over (with the lock held), keeping the
    tables a captured CUDA graph reads by address."""
    for key in list(_partner_tables):
        if key not in _captured_tables:
            del _partner_tables[key]


class JointConfig(NamedTuple):
    rows: int  # partner rows per chunk at most (a power of two >= 16)
    tile_pixels: int  # pixels per tile (a power of two >= 16)
    num_warps: int
    split_backward: bool = False  # dL/dp1 and dL/dp2 in two launches (fewer live registers)


# Under the interpreter every operation costs ~0.1 ms of Python whatever its size and a nested
# @triton.jit call ~0.6 ms: few, big tiles; tensors stay under Triton's 2^20-element limit.
INTERPRETER_TILE_PIXELS = 1024
INTERPRETER_ROW_ELEMENTS = 1 << 18


def default_config(k_pad: int, dtype: torch.dtype) -> JointConfig:
    """Launch settings sized from K and the dtype. On a GPU each program holds in registers the
    (ROWS, TILE) partner rows with their addresses, the (TILE, K_PAD) map block and the
    accumulators; the sizes below keep sm_90 code free of spills for K up to 128 in every
    dtype (scripts/triton_compile_check.py; float64 counts twice)."""
    if INTERPRETED:
        tile = max(16, min(INTERPRETER_TILE_PIXELS, (1 << 20) // (4 * k_pad)))
        return JointConfig(max(16, INTERPRETER_ROW_ELEMENTS // tile), tile, 4)
    table = FLOAT64_CONFIGS if dtype == torch.float64 else CONFIGS
    return table[min(max(k_pad, 16), 128)]


# (max rows per chunk, tile pixels, warps, split backward) by K_PAD, from
# `python scripts/triton_compile_check.py` on sm_90: no spills, registers <= 255.
CONFIGS = {
    16: JointConfig(32, 64, 4),
    32: JointConfig(32, 32, 4, split_backward=True),
    64: JointConfig(16, 32, 4, split_backward=True),
    128: JointConfig(16, 16, 8, split_backward=True),
}
FLOAT64_CONFIGS = {
    16: JointConfig(16, 32, 4, split_backward=True),
    32: JointConfig(16, 32, 4, split_backward=True),
    64: JointConfig(16, 16, 4, split_backward=True),
    128: JointConfig(16, 16, 8, split_backward=True),
}


def chunk_rows(n_rows: int, k_pad: int, max_rows: int) -> int:
    """Rows per chunk: the power of two in [16, max_rows] that minimises the padded rows plus,
    per chunk, the reload of the (TILE, K_PAD) map block (counted as K_PAD / 2 rows)."""
    candidates = []
    rows = 16
    while rows <= max(16, min(max_rows, next_power_of_2(n_rows))):
        chunks = triton.cdiv(n_rows, rows)
        candidates.append((chunks * rows + chunks * k_pad / 2, -rows))
        rows *= 2
    return -min(candidates)[1]


def _dense_spatial(t: torch.Tensor, lead: int) -> torch.Tensor:
    """t itself when its dims after the first `lead` ones are laid out densely, else a
    contiguous copy: the kernels take the batch and channel strides as arguments and assume
    dense pixels."""
    expected = 1
    for size, stride in zip(reversed(t.shape[lead:]), reversed(t.stride()[lead:])):
        if size != 1 and stride != expected:
            return t.contiguous()
        expected *= size
    return t


def _prepare(p1, p2, mask):
    p1, p2 = _dense_spatial(p1, 2), _dense_spatial(p2, 2)
    if mask is not None:
        mask = _dense_spatial(mask.reshape(mask.shape[0], *p1.shape[2:]), 1)
    return p1, p2, mask


class _Problem(NamedTuple):
    batch: int
    k: int
    k_pad: int
    n: int
    geo: Geometry
    tile: Tile
    n_tiles: int
    config: JointConfig
    rows: int
    n_rows: int
    rows_pad: int
    n_chunks: int
    wide: bool
    channel_block: int  # channels per launch (all K, or blocks of CHANNEL_BLOCK)

    @property
    def blocked(self) -> bool:
        """K is covered in several blocks of channels."""
        return self.channel_block < self.k

    def channel_blocks(self):
        """(first channel, channels) of each launch's block."""
        return [(i0, min(self.channel_block, self.k - i0)) for i0 in range(0, self.k, self.channel_block)]


def _problem(p1, p2, mask, flat_offsets, config, tile_shape, grads=(),
             channel_block: Optional[int] = None) -> _Problem:
    """The launch geometry of a call; cached on what it depends on (shapes, channel strides,
    dtype, offsets, settings), so a training loop pays for it once."""
    return _cached_problem(
        tuple(p1.shape), p1.dtype, tuple(int(t.stride(1)) for t in (p1, p2, *grads)),
        mask is not None, tuple(flat_offsets), config,
        None if tile_shape is None else tuple(tile_shape),
        CHANNEL_BLOCK if channel_block is None else int(channel_block),
    )


@functools.lru_cache(maxsize=256)
def _cached_problem(shape, dtype, channel_strides, has_mask, flat, config, tile_shape,
                    channel_block):
    batch, k = int(shape[0]), int(shape[1])
    ndim = len(shape) - 2
    d, h, w, n = spatial_dims(shape)
    flat = tuple(int(v) for v in flat)
    geo = geometry(flat, ndim, (d, h, w))
    channel_block = max(1, min(k, channel_block))
    k_pad = padded_k(channel_block)
    config = config or default_config(k_pad, dtype)
    n_rows = len(flat) // ndim * k
    rows = chunk_rows(n_rows, k_pad, config.rows)
    n_chunks = triton.cdiv(n_rows, rows)
    # J and the per-program partial sums are indexed in 32 bits (entries of (|O|, K, K), rows of
    # a chunk table): refused past that, where J alone would pass 8 GB in float32
    entries = max(len(flat) // ndim * k * k, n_chunks * rows * k_pad)
    if entries >= INT32_LIMIT:
        raise ValueError(
            f"triton backend: {len(flat) // ndim} offsets x K^2 = {k} x {k} make {entries} joint-count "
            f"entries, past the 2^31 one call can index; use fewer offsets or clusters")
    if tile_shape is None:
        # all-zero offsets: runs of a flattened sample, as long as the tile
        pixels = config.tile_pixels
        tile = make_tile(geo.dims, pixels, max_width=pixels if geo.flat else 64)
    else:
        tile = with_tile_shape(geo.dims, (1, 1, math.prod(tile_shape)) if geo.flat else
                               tile_shape)
    # the interior test forms a coordinate plus a tile plus the halo: offsets may reach past
    # the sample, so that sum can pass 2^31 where no element offset does
    extents = [map_extent(k, stride, n) for stride in channel_strides] + [n] + \
        [size + reach for size, reach in zip(geo.dims, geo.halo)]
    return _Problem(
        batch, k, k_pad, n, geo, tile, batch * tile.per_sample, config, rows, n_rows,
        n_chunks * rows, n_chunks, needs_wide_index(*extents), channel_block,
    )


def native_dot(dtype: torch.dtype, has_mask: bool) -> bool:
    """Half-precision maps multiply on their own tensor-core path in the forward (exact
    products, float32 sums); the interpreter has no bfloat16 dot, so it widens those first.
    Not with a mask: the operands would be mask x probability rounded to the half dtype (a
    relative error of up to 2^-11 per term for fractional weights in float16, 2^-8 in bfloat16,
    docs/contract.md §2), so masked maps are widened and multiplied at the float32 precision."""
    return not has_mask and (dtype == torch.float16 or (dtype == torch.bfloat16 and not INTERPRETED))


def forward_constexprs(prob: _Problem, dtype: torch.dtype, has_mask: bool,
                       precision: str) -> dict:
    """The compile-time settings of `_joint_counts_forward_kernel` (also used by
    scripts/triton_compile_check.py)."""
    return dict(
        IS_3D=prob.geo.ndim == 3, HAS_MASK=has_mask, WIDE=prob.wide,
        NATIVE_DOT=native_dot(dtype, has_mask), DOT_PRECISION=precision,
        K_PAD=prob.k_pad, ROWS=prob.rows,
        TILE_D=prob.tile.depth, TILE_H=prob.tile.height, TILE_W=prob.tile.width,
        num_warps=prob.config.num_warps,
    )


def backward_passes(prob: _Problem, split: Optional[bool] = None):
    """(GRAD_P1, GRAD_P2) of each backward launch. Channel blocks always split: the two
    gradients read dL/dJ along different axes, so a block's offset into it differs."""
    split = prob.blocked or (prob.config.split_backward if split is None else bool(split))
    return [(True, False), (False, True)] if split else [(True, True)]


def backward_constexprs(prob: _Problem, has_mask: bool, precision: str,
                        want_p1: bool, want_p2: bool) -> dict:
    """The compile-time settings of `_joint_counts_backward_kernel`."""
    return dict(
        GRAD_P1=want_p1, GRAD_P2=want_p2, BLOCKED=prob.blocked,
        IS_3D=prob.geo.ndim == 3, HAS_MASK=has_mask, WIDE=prob.wide,
        DOT_PRECISION=precision, K_PAD=prob.k_pad, ROWS=prob.rows,
        TILE_D=prob.tile.depth, TILE_H=prob.tile.height, TILE_W=prob.tile.width,
        num_warps=prob.config.num_warps,
    )


def product_precision(prob: _Problem, precision: str) -> str:
    """float32 products on FMAs ("ieee") where the padded product is cheap next to the bytes
    (few partner rows: offset 0 alone, for one): FMAs do it within the memory time and keep
    3xTF32's operand splits out of the registers (sm_90: 72 against 255 registers for the
    forward at K=10, offset 0). Balance on an H200: 67 TFLOP/s FMA against 4.3 TB/s, so
    2 rows_pad K_PAD FLOP per 8 K bytes of a pixel is memory-bound below rows_pad K_PAD ~ 62 K;
    a factor 2 of margin."""
    if precision == "tf32x3" and prob.rows_pad * prob.k_pad <= 32 * prob.k:
        return "ieee"
    return precision


def _mask_stride(mask, fallback):
    return int(mask.stride(0)) if mask is not None else int(fallback.stride(0))


def joint_counts(p1, p2, offsets, mask=None, *, config: Optional[JointConfig] = None,
                 tile: Optional[Sequence[int]] = None, max_programs: Optional[int] = None,
                 channel_block: Optional[int] = None):
    """J (|O|, K, K) in the accumulation dtype; the backend contract's `joint_counts`.

    p1, p2: (B, K, *S) with dense spatial dims (any batch and channel strides); mask None or
    (B, *S). `config` (launch settings), `tile` (an explicit (TILE_D, TILE_H, TILE_W); a 2-D
    map takes TILE_D = 1), `max_programs` (programs along the pixels) and `channel_block` (p1's
    channels per launch, default CHANNEL_BLOCK) override the defaults; tests use them to cover
    the GPU's grid shapes under the interpreter.
    """
    p1, p2, mask = _prepare(p1, p2, mask)
    prob = _problem(p1, p2, mask, offsets, config, tile, channel_block=channel_block)
    acc_dtype = accumulation_dtype(p1.dtype)
    n_offsets = prob.n_rows // max(prob.k, 1)
    if prob.n_tiles == 0 or n_offsets == 0:
        return torch.zeros((n_offsets, prob.k, prob.k), dtype=acc_dtype, device=p1.device)
    table = partner_table(prob.geo, prob.k, int(p2.stride(1)), False, prob.rows_pad, p1.device)

    # programs along the pixels: fill the GPU together with the chunks, within a bound on the
    # partial sums' memory
    slot_bytes = prob.rows_pad * prob.k_pad * torch.finfo(acc_dtype).bits // 8
    if INTERPRETED:
        n_programs = min(prob.n_tiles, 2)
    else:
        target = 4 * multiprocessor_count(p1.device)
        n_programs = min(prob.n_tiles, max(1, triton.cdiv(target, prob.n_chunks)),
                         max(1, PARTIAL_BYTES_BUDGET // slot_bytes))
    if max_programs is not None:
        n_programs = max(1, min(prob.n_tiles, int(max_programs)))
    partial = torch.empty((n_programs, prob.rows_pad, prob.k_pad), dtype=acc_dtype,
                          device=p1.device)
    has_mask = mask is not None
    depth, height, width = prob.geo.dims
    constexprs = forward_constexprs(prob, p1.dtype, has_mask,
                                    product_precision(prob, dot_precision(p1.device, acc_dtype)))
    counts = torch.empty((n_offsets, prob.k, prob.k), dtype=acc_dtype, device=p1.device)
    for i0, channels in prob.channel_blocks():
        # J[:, i0:i0 + channels, :]: p1's block of channels against every partner row of p2
        p1_block = p1.narrow(1, i0, channels)
        _joint_counts_forward_kernel[(prob.n_chunks, n_programs)](
            p1_block, p2, mask if has_mask else p1, table, partial,
            p1.stride(0), p1.stride(1), p2.stride(0), _mask_stride(mask, p1),
            channels, depth, height, width, prob.n_rows, prob.rows_pad,
            prob.tile.tiles_z, prob.tile.tiles_y, prob.tile.tiles_x, prob.n_tiles,
            *prob.geo.halo, **constexprs,
        )
        n_out = n_offsets * channels * prob.k
        block = 1024 if not INTERPRETED else max(16, next_power_of_2(n_out))
        _sum_partials_kernel[(triton.cdiv(n_out, block),)](
            partial, counts, n_programs, prob.rows_pad * prob.k_pad, prob.k, channels, i0, n_out,
            K_PAD=prob.k_pad, BLOCK=block, num_warps=4,
        )
    return counts


def joint_counts_backward(grad_j, p1, p2, offsets, mask=None, *,
                          config: Optional[JointConfig] = None,
                          tile: Optional[Sequence[int]] = None,
                          max_programs: Optional[int] = None, split: Optional[bool] = None,
                          channel_block: Optional[int] = None):
    """(grad_p1, grad_p2) in the dtypes of p1 and p2; the contract's `joint_counts_backward`.

    `split` (default: the launch config's choice) computes the two gradients in two launches;
    `channel_block`: each gradient's channels per launch.
    """
    p1, p2, mask = _prepare(p1, p2, mask)
    grad_p1 = torch.empty(p1.shape, dtype=p1.dtype, device=p1.device)
    grad_p2 = torch.empty(p2.shape, dtype=p2.dtype, device=p2.device)
    prob = _problem(p1, p2, mask, offsets, config, tile, grads=(grad_p1,),
                    channel_block=channel_block)
    acc_dtype = accumulation_dtype(p1.dtype)
    if prob.n_tiles == 0:
        return grad_p1, grad_p2
    if prob.n_rows == 0:
        return grad_p1.zero_(), grad_p2.zero_()
    grad_j = grad_j.to(acc_dtype).contiguous()
    table = partner_table(prob.geo, prob.k, int(p2.stride(1)), False, prob.rows_pad, p1.device)
    reverse = partner_table(prob.geo, prob.k, int(p1.stride(1)), True, prob.rows_pad, p1.device)
    n_programs = grid_size(prob.n_tiles, p1.device)
    if max_programs is not None:
        n_programs = max(1, min(prob.n_tiles, int(max_programs)))
    has_mask = mask is not None
    precision = product_precision(prob, dot_precision(p1.device, acc_dtype))
    depth, height, width = prob.geo.dims
    flat_grad_j = grad_j.reshape(-1)
    for want_p1, want_p2 in backward_passes(prob, split):
        for i0, channels in prob.channel_blocks():
            # output channels i0 .. i0 + channels: dL/dJ's entries for them start i0 columns
            # in, a column being K entries apart for dL/dp1 and 1 for dL/dp2 (the partner tables)
            g_start = i0 * prob.k if want_p1 else i0
            _joint_counts_backward_kernel[(n_programs,)](
                flat_grad_j[g_start:], p1, p2, mask if has_mask else p1, table, reverse,
                grad_p1.narrow(1, i0, channels), grad_p2.narrow(1, i0, channels),
                p1.stride(0), p2.stride(0), _mask_stride(mask, p1),
                grad_p1.stride(0), grad_p1.stride(1),
                prob.k, depth, height, width, prob.n_rows, prob.rows_pad, prob.n_chunks,
                prob.tile.tiles_z, prob.tile.tiles_y, prob.tile.tiles_x, prob.n_tiles,
                *prob.geo.halo, channels,
                **backward_constexprs(prob, has_mask, precision, want_p1, want_p2),
            )
    return grad_p1, grad_p2
