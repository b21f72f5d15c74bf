"""Triton kernels for the all-offset joint counts (SPEC §3), forward and backward.

Layout: maps are (B, K, *S) contiguous; 2-D maps are 3-D ones with D = 1 (IS_3D=False only skips
the depth checks). A program works on a tile of BLOCK_P consecutive pixels of the flattened
(B, *S) (a tile may straddle two samples), keeps the tile of p1 in registers and loops over the
offsets, gathering the partner pixels s + d (or t - d) directly from the input: no shifted or
unfolded copy of a map is ever made. Which partners exist comes from a small per-offset table
(flat shift and, per spatial dim, the coordinate range whose partner is inside).

Forward: a persistent grid (n_pixel_programs, n_offset_groups). Program (q, g) walks the tiles
q, q + n_pixel_programs, ... and adds, for each offset o of its group, the K x K product
p1_tile @ p2_shifted_tile^T into its own slot partial[q, o]. No two programs share a slot, so no
atomics are needed, and the launcher sums `partial` over q in a fixed order: deterministic. The
number of pixel programs is bounded so `partial` stays under 1 MiB.

Backward: one pass over the pixels computes both gradients; per tile and offset it gathers p2 at
s + d and p1 at t - d, multiplies by G_d (resp. G_d^T) and accumulates in registers; each
gradient element is written exactly once.

Products use tl.dot on float32 values (float16/bfloat16 are converted first, which is exact);
float64 uses an explicit broadcast-multiply-and-sum so it stays float64 on every GPU.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import (
    INTERPRETED,
    INTERPRETER_BLOCK_P,
    INTERPRETER_MAX_PROGRAMS,
    PARTIAL_BYTES_BUDGET,
    dot_precision,
    grid_size,
    multiprocessor_count,
    offset_table,
    padded_k,
    spatial_dims,
)


# Offset table rows (built by `offset_table`): the flat index shift of d, then for each spatial
# dim the range [lo, hi) of coordinates whose partner c + d_dim is inside the image.
TABLE_COLUMNS = 8


@triton.jit
def _joint_counts_forward_kernel(
    p1_ptr, p2_ptr, mask_ptr, table_ptr, partial_ptr,
    K, N, H, W, total_pixels,
    n_offsets, offsets_per_group, n_tiles,
    IS_3D: tl.constexpr, HAS_MASK: tl.constexpr, USE_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, K_PAD: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # Helpers are written inline: the interpreter pays milliseconds per nested jit call.
    pid_pixels = tl.program_id(0)
    pid_offsets = tl.program_id(1)
    n_pixel_programs = tl.num_programs(0)
    acc_dtype = partial_ptr.dtype.element_ty

    k = tl.arange(0, K_PAD)
    k_ok = k < K
    n = tl.cast(N, tl.int64)
    k_stride = k.to(tl.int64) * n
    kk_index = k[:, None] * K + k[None, :]
    kk_ok = k_ok[:, None] & k_ok[None, :]
    o_begin = pid_offsets * offsets_per_group
    o_end = tl.minimum(o_begin + offsets_per_group, n_offsets)
    slot_base = partial_ptr + pid_pixels.to(tl.int64) * n_offsets * K * K + kk_index

    for tile in range(pid_pixels, n_tiles, n_pixel_programs):
        # a tile is BLOCK_P consecutive pixels of the flattened (B, *S), possibly across samples
        g = tl.cast(tile, tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
        inside = g < total_pixels
        b = g // n
        s = g - b * n
        y = s // W
        x = s - y * W
        if IS_3D:
            z = y // H
            y = y - z * H
        # element (b, k, s) of a (B, K, *S) map lives at b*K*N + k*N + s
        pixel_base = b * K * n + s
        a = tl.load(
            p1_ptr + (k_stride[:, None] + pixel_base[None, :]),
            mask=k_ok[:, None] & inside[None, :], other=0.0,
        ).to(acc_dtype)  # p1 tile (K_PAD, BLOCK_P), read once for all offsets
        if HAS_MASK:
            a = a * tl.load(mask_ptr + g, mask=inside, other=0.0).to(acc_dtype)[None, :]
        # pixels along the last dim, so consecutive threads read consecutive addresses
        p2_tile = p2_ptr + (k_stride[:, None] + pixel_base[None, :])
        tile_k_ok = k_ok[:, None]
        for o in range(o_begin, o_end):
            row = table_ptr + o * 8
            shift = tl.load(row)
            ok = inside & (y >= tl.load(row + 3)) & (y < tl.load(row + 4))
            ok = ok & (x >= tl.load(row + 5)) & (x < tl.load(row + 6))
            if IS_3D:
                ok = ok & (z >= tl.load(row + 1)) & (z < tl.load(row + 2))
            # p2 at s + d as (K_PAD, BLOCK_P), gathered straight from p2
            c = tl.load(p2_tile + shift, mask=tile_k_ok & ok[None, :], other=0.0).to(acc_dtype)
            if HAS_MASK:
                c = c * tl.load(mask_ptr + (g + shift), mask=ok, other=0.0).to(acc_dtype)[None, :]
            slot = slot_base + o * K * K
            acc = tl.load(slot, mask=kk_ok, other=0.0)
            if USE_DOT:
                acc = tl.dot(a, tl.trans(c), acc, input_precision=DOT_PRECISION)
            else:
                acc += tl.sum(a[:, None, :] * c[None, :, :], axis=2)
            tl.store(slot, acc, mask=kk_ok)
            # The next tile's load of this slot may be done by other threads of the program
            # (another register layout): make the store visible to the whole block first.
            tl.debug_barrier()


@triton.jit
def _joint_counts_backward_kernel(
    grad_j_ptr, p1_ptr, p2_ptr, mask_ptr, table_ptr, reverse_table_ptr, grad_p1_ptr, grad_p2_ptr,
    K, N, H, W, total_pixels,
    n_offsets, n_tiles,
    GRAD_P1: tl.constexpr, GRAD_P2: tl.constexpr,
    IS_3D: tl.constexpr, HAS_MASK: tl.constexpr, USE_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, K_PAD: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # GRAD_P1 / GRAD_P2 pick the gradients this launch computes: both in one pass over the
    # pixels, or one each in two launches when both accumulators would not fit the registers.
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    acc_dtype = grad_j_ptr.dtype.element_ty

    k = tl.arange(0, K_PAD)
    k_ok = k < K
    n = tl.cast(N, tl.int64)
    k_stride = k.to(tl.int64) * n
    kk_index = k[:, None] * K + k[None, :]
    kk_ok = k_ok[:, None] & k_ok[None, :]

    for tile in range(pid, n_tiles, n_programs):
        g = tl.cast(tile, tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
        inside = g < total_pixels
        b = g // n
        s = g - b * n
        y = s // W
        x = s - y * W
        if IS_3D:
            z = y // H
            y = y - z * H
        tile_index = k_stride[:, None] + (b * K * n + s)[None, :]  # (K_PAD, BLOCK_P)
        tile_ok = k_ok[:, None] & inside[None, :]
        if GRAD_P1:
            p2_tile = p2_ptr + tile_index
            grad1 = tl.zeros((K_PAD, BLOCK_P), dtype=acc_dtype)
        if GRAD_P2:
            p1_tile = p1_ptr + tile_index
            grad2 = tl.zeros((K_PAD, BLOCK_P), dtype=acc_dtype)
        for o in range(0, n_offsets):
            g_d = tl.load(grad_j_ptr + o * K * K + kk_index, mask=kk_ok, other=0.0)
            if GRAD_P1:
                # dL/dp1[i, s] += sum_j G[i, j] p2[j, s + d]
                row = table_ptr + o * 8
                shift = tl.load(row)
                ok = inside & (y >= tl.load(row + 3)) & (y < tl.load(row + 4))
                ok = ok & (x >= tl.load(row + 5)) & (x < tl.load(row + 6))
                if IS_3D:
                    ok = ok & (z >= tl.load(row + 1)) & (z < tl.load(row + 2))
                q2 = tl.load(p2_tile + shift, mask=k_ok[:, None] & ok[None, :], other=0.0)
                q2 = q2.to(acc_dtype)
                if HAS_MASK:
                    m2 = tl.load(mask_ptr + (g + shift), mask=ok, other=0.0).to(acc_dtype)
                    q2 = q2 * m2[None, :]
                if USE_DOT:
                    grad1 = tl.dot(g_d, q2, grad1, input_precision=DOT_PRECISION)
                else:
                    grad1 += tl.sum(g_d[:, :, None] * q2[None, :, :], axis=1)
            if GRAD_P2:
                # dL/dp2[j, t] += sum_i G[i, j] p1[i, t - d]
                row = reverse_table_ptr + o * 8
                shift = tl.load(row)
                ok = inside & (y >= tl.load(row + 3)) & (y < tl.load(row + 4))
                ok = ok & (x >= tl.load(row + 5)) & (x < tl.load(row + 6))
                if IS_3D:
                    ok = ok & (z >= tl.load(row + 1)) & (z < tl.load(row + 2))
                q1 = tl.load(p1_tile + shift, mask=k_ok[:, None] & ok[None, :], other=0.0)
                q1 = q1.to(acc_dtype)
                if HAS_MASK:
                    m1 = tl.load(mask_ptr + (g + shift), mask=ok, other=0.0).to(acc_dtype)
                    q1 = q1 * m1[None, :]
                g_t = tl.trans(g_d)
                if USE_DOT:
                    grad2 = tl.dot(g_t, q1, grad2, input_precision=DOT_PRECISION)
                else:
                    grad2 += tl.sum(g_t[:, :, None] * q1[None, :, :], axis=1)
        if HAS_MASK:
            m_here = tl.load(mask_ptr + g, mask=inside, other=0.0).to(acc_dtype)[None, :]
        if GRAD_P1:
            if HAS_MASK:
                grad1 = grad1 * m_here
            out1 = grad1.to(grad_p1_ptr.dtype.element_ty)
            tl.store(grad_p1_ptr + tile_index, out1, mask=tile_ok)
        if GRAD_P2:
            if HAS_MASK:
                grad2 = grad2 * m_here
            out2 = grad2.to(grad_p2_ptr.dtype.element_ty)
            tl.store(grad_p2_ptr + tile_index, out2, mask=tile_ok)


# ------------------------------------------------------------------------------------------------
# launchers
# ------------------------------------------------------------------------------------------------
def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class LaunchConfig(NamedTuple):
    block_p: int  # pixels per tile (a power of two)
    num_warps: int
    split_backward: bool  # dL/dp1 and dL/dp2 in two launches (fewer live registers each)


def default_config(k_pad: int, use_dot: bool) -> LaunchConfig:
    """Fixed launch settings. Under the interpreter: big tiles (its cost is per tile). On a GPU:
    the largest tiles whose registers do not spill, from `ptxas -v` on sm_90 code with
    tf32x3 dots (fp32) and the broadcast product (fp64); not timed on hardware yet."""
    if INTERPRETED:
        return LaunchConfig(INTERPRETER_BLOCK_P, 4, False)
    if not use_dot:  # float64: the (K_PAD, K_PAD, BLOCK_P) product lives in registers
        return LaunchConfig(max(1, 4096 // (k_pad * k_pad)), 4, False)
    if k_pad <= 16:
        return LaunchConfig(64, 8, False)
    if k_pad <= 32:
        return LaunchConfig(32, 8, True)
    return LaunchConfig(16, 8, True)


def _launch_geometry(p1, block_p):
    batch, k = int(p1.shape[0]), int(p1.shape[1])
    d, h, w, n = spatial_dims(p1.shape)
    k_pad = padded_k(k)
    use_dot = p1.dtype != torch.float64
    config = default_config(k_pad, use_dot)
    if block_p is not None:
        config = config._replace(block_p=int(block_p))
    if config.block_p < 1 or config.block_p & (config.block_p - 1):
        raise ValueError(f"block_p: expected a power of two, got {config.block_p}")
    if use_dot and not INTERPRETED and config.block_p < 16:
        raise ValueError(f"block_p: tl.dot needs at least 16 pixels per tile, got {config.block_p}")
    total_pixels = batch * n
    return batch, k, (d, h, w), n, k_pad, use_dot, config, total_pixels


def joint_counts(
    p1, p2, offsets, mask=None, *, block_p=None, max_programs=None, offset_groups=None
):
    """J (|O|, K, K) in the accumulation dtype; the backend contract's `joint_counts`.

    `block_p` (pixels per tile, a power of two), `max_programs` (pixel-direction programs of
    the persistent grid) and `offset_groups` (programs along the offsets) override the
    defaults; tests use them to cover the GPU's grid shapes under the interpreter.
    """
    batch, k, dims, n, k_pad, use_dot, config, total_pixels = _launch_geometry(p1, block_p)
    ndim = p1.dim() - 2
    table = offset_table(offsets, ndim, dims, p1.device)
    n_offsets = int(table.shape[0])
    acc_dtype = _accumulation_dtype(p1.dtype)
    n_tiles = triton.cdiv(total_pixels, config.block_p)
    if n_tiles == 0 or n_offsets == 0:
        return torch.zeros((n_offsets, k, k), dtype=acc_dtype, device=p1.device)

    # Programs along the pixels: bounded so the partial sums stay within the memory budget.
    slot_bytes = n_offsets * k * k * torch.finfo(acc_dtype).bits // 8
    if INTERPRETED:
        n_pixel_programs = min(n_tiles, INTERPRETER_MAX_PROGRAMS)
        n_groups = 1
    else:
        sms = multiprocessor_count(p1.device)
        n_pixel_programs = min(n_tiles, 2 * sms, max(1, PARTIAL_BYTES_BUDGET // slot_bytes))
        # Split the offsets across programs when the pixel direction alone cannot fill the GPU.
        n_groups = min(n_offsets, max(1, math.ceil(4 * sms / n_pixel_programs)))
    if max_programs is not None:
        n_pixel_programs = max(1, min(n_pixel_programs, int(max_programs)))
    if offset_groups is not None:
        n_groups = max(1, min(n_offsets, int(offset_groups)))
    offsets_per_group = math.ceil(n_offsets / n_groups)
    n_groups = math.ceil(n_offsets / offsets_per_group)

    partial = torch.zeros((n_pixel_programs, n_offsets, k, k), dtype=acc_dtype, device=p1.device)
    has_mask = mask is not None
    _joint_counts_forward_kernel[(n_pixel_programs, n_groups)](
        p1, p2, mask if has_mask else p1, table, partial,
        k, n, dims[1], dims[2], total_pixels,
        n_offsets, offsets_per_group, n_tiles,
        IS_3D=ndim == 3, HAS_MASK=has_mask, USE_DOT=use_dot,
        DOT_PRECISION=dot_precision(p1.device), K_PAD=k_pad, BLOCK_P=config.block_p,
        num_warps=config.num_warps,
    )
    # fixed-order reduction over the programs' partial sums: deterministic
    return partial.sum(dim=0)


def joint_counts_backward(
    grad_j, p1, p2, offsets, mask=None, *, block_p=None, max_programs=None, split=None
):
    """(grad_p1, grad_p2) in the dtypes of p1 and p2; the contract's `joint_counts_backward`.

    `split` (default: the launch config's choice) computes the two gradients in two launches.
    """
    batch, k, dims, n, k_pad, use_dot, config, total_pixels = _launch_geometry(p1, block_p)
    ndim = p1.dim() - 2
    table = offset_table(offsets, ndim, dims, p1.device)
    reverse_table = offset_table(offsets, ndim, dims, p1.device, reverse=True)
    n_offsets = int(table.shape[0])
    acc_dtype = _accumulation_dtype(p1.dtype)
    grad_j = grad_j.to(acc_dtype).contiguous()
    grad_p1 = torch.empty_like(p1)
    grad_p2 = torch.empty_like(p2)
    n_tiles = triton.cdiv(total_pixels, config.block_p)
    if n_tiles == 0:
        return grad_p1, grad_p2
    n_programs = grid_size(n_tiles, p1.device)
    if max_programs is not None:
        n_programs = max(1, min(n_programs, int(max_programs)))
    has_mask = mask is not None
    split = config.split_backward if split is None else bool(split)
    passes = [(True, False), (False, True)] if split else [(True, True)]
    for want_p1, want_p2 in passes:
        _joint_counts_backward_kernel[(n_programs,)](
            grad_j, p1, p2, mask if has_mask else p1, table, reverse_table, grad_p1, grad_p2,
            k, n, dims[1], dims[2], total_pixels,
            n_offsets, n_tiles,
            GRAD_P1=want_p1, GRAD_P2=want_p2,
            IS_3D=ndim == 3, HAS_MASK=has_mask, USE_DOT=use_dot,
            DOT_PRECISION=dot_precision(p1.device), K_PAD=k_pad, BLOCK_P=config.block_p,
            num_warps=config.num_warps,
        )
    return grad_p1, grad_p2
