"""Triton kernels for the boundary-aware cross-correlation term (docs/contract.md §5), forward
and backward.

Forward, two passes over the data (the per-sample min-max of U sits between them) and a tiny
reduction:
  1. `_uncertainty_kernel`, grid (B, R): program (b, r) walks runs of sample b's pixels,
     writes U = -sum_k p_k log(p_k + 1e-16) (a (B, *S) map) and the running min and max of U
     over its pixels (R per sample).
  2. `_ncc_kernel`, grid (B, R): program (b, r) reduces sample b's R minima and maxima (program
     0 writes them to u_range), then walks b's spatial tiles: per centre pixel the five box sums
     of Un, Un^2, Un E, E, E^2 (zero padding; Un = (U - min) / (max - min + 1e-6) on the fly),
     the clamped NCC term, summed in registers; one partial sum per program.
  3. `_finish_kernel`, one program: adds the B R partial sums in order (deterministic) and
     writes cc = -sum / (B prod(S)).
Backward, three passes:
  1. `_uncertainty_kernel` again, writing Un directly (the saved u_range is known).
  2. `_ncc_kernel` in backward mode: per centre the coefficients of dL/dS(Un), dL/dS(Un^2),
     dL/dS(Un E) (zero where the reference's clamps cut the gradient), three (B, *S) maps.
  3. `_boundary_grad_kernel`: box sums of the three coefficient maps (the box is its own
     transpose), dL/dUn, and dL/dp_k = -dL/dU (log(p_k + 1e-16) + p_k / (p_k + 1e-16)) written
     once per element; U at the pixel is recomputed from the same logs, not read.
The uncertainty and gradient passes hold a (K_PAD, pixels) block of the map; K above
CHANNEL_BLOCK (128) is summed over blocks of 128 channels instead (ONE_BLOCK off), and the
gradient pass then reads each block a second time for its gradient (beyond 128 channels one
block would spill kilobytes of registers).
Edge map (the backend's fused `edge_map`): `_edge_magnitude_kernel` writes the channel mean of
the wrap-around difference magnitude into the output and each program's min/max,
`_edge_normalise_kernel` normalises and raises to gamma in place: no temporary but the output.
Temporaries, all (B, *S) in the accumulation dtype: the forward holds 1 (U), the backward 4 (Un
and the three coefficient maps), plus O(B R) partial sums. At B=16 K=10 256x256 float32 that is
4 MiB and 16 MiB; the maps themselves are 40 MiB each.

Roofline, B=16 K=10 256x256 float32, both views, forward + backward: the map is read three
times (forward pass 1, backward passes 1 and 3) and its gradient written once, 4 x 42 MB; the
(B, *S) maps add 2 x 4 MB (forward) and 4 x 4 MB written + ~4 x 4 MB read (backward, box reads
hit the caches); both views: ~2 x 220 MB = 0.44 GB -> ~0.1 ms at 4.3 TB/s. The arithmetic,
2 x (K logs + 25 x 2 box taps + NCC) per pixel and pass, is ~0.1 GFLOP: memory-bound.

The formulas follow `bimi_kernels.reference.local_cross_correlation` and
`reference.boundary_cc_backward` term by term, including the clamps at eps = 1e-5, so float64
agrees to rounding.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Sequence

import torch
import triton
import triton.language as tl

from ..numerics import EPS_CC, EPS_LOG_U, EPS_MINMAX
from ..numerics import accumulation_dtype
from . import CHANNEL_BLOCK, INTERPRETED, multiprocessor_count, padded_k, spatial_dims
from .tiles import (
    Tile,
    channel_axis,
    channel_offsets,
    grid_position,
    make_tile,
    map_extent,
    needs_wide_index,
    next_power_of_2,
    plane_size,
    run_pixels,
    sample_pointer,
    tile_geometry,
    tile_is_interior,
    with_tile_shape,
)

# pointer parameters that hold accumulation-dtype data (scripts/triton_compile_check.py)
ACCUMULATOR_POINTERS = (
    "u_ptr", "range_ptr", "u_range_ptr", "edge_ptr", "partial_ptr", "cc_ptr", "grad_cc_ptr",
    "coef_u_ptr", "coef_uu_ptr", "coef_ue_ptr", "out_ptr",
)


# ------------------------------------------------------------------------------------------------
# @triton.jit helpers
# ------------------------------------------------------------------------------------------------
@triton.jit
def entropy_terms(q, EPS_LOG: tl.constexpr):
    """log(q + 1e-16) of a (K_PAD, TILE) block and U = -sum_k q_k log(q_k + 1e-16).

    The terms are summed in float64 (then U rounded once to q's dtype): the per-sample min-max
    stretches U's range, narrow for near-uniform maps (about 150x at K = 40 early in training),
    and a float32 sum over the channels, whose order the compiler picks (sequential in the
    interpreter), put CC past twice the reference's own error there (docs/contract.md §8). The
    terms all have one sign, so this U is within about one rounding of the exact one; float64
    adds are cheap next to the loads of this memory-bound pass."""
    log_q = tl.log(q + EPS_LOG)
    return log_q, (-plogp_sum(q, log_q)).to(q.dtype)


@triton.jit
def plogp_sum(q, log_q):
    """sum_k q_k log(q_k + 1e-16) of a (K_PAD, TILE) block, in float64 (entropy_terms)."""
    return tl.sum((q * log_q).to(tl.float64), axis=0)


@triton.jit
def block_of_channels(p_base, k0, K, K_PAD: tl.constexpr, stride_k, s, inside, acc_dtype,
                      EPS_LOG: tl.constexpr, WIDE: tl.constexpr):
    """Channels k0 .. k0 + K_PAD - 1 of a run or tile of pixels s, for K above one block: the
    (K_PAD, TILE) values q, their log(q + 1e-16), their share of -U in float64 (plogp_sum),
    which are real, and their offsets."""
    k = k0 + tl.arange(0, K_PAD)
    ok = (k < K)[:, None] & inside[None, :]
    channel = channel_offsets(k, stride_k, WIDE)
    q = tl.load(p_base + (channel[:, None] + s[None, :]), mask=ok, other=0.0).to(acc_dtype)
    log_q = tl.log(q + EPS_LOG)
    return q, log_q, plogp_sum(q, log_q), ok, channel


@triton.jit
def blocked_uncertainty(p_base, K, K_PAD: tl.constexpr, stride_k, s, inside, acc_dtype,
                        EPS_LOG: tl.constexpr, WIDE: tl.constexpr):
    """U of pixels s summed over blocks of K_PAD channels, in channel order, in float64 (as
    entropy_terms sums one block) and rounded once."""
    total = tl.zeros(s.shape, dtype=tl.float64)
    for k0 in range(0, K, K_PAD):
        total += block_of_channels(p_base, k0, K, K_PAD, stride_k, s, inside, acc_dtype, EPS_LOG,
                                   WIDE)[2]
    return (-total).to(acc_dtype)


@triton.jit
def sqrt_rounded(x):
    """The correctly rounded square root: on a GPU float32 tl.sqrt is approximate (2 ulp);
    float64 tl.sqrt is correctly rounded (tl.sqrt_rn takes float32 only)."""
    if x.dtype == tl.float32:
        return tl.sqrt_rn(x)
    else:
        return tl.sqrt(x)


@triton.jit
def divide_rounded(x, y):
    """The correctly rounded quotient (float32 "/" is approximate on a GPU, up to 2 ulp)."""
    if x.dtype == tl.float32:
        return tl.div_rn(x, y)
    else:
        return x / y


@triton.jit
def normalise(u, lo, denominator):
    """Un = (U - min) / (max - min + 1e-6), as the reference writes it."""
    return (u - lo) / denominator


# Running minima and maxima in which a NaN sticks, as in torch's amin/amax (the reference): the
# GPU's min/max instructions skip a NaN, which would give a finite loss for a NaN input
# (docs/contract.md §8). The reductions are tl.min/tl.max plus a NaN test (a tl.reduce with a
# custom combine runs element by element in the interpreter).
@triton.jit
def lower_of(bound, value):
    return tl.where((value < bound) | (value != value), value, bound)


@triton.jit
def higher_of(bound, value):
    return tl.where((value > bound) | (value != value), value, bound)


@triton.jit
def nan_sticky_min(x):
    """min over axis 0, NaN if any element is NaN."""
    return tl.where(tl.max((x != x).to(tl.int32), axis=0) > 0, float("nan"), tl.min(x, axis=0))


@triton.jit
def nan_sticky_max(x):
    """max over axis 0, NaN if any element is NaN."""
    return tl.where(tl.max((x != x).to(tl.int32), axis=0) > 0, float("nan"), tl.max(x, axis=0))


@triton.jit
def sample_range(range_ptr, b, n_range, R_PAD: tl.constexpr):
    """Sample b's [min, max] of U from its programs' running minima and maxima."""
    r = tl.arange(0, R_PAD)
    ok = r < n_range
    base = range_ptr + b.to(tl.int64) * n_range * 2
    lo = nan_sticky_min(tl.load(base + 2 * r, mask=ok, other=float("inf")))
    hi = nan_sticky_max(tl.load(base + 2 * r + 1, mask=ok, other=float("-inf")))
    return lo, hi


@triton.jit
def window_sums(a_base, b_base, c_base, s, z, y, x, inside, lo, denominator, D, H, W, plane,
                CHECK: tl.constexpr, NCC: tl.constexpr, NORMALISE: tl.constexpr,
                IS_3D: tl.constexpr, RADIUS: tl.constexpr, RADIUS_Z: tl.constexpr,
                ROW_UNROLL: tl.constexpr):
    """Box-window sums around each pixel of a tile (zero padding).

    NCC: the five sums of A, A^2, A B, B, B^2 with A the uncertainty map (normalised on the fly
    when NORMALISE, as `normalise`: a missing neighbour reads U = min, i.e. Un = 0) and B the
    edge map. Otherwise: the sums of the three maps A, B, C (and two zeros).
    CHECK=False for interior tiles (no bounds tests). The neighbour tests are built per dim
    outside the inner loops and written inline: each nested @triton.jit call costs the
    interpreter ~0.6 ms. The z loop is not unrolled, so 3-D windows keep their registers; the y
    loop is unrolled ROW_UNROLL times (`row_unroll` chooses)."""
    sum_1 = tl.zeros(s.shape, dtype=a_base.dtype.element_ty)
    sum_2 = tl.zeros(s.shape, dtype=a_base.dtype.element_ty)
    sum_3 = tl.zeros(s.shape, dtype=a_base.dtype.element_ty)
    sum_4 = tl.zeros(s.shape, dtype=a_base.dtype.element_ty)
    sum_5 = tl.zeros(s.shape, dtype=a_base.dtype.element_ty)
    row = tl.cast(W, plane.dtype)  # 64-bit where `plane` is (WIDE): dy W can pass 2^31
    for dz in range(-RADIUS_Z, RADIUS_Z + 1):
        ok_z = inside
        if IS_3D:
            ok_z = ok_z & (z + dz >= 0) & (z + dz < D)
        for dy in tl.range(-RADIUS, RADIUS + 1, loop_unroll_factor=ROW_UNROLL):
            ok_zy = ok_z & (y + dy >= 0) & (y + dy < H)
            for dx in tl.static_range(-RADIUS, RADIUS + 1):
                at = s + (dz * plane + dy * row + dx)
                if CHECK:
                    ok = ok_zy & (x + dx >= 0) & (x + dx < W)
                    a = tl.load(a_base + at, mask=ok, other=lo if NORMALISE else 0.0)
                    b = tl.load(b_base + at, mask=ok, other=0.0)
                    if not NCC:
                        c = tl.load(c_base + at, mask=ok, other=0.0)
                else:
                    a = tl.load(a_base + at)
                    b = tl.load(b_base + at)
                    if not NCC:
                        c = tl.load(c_base + at)
                if NORMALISE:
                    a = (a - lo) / denominator
                if NCC:
                    sum_1 += a
                    sum_2 += a * a
                    sum_3 += a * b
                    sum_4 += b
                    sum_5 += b * b
                else:
                    sum_1 += a
                    sum_2 += b
                    sum_3 += c
    return sum_1, sum_2, sum_3, sum_4, sum_5


@triton.jit
def ncc_terms(s_u, s_uu, s_ue, s_e, s_ee, count, EPS: tl.constexpr):
    """The reference's window statistics, in its order: means, the raw cross term and
    variances, and their clamps at eps (as torch's clamp: a NaN stays NaN, where tl.maximum
    would return eps on a GPU)."""
    mu_u = s_u / count
    mu_e = s_e / count
    cross_raw = s_ue - mu_e * s_u - mu_u * s_e + mu_u * mu_e * count
    var_u_raw = s_uu - 2 * mu_u * s_u + mu_u * mu_u * count
    var_e_raw = s_ee - 2 * mu_e * s_e + mu_e * mu_e * count
    eps = tl.full((), EPS, s_u.dtype)  # in the sums' dtype: a bare constexpr compares as float32
    cross = tl.where(cross_raw < eps, eps, cross_raw)
    var_u = tl.where(var_u_raw < eps, eps, var_u_raw)
    var_e = tl.where(var_e_raw < eps, eps, var_e_raw)
    return mu_u, mu_e, cross_raw, var_u_raw, cross, var_u, var_e


# ------------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------------
@triton.jit
def _uncertainty_kernel(
    p_ptr, u_ptr, range_ptr, u_range_ptr,
    p_stride_b, p_stride_k, K, N, tiles_per_sample,
    WRITE_RANGE: tl.constexpr, NORMALISED: tl.constexpr, WIDE: tl.constexpr,
    EPS_LOG: tl.constexpr, EPS_NORM: tl.constexpr, K_PAD: tl.constexpr, BLOCK: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
):
    # WRITE_RANGE: also the running [min, max] of U of this program (forward).
    # NORMALISED: write Un with the saved per-sample range instead of U (backward).
    # ONE_BLOCK: all K channels in one (K_PAD, BLOCK) block; else blocks of K_PAD channels.
    b, r, n_range = grid_position()
    acc_dtype = u_ptr.dtype.element_ty
    k, k_ok, channel = channel_axis(K, K_PAD, p_stride_k, WIDE)
    p_base = sample_pointer(p_ptr, b, p_stride_b)
    u_base = sample_pointer(u_ptr, b, N)
    if NORMALISED:
        lo = tl.load(u_range_ptr + 2 * b)
        denominator = tl.load(u_range_ptr + 2 * b + 1) - lo + EPS_NORM
    low = tl.full((BLOCK,), float("inf"), acc_dtype)
    high = tl.full((BLOCK,), float("-inf"), acc_dtype)
    for tile in range(r, tiles_per_sample, n_range):
        s, inside = run_pixels(tile, N, BLOCK, WIDE)
        if ONE_BLOCK:
            q = tl.load(p_base + (channel[:, None] + s[None, :]),
                        mask=k_ok[:, None] & inside[None, :], other=0.0).to(acc_dtype)
            log_q, u = entropy_terms(q, EPS_LOG)
        else:
            u = blocked_uncertainty(p_base, K, K_PAD, p_stride_k, s, inside, acc_dtype, EPS_LOG,
                                    WIDE)
        if NORMALISED:
            u = normalise(u, lo, denominator)
        tl.store(u_base + s, u, mask=inside)
        if WRITE_RANGE:
            low = lower_of(low, tl.where(inside, u, float("inf")))
            high = higher_of(high, tl.where(inside, u, float("-inf")))
    if WRITE_RANGE:
        out = range_ptr + (b.to(tl.int64) * n_range + r) * 2
        tl.store(out, nan_sticky_min(low))
        tl.store(out + 1, nan_sticky_max(high))


@triton.jit
def tile_window_sums(a_base, b_base, c_base, s, z0, y0, x0, z, y, x, inside, lo, denominator,
                     D, H, W, plane, NCC: tl.constexpr, NORMALISE: tl.constexpr,
                     IS_3D: tl.constexpr, RADIUS: tl.constexpr, RADIUS_Z: tl.constexpr,
                     TILE_D: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr,
                     ROW_UNROLL: tl.constexpr):
    """`window_sums` of a tile: without bounds tests where the tile and its window halo lie
    inside the sample, with them on a border tile."""
    if tile_is_interior(z0, y0, x0, D, H, W, RADIUS_Z, RADIUS, RADIUS,
                        TILE_D, TILE_H, TILE_W, IS_3D):
        sums = window_sums(a_base, b_base, c_base, s, z, y, x, inside, lo, denominator, D, H, W,
                           plane, False, NCC, NORMALISE, IS_3D, RADIUS, RADIUS_Z, ROW_UNROLL)
    else:
        sums = window_sums(a_base, b_base, c_base, s, z, y, x, inside, lo, denominator, D, H, W,
                           plane, True, NCC, NORMALISE, IS_3D, RADIUS, RADIUS_Z, ROW_UNROLL)
    return sums


@triton.jit
def _ncc_kernel(
    u_ptr, range_ptr, u_range_ptr, edge_ptr, partial_ptr, grad_cc_ptr,
    coef_u_ptr, coef_uu_ptr, coef_ue_ptr,
    edge_stride_b, D, H, W, N, total_pixels, n_range, window_count,
    tiles_z, tiles_y, tiles_x,
    BACKWARD: tl.constexpr, IS_3D: tl.constexpr, WIDE: tl.constexpr,
    EPS: tl.constexpr, EPS_NORM: tl.constexpr, R_PAD: tl.constexpr,
    RADIUS: tl.constexpr, RADIUS_Z: tl.constexpr, ROW_UNROLL: tl.constexpr,
    TILE_D: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr,
):
    # Forward: the box sums of Un (normalised on the fly) and E and the summed NCC term.
    # BACKWARD: u_ptr holds Un already; writes the three coefficient maps instead.
    b, r, n_programs = grid_position()
    acc_dtype = u_ptr.dtype.element_ty
    count = tl.cast(window_count, acc_dtype)  # n = window^ndim, an exact integer
    plane = plane_size(H, W, WIDE)
    if BACKWARD:
        # L = -mean(f) scaled by grad_cc: dL/df = -grad_cc / (B prod(S))
        scale = -tl.load(grad_cc_ptr) / tl.cast(total_pixels, acc_dtype)
        lo = tl.zeros((), dtype=acc_dtype)
        denominator = tl.full((), 1.0, dtype=acc_dtype)
    else:
        lo, hi = sample_range(range_ptr, b, n_range, R_PAD)
        if r == 0:
            tl.store(u_range_ptr + 2 * b, lo)
            tl.store(u_range_ptr + 2 * b + 1, hi)
        denominator = hi - lo + EPS_NORM
    u_base = sample_pointer(u_ptr, b, N)
    e_base = sample_pointer(edge_ptr, b, edge_stride_b)
    total = tl.zeros((TILE_D * TILE_H * TILE_W,), dtype=acc_dtype)
    for tile in range(r, tiles_z * tiles_y * tiles_x, n_programs):
        sample, z0, y0, x0, z, y, x, s, inside = tile_geometry(
            tile, tiles_z, tiles_y, tiles_x, D, H, W, TILE_D, TILE_H, TILE_W, IS_3D, WIDE)
        s_u, s_uu, s_ue, s_e, s_ee = tile_window_sums(
            u_base, e_base, e_base, s, z0, y0, x0, z, y, x, inside, lo, denominator, D, H, W,
            plane, True, not BACKWARD, IS_3D, RADIUS, RADIUS_Z, TILE_D, TILE_H, TILE_W,
            ROW_UNROLL)
        mu_u, mu_e, cross_raw, var_u_raw, cross, var_u, var_e = ncc_terms(
            s_u, s_uu, s_ue, s_e, s_ee, count, EPS)
        if BACKWARD:
            # f = cross^2 / (var_u var_e); df/dcross and df/dvar_u, zero where clamped
            eps = tl.full((), EPS, acc_dtype)
            d_cross = tl.where(cross_raw >= eps, 2 * cross / (var_u * var_e), 0.0)
            d_var_u = tl.where(var_u_raw >= eps, -(cross * cross) / (var_u * var_u * var_e), 0.0)
            # through the box sums: dcross/dS(U) = -mu_e, dvar_u/dS(U) = -2 mu_u
            pixel = sample_pointer(coef_u_ptr, b, N) + s
            tl.store(pixel, scale * (-mu_e * d_cross - 2 * mu_u * d_var_u), mask=inside)
            tl.store(sample_pointer(coef_uu_ptr, b, N) + s, scale * d_var_u, mask=inside)
            tl.store(sample_pointer(coef_ue_ptr, b, N) + s, scale * d_cross, mask=inside)
        else:
            total += tl.where(inside, cross * cross / (var_u * var_e), 0.0)
    if not BACKWARD:
        tl.store(partial_ptr + b * n_programs + r, tl.sum(total, axis=0))


@triton.jit
def _finish_kernel(partial_ptr, cc_ptr, n_partials, total_pixels, BLOCK: tl.constexpr):
    """cc = -(sum of the partial sums, in order) / (B prod(S)), added in float64 and rounded once
    (one program, a small share of the time: the last stage adds no rounding of its own as
    the number of partials grows with the map)."""
    total = tl.zeros((BLOCK,), dtype=tl.float64)
    for start in range(0, n_partials, BLOCK):
        index = start + tl.arange(0, BLOCK)
        total += tl.load(partial_ptr + index, mask=index < n_partials, other=0.0).to(tl.float64)
    cc = -(tl.sum(total, axis=0) / tl.cast(total_pixels, tl.float64))
    tl.store(cc_ptr, cc.to(cc_ptr.dtype.element_ty))


@triton.jit
def _boundary_grad_kernel(
    p_ptr, u_range_ptr, edge_ptr, coef_u_ptr, coef_uu_ptr, coef_ue_ptr, grad_ptr,
    p_stride_b, p_stride_k, edge_stride_b, grad_stride_b, grad_stride_k,
    K, D, H, W, N, tiles_z, tiles_y, tiles_x,
    IS_3D: tl.constexpr, WIDE: tl.constexpr,
    EPS_NORM: tl.constexpr, EPS_LOG: tl.constexpr, K_PAD: tl.constexpr, ONE_BLOCK: tl.constexpr,
    RADIUS: tl.constexpr, RADIUS_Z: tl.constexpr, ROW_UNROLL: tl.constexpr,
    TILE_D: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr,
):
    # ONE_BLOCK: all K channels in one (K_PAD, TILE) block, read once; else U from blocks of
    # K_PAD channels, then each block read again for its gradient.
    b, r, n_programs = grid_position()
    acc_dtype = coef_u_ptr.dtype.element_ty
    k, k_ok, channel = channel_axis(K, K_PAD, p_stride_k, WIDE)
    plane = plane_size(H, W, WIDE)
    out_channel = channel_offsets(k, grad_stride_k, WIDE)
    lo = tl.load(u_range_ptr + 2 * b)
    denominator = tl.load(u_range_ptr + 2 * b + 1) - lo + EPS_NORM
    a_base = sample_pointer(coef_u_ptr, b, N)
    b_base = sample_pointer(coef_uu_ptr, b, N)
    c_base = sample_pointer(coef_ue_ptr, b, N)
    p_base = sample_pointer(p_ptr, b, p_stride_b)
    e_base = sample_pointer(edge_ptr, b, edge_stride_b)
    grad_base = sample_pointer(grad_ptr, b, grad_stride_b)
    for tile in range(r, tiles_z * tiles_y * tiles_x, n_programs):
        sample, z0, y0, x0, z, y, x, s, inside = tile_geometry(
            tile, tiles_z, tiles_y, tiles_x, D, H, W, TILE_D, TILE_H, TILE_W, IS_3D, WIDE)
        # box sums of the coefficient maps (the window is symmetric: its own transpose)
        t_u, t_uu, t_ue, unused_4, unused_5 = tile_window_sums(
            a_base, b_base, c_base, s, z0, y0, x0, z, y, x, inside, lo, denominator, D, H, W,
            plane, False, False, IS_3D, RADIUS, RADIUS_Z, TILE_D, TILE_H, TILE_W, ROW_UNROLL)
        if ONE_BLOCK:
            tile_ok = k_ok[:, None] & inside[None, :]
            q = tl.load(p_base + (channel[:, None] + s[None, :]), mask=tile_ok,
                        other=0.0).to(acc_dtype)
            log_q, u = entropy_terms(q, EPS_LOG)
        else:
            u = blocked_uncertainty(p_base, K, K_PAD, p_stride_k, s, inside, acc_dtype, EPS_LOG,
                                    WIDE)
        un = normalise(u, lo, denominator)
        e = tl.load(e_base + s, mask=inside, other=0.0)
        # dL/dU = dL/dUn / (max - min + 1e-6), min and max detached
        grad_u = (t_u + 2 * un * t_uu + e * t_ue) / denominator
        # U = -sum_k q_k log(q_k + eps): dU/dq_k = -(log(q_k + eps) + q_k / (q_k + eps))
        if ONE_BLOCK:
            grad = -grad_u[None, :] * (log_q + q / (q + EPS_LOG))
            tl.store(grad_base + (out_channel[:, None] + s[None, :]),
                     grad.to(grad_ptr.dtype.element_ty), mask=tile_ok)
        else:
            for k0 in range(0, K, K_PAD):
                q, log_q, _, ok, _ = block_of_channels(
                    p_base, k0, K, K_PAD, p_stride_k, s, inside, acc_dtype, EPS_LOG, WIDE)
                grad = -grad_u[None, :] * (log_q + q / (q + EPS_LOG))
                out = channel_offsets(k0 + tl.arange(0, K_PAD), grad_stride_k, WIDE)
                tl.store(grad_base + (out[:, None] + s[None, :]),
                         grad.to(grad_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _edge_magnitude_kernel(
    image_ptr, out_ptr, range_ptr,
    image_stride_b, image_stride_c, C, D, H, W, N, runs_per_sample,
    IS_3D: tl.constexpr, WIDE: tl.constexpr, BLOCK: tl.constexpr,
):
    # The edge map's first pass: per pixel the mean over channels of the magnitude of the
    # wrap-around backward differences, and this program's running min and max of it.
    b, r, n_range = grid_position()
    acc_dtype = out_ptr.dtype.element_ty
    out_base = sample_pointer(out_ptr, b, N)
    low = tl.full((BLOCK,), float("inf"), acc_dtype)
    high = tl.full((BLOCK,), float("-inf"), acc_dtype)
    plane = plane_size(H, W, WIDE)
    for run in range(r, runs_per_sample, n_range):
        s, inside = run_pixels(run, N, BLOCK, WIDE)
        x = s % W
        y = (s // W) % H
        # the neighbour before, wrapping around (torch.roll by 1) along each dim
        before_y = tl.where(y == 0, s + (plane - W), s - W)  # (H - 1) W, in `plane`'s width
        before_x = tl.where(x == 0, s + (W - 1), s - 1)
        if IS_3D:
            before_z = tl.where(s < plane, s + (D - 1) * plane, s - plane)
        total = tl.zeros((BLOCK,), dtype=acc_dtype)
        for c in range(0, C):
            # 64-bit: the stride is int32 when it fits, and C * stride need not
            base = sample_pointer(image_ptr, b, image_stride_b) + tl.cast(c, tl.int64) * image_stride_c
            value = tl.load(base + s, mask=inside, other=0.0).to(acc_dtype)
            squares = tl.zeros((BLOCK,), dtype=acc_dtype)
            if IS_3D:
                dz = value - tl.load(base + before_z, mask=inside, other=0.0).to(acc_dtype)
                squares += dz * dz
            dy = value - tl.load(base + before_y, mask=inside, other=0.0).to(acc_dtype)
            dx = value - tl.load(base + before_x, mask=inside, other=0.0).to(acc_dtype)
            squares += dy * dy
            squares += dx * dx
            # the edge map's few operations per pixel are held to a tight tolerance: the
            # correctly rounded sqrt and division (on a GPU tl.sqrt and "/" are approximate in
            # float32, up to 2 ulp), as the reference's
            total += sqrt_rounded(squares)
        magnitude = divide_rounded(total, tl.cast(C, acc_dtype))
        tl.store(out_base + s, magnitude, mask=inside)
        low = lower_of(low, tl.where(inside, magnitude, float("inf")))
        high = higher_of(high, tl.where(inside, magnitude, float("-inf")))
    out = range_ptr + (tl.cast(b, tl.int64) * n_range + r) * 2
    tl.store(out, nan_sticky_min(low))
    tl.store(out + 1, nan_sticky_max(high))


@triton.jit
def _edge_normalise_kernel(
    out_ptr, range_ptr, N, runs_per_sample, n_range, gamma: tl.float64, zero_power,
    WIDE: tl.constexpr, EPS_NORM: tl.constexpr, R_PAD: tl.constexpr, BLOCK: tl.constexpr,
):
    # The second pass, in place: ((m - min) / (max - min + 1e-6)) ** gamma. gamma is passed as
    # float64 (a plain Python float argument would be float32, rounding gamma = 0.7 by 1e-8 for
    # float64 maps) and brought to the accumulation dtype here.
    b, r, n_programs = grid_position()
    exponent = tl.full((BLOCK,), gamma, out_ptr.dtype.element_ty)
    lo, hi = sample_range(range_ptr, b, n_range, R_PAD)
    denominator = hi - lo + EPS_NORM
    out_base = sample_pointer(out_ptr, b, N)
    for run in range(r, runs_per_sample, n_programs):
        s, inside = run_pixels(run, N, BLOCK, WIDE)
        # normalise, correctly rounded (see the magnitude pass)
        v = divide_rounded(tl.load(out_base + s, mask=inside, other=0.0) - lo, denominator)
        # v ** gamma as exp(gamma log v), v >= 0; 0 ** gamma (0, or 1 for gamma = 0) apart, and
        # a NaN stays NaN. On a GPU float32 tl.exp is ex2.approx (2 ulp of a result <= 1), inside
        # the edge map's tolerance with the rest correctly rounded.
        powered = tl.exp(exponent * tl.log(tl.where(v > 0, v, 1.0)))
        tl.store(out_base + s, tl.where(v > 0, powered, tl.where(v == v, zero_power, v)), mask=inside)


# ------------------------------------------------------------------------------------------------
# launch settings and launchers
# ------------------------------------------------------------------------------------------------
class BoundaryConfig(NamedTuple):
    run_pixels: int  # pixels per run of the uncertainty pass (a power of two)
    tile_pixels: int  # pixels per spatial tile of the box-sum passes (a power of two)
    grad_tile_pixels: int  # pixels per tile of the gradient pass (holds a (K_PAD, TILE) block)
    num_warps: int


INTERPRETER_RUN_PIXELS = 4096


def default_config(k_pad: int, dtype: torch.dtype) -> BoundaryConfig:
    """Under the interpreter: big runs and tiles (its cost is per operation). On a GPU: a
    (K_PAD, run) block of about 4096 values per program (32 a thread at 4 warps), 256-pixel
    tiles for the box sums; no spills on sm_90 (scripts/triton_compile_check.py)."""
    words = 2 if dtype == torch.float64 else 1
    if INTERPRETED:
        run = max(16, min(1024, (1 << 18) // k_pad))
        return BoundaryConfig(run, 1024, run, 4)
    run = max(16, min(512, 4096 // (k_pad * words)))
    return BoundaryConfig(run, 256, max(16, min(256, 2048 // (k_pad * words))), 4)


class _Plan(NamedTuple):
    batch: int
    k: int
    k_pad: int
    dims: tuple
    n: int
    is_3d: bool
    radius: int
    radius_z: int
    window_count: int
    config: BoundaryConfig
    runs_per_sample: int
    n_range: int  # programs per sample of the uncertainty pass
    tile: Tile
    grad_tile: Tile
    n_box: int  # programs per sample of the box-sum passes
    n_grad: int  # programs per sample of the gradient pass
    wide: bool
    acc_dtype: torch.dtype
    one_block: bool  # all K channels in one (K_PAD, pixels) block, else blocks of K_PAD


def _programs_per_sample(batch: int, tiles: int, device: torch.device) -> int:
    if INTERPRETED:
        return max(1, min(tiles, 2))
    return max(1, min(tiles, triton.cdiv(4 * multiprocessor_count(device), max(batch, 1))))


def _plan(p, window, config: Optional[BoundaryConfig], tile: Optional[Sequence[int]],
          max_programs: Optional[int] = None, channel_block: Optional[int] = None) -> _Plan:
    """The launch geometry of a call, cached on what it depends on."""
    return _cached_plan(tuple(p.shape), p.dtype, int(p.stride(1)), int(window), config,
                        None if tile is None else tuple(tile), max_programs, p.device,
                        CHANNEL_BLOCK if channel_block is None else int(channel_block))


@functools.lru_cache(maxsize=256)
def _cached_plan(shape, dtype, stride_k, window, config, tile, max_programs, device,
                 channel_block) -> _Plan:
    batch, k = int(shape[0]), int(shape[1])
    d, h, w, n = spatial_dims(shape)
    k_pad = padded_k(max(1, min(k, channel_block)))
    config = config or default_config(k_pad, dtype)
    radius = int(window) // 2
    is_3d = len(shape) == 5
    runs = triton.cdiv(n, config.run_pixels)
    if tile is None:
        box_tile = make_tile((d, h, w), config.tile_pixels)
        grad_tile = make_tile((d, h, w), config.grad_tile_pixels)
    else:
        box_tile = grad_tile = with_tile_shape((d, h, w), tile)
    per_sample = [_programs_per_sample(batch, t, device)
                  for t in (runs, box_tile.per_sample, grad_tile.per_sample)]
    if max_programs is not None:
        per_sample = [max(1, min(v, int(max_programs))) for v in per_sample]
    # the map's extent, and the backward's contiguous gradient's (larger when the map's
    # channels are closer than N apart: an expanded map)
    extents = (map_extent(k, stride_k, n), map_extent(k, n, n))
    return _Plan(
        batch, k, k_pad, (d, h, w), n, is_3d, radius, radius if is_3d else 0,
        int(window) ** (len(shape) - 2), config, runs, per_sample[0], box_tile, grad_tile,
        per_sample[1], per_sample[2], needs_wide_index(*extents), accumulation_dtype(dtype),
        k <= k_pad,
    )


def row_unroll(radius: int, k_pad: Optional[int] = None) -> int:
    """How many rows of a box window `window_sums` unrolls: all of a window of 5 or less (the
    same code as a fully unrolled loop), none above (a window of 7 unrolled spilled 7.9 KB:
    float16, K=100, maps 16 wide), and none in the gradient pass beside a block of 128 channels
    (window 5 spilled 392 B-2.1 KB there, looping its rows 0-8 B). Measured by compiling as
    launched for sm_90: scripts/triton_compile_check.py --launch."""
    if radius > 2 or (k_pad is not None and k_pad >= 128):
        return 1
    return 2 * radius + 1


def kernel_constexprs(plan: _Plan):
    """(kernel, compile-time settings) of every launch of the forward and the backward (also
    used by scripts/triton_compile_check.py)."""
    common = dict(WIDE=plan.wide, num_warps=plan.config.num_warps)
    box = dict(IS_3D=plan.is_3d, RADIUS=plan.radius, RADIUS_Z=plan.radius_z,
               TILE_D=plan.tile.depth, TILE_H=plan.tile.height, TILE_W=plan.tile.width)
    grad_box = dict(box, TILE_D=plan.grad_tile.depth, TILE_H=plan.grad_tile.height,
                    TILE_W=plan.grad_tile.width)
    uncertainty = dict(EPS_LOG=EPS_LOG_U, EPS_NORM=EPS_MINMAX, K_PAD=plan.k_pad,
                       ONE_BLOCK=plan.one_block, BLOCK=plan.config.run_pixels, **common)
    ncc = dict(EPS=EPS_CC, EPS_NORM=EPS_MINMAX, R_PAD=next_power_of_2(plan.n_range), **box,
               ROW_UNROLL=row_unroll(plan.radius), **common)
    return [
        (_uncertainty_kernel, dict(uncertainty, WRITE_RANGE=True, NORMALISED=False)),
        (_ncc_kernel, dict(ncc, BACKWARD=False)),
        (_finish_kernel, dict(BLOCK=_finish_block(plan), num_warps=4)),
        (_uncertainty_kernel, dict(uncertainty, WRITE_RANGE=False, NORMALISED=True)),
        (_ncc_kernel, dict(ncc, BACKWARD=True)),
        (_boundary_grad_kernel, dict(EPS_NORM=EPS_MINMAX, EPS_LOG=EPS_LOG_U, K_PAD=plan.k_pad,
                                     ONE_BLOCK=plan.one_block, **grad_box,
                                     ROW_UNROLL=row_unroll(plan.radius, plan.k_pad), **common)),
    ]


def edge_constexprs(is_3d: bool):
    """(kernel, compile-time settings) of the edge map's two launches (compile check)."""
    block = INTERPRETER_RUN_PIXELS if INTERPRETED else EDGE_RUN_PIXELS
    return [
        (_edge_magnitude_kernel, dict(IS_3D=is_3d, WIDE=False, BLOCK=block, num_warps=4)),
        (_edge_normalise_kernel, dict(WIDE=False, EPS_NORM=EPS_MINMAX, R_PAD=64, BLOCK=block,
                                      num_warps=4)),
    ]


def _finish_block(plan: _Plan) -> int:
    return max(16, min(1024, next_power_of_2(plan.batch * plan.n_box)))


def _dense_pixels(t: torch.Tensor) -> torch.Tensor:
    """t itself when its spatial dims (after batch and channel) are dense, else a copy."""
    expected = 1
    for size, stride in zip(reversed(t.shape[2:]), reversed(t.stride()[2:])):
        if size != 1 and stride != expected:
            return t.contiguous()
        expected *= size
    return t


def boundary_cc(p, edge, window, *, config: Optional[BoundaryConfig] = None,
                tile: Optional[Sequence[int]] = None, max_programs: Optional[int] = None,
                channel_block: Optional[int] = None):
    """(cc, u_range): the contract's `boundary_cc`. cc is 0-dim in the accumulation dtype,
    u_range (B, 2) the per-sample [min, max] of U. p (B, K, *S) and edge (B, 1, *S) need dense
    spatial dims only."""
    p = _dense_pixels(p)
    plan = _plan(p, window, config, tile, max_programs, channel_block)
    acc = plan.acc_dtype
    edge = _dense_pixels(edge.to(acc))
    settings = kernel_constexprs(plan)
    u_range = torch.empty((plan.batch, 2), dtype=acc, device=p.device)
    if plan.batch * plan.n == 0:
        # the mean over no pixel, as torch's mean gives it
        return torch.full((), float("nan"), dtype=acc, device=p.device), u_range.zero_()
    u = torch.empty((plan.batch, plan.n), dtype=acc, device=p.device)
    ranges = torch.empty((plan.batch, plan.n_range, 2), dtype=acc, device=p.device)
    partial = torch.empty((plan.batch, plan.n_box), dtype=acc, device=p.device)
    cc = torch.empty((), dtype=acc, device=p.device)
    d, h, w = plan.dims
    _uncertainty_kernel[(plan.batch, plan.n_range)](
        p, u, ranges, u_range, p.stride(0), p.stride(1), plan.k, plan.n, plan.runs_per_sample,
        **settings[0][1],
    )
    _ncc_kernel[(plan.batch, plan.n_box)](
        u, ranges, u_range, edge, partial, cc, u, u, u,
        edge.stride(0), d, h, w, plan.n, plan.batch * plan.n, plan.n_range, plan.window_count,
        plan.tile.tiles_z, plan.tile.tiles_y, plan.tile.tiles_x,
        **settings[1][1],
    )
    _finish_kernel[(1,)](partial, cc, partial.numel(), plan.batch * plan.n, **settings[2][1])
    return cc, u_range


def boundary_cc_backward(grad_cc, p, edge, u_range, window, *,
                         config: Optional[BoundaryConfig] = None,
                         tile: Optional[Sequence[int]] = None,
                         max_programs: Optional[int] = None, channel_block: Optional[int] = None):
    """dL/dp in p's dtype: the contract's `boundary_cc_backward`. `channel_block` (as for
    `boundary_cc`): channels per block of the uncertainty and gradient passes, default
    CHANNEL_BLOCK; tests use a small one to cover the blocked kernels under the interpreter."""
    p = _dense_pixels(p)
    plan = _plan(p, window, config, tile, max_programs, channel_block)
    acc = plan.acc_dtype
    grad_p = torch.empty(p.shape, dtype=p.dtype, device=p.device)
    if plan.batch * plan.n == 0:
        return grad_p
    edge = _dense_pixels(edge.to(acc))
    grad_cc = grad_cc.to(acc).reshape(1)
    u_range = u_range.to(acc).contiguous()
    settings = kernel_constexprs(plan)
    # Un and the three coefficient maps: the backward's four (B, *S) temporaries
    un = torch.empty((plan.batch, plan.n), dtype=acc, device=p.device)
    coef = torch.empty((3, plan.batch, plan.n), dtype=acc, device=p.device)
    d, h, w = plan.dims
    _uncertainty_kernel[(plan.batch, plan.n_range)](
        p, un, un, u_range, p.stride(0), p.stride(1), plan.k, plan.n, plan.runs_per_sample,
        **settings[3][1],
    )
    _ncc_kernel[(plan.batch, plan.n_box)](
        un, un, u_range, edge, un, grad_cc, coef[0], coef[1], coef[2],
        edge.stride(0), d, h, w, plan.n, plan.batch * plan.n, plan.n_range, plan.window_count,
        plan.tile.tiles_z, plan.tile.tiles_y, plan.tile.tiles_x,
        **settings[4][1],
    )
    del un
    _boundary_grad_kernel[(plan.batch, plan.n_grad)](
        p, u_range, edge, coef[0], coef[1], coef[2], grad_p,
        p.stride(0), p.stride(1), edge.stride(0), grad_p.stride(0), grad_p.stride(1),
        plan.k, d, h, w, plan.n, plan.grad_tile.tiles_z, plan.grad_tile.tiles_y,
        plan.grad_tile.tiles_x,
        **settings[5][1],
    )
    return grad_p


EDGE_RUN_PIXELS = 1024


def edge_map(image, gamma):
    """The backend contract's fused edge map: (B, 1, *S) in the image's accumulation dtype,
    `reference.edge_map(image, gamma)` in two passes (magnitude and per-program min/max, then
    the normalisation and power in place): no temporary beyond the output."""
    image = _dense_pixels(image)
    batch, channels = int(image.shape[0]), int(image.shape[1])
    d, h, w, n = spatial_dims(image.shape)
    acc = accumulation_dtype(image.dtype)
    out = torch.empty((batch, 1) + tuple(image.shape[2:]), dtype=acc, device=image.device)
    if batch * n == 0:
        return out
    block = INTERPRETER_RUN_PIXELS if INTERPRETED else EDGE_RUN_PIXELS
    runs = triton.cdiv(n, block)
    n_range = _programs_per_sample(batch, runs, image.device)
    ranges = torch.empty((batch, n_range, 2), dtype=acc, device=image.device)
    wide = needs_wide_index(map_extent(channels, image.stride(1), n))
    _edge_magnitude_kernel[(batch, n_range)](
        image, out, ranges, image.stride(0), image.stride(1), channels, d, h, w, n, runs,
        IS_3D=image.dim() == 5, WIDE=wide, BLOCK=block, num_warps=4,
    )
    gamma = float(gamma)
    zero_power = 1.0 if gamma == 0 else (0.0 if gamma > 0 else float("inf"))
    _edge_normalise_kernel[(batch, n_range)](
        out, ranges, n, runs, n_range, gamma, zero_power,
        WIDE=wide, EPS_NORM=EPS_MINMAX, R_PAD=next_power_of_2(n_range), BLOCK=block,
        num_warps=4,
    )
    return out
