"""Triton kernels for the boundary-aware cross-correlation term (SPEC §5), forward and backward.

Forward, two passes (the per-sample min-max of U sits between them):
  1. `_uncertainty_kernel`: U = -sum_k p_k log(p_k + 1e-16) per pixel from a (K, BLOCK_P) tile of p,
     written as a (B, *S) map, plus each tile's min and max of U (tiles stay within one sample);
     the launcher reduces those to the per-sample [min, max] (`u_range`).
  2. `_ncc_kernel`: per centre pixel the five box sums of Un, Un^2, Un E, E, E^2 over the window
     (zero padding), gathered from the U and E maps, normalising U on the fly with the detached
     per-sample min and max, then the clamped NCC term; each tile writes its partial sum and the
     launcher adds them in a fixed order (deterministic) and divides by B * prod(S).
Backward, three passes: U again (pass 1 without the min-max), `_ncc_kernel` in backward mode
writes the per-centre coefficients of dL/dS(Un), dL/dS(Un^2), dL/dS(Un E), and
`_boundary_grad_kernel` box-sums those (the box is its own transpose), forms dL/dUn and writes
dL/dp_k = -dL/dU (log(p_k + 1e-16) + p_k / (p_k + 1e-16)) once per element. Temporaries are
(B, *S) maps only (U and three coefficient maps), never (B, K, *S).

The formulas follow `bimi_kernels.reference.local_cross_correlation` term by term, including the
clamps at eps = 1e-5 (a clamped term passes no gradient), so float64 agrees to rounding.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import INTERPRETED, INTERPRETER_BLOCK_P, grid_size, padded_k, spatial_dims

EPS_CC = 1e-5  # clamp of the cross term and the variances
EPS_LOG_U = 1e-16  # inside the log of the uncertainty map
EPS_MINMAX = 1e-6  # denominator of the min-max normalisation


@triton.jit
def _uncertainty_kernel(
    p_ptr, u_ptr, tile_min_ptr, tile_max_ptr,
    K, N, n_tiles, tiles_per_sample,
    WRITE_RANGE: tl.constexpr, EPS_LOG: tl.constexpr, K_PAD: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    acc_dtype = u_ptr.dtype.element_ty
    eps_log = tl.full((), EPS_LOG, acc_dtype)
    k = tl.arange(0, K_PAD)
    k_ok = k < K
    n = tl.cast(N, tl.int64)
    k_stride = k.to(tl.int64) * n
    for tile in range(pid, n_tiles, n_programs):
        b = tile // tiles_per_sample
        s = tl.cast(tile - b * tiles_per_sample, tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
        inside = s < n
        q = tl.load(
            p_ptr + tl.cast(b, tl.int64) * K * n + (k_stride[:, None] + s[None, :]),
            mask=k_ok[:, None] & inside[None, :], other=0.0,
        ).to(acc_dtype)
        u = -tl.sum(q * tl.log(q + eps_log), axis=0)
        pixel = tl.cast(b, tl.int64) * n + s
        tl.store(u_ptr + pixel, u, mask=inside)
        if WRITE_RANGE:
            tl.store(tile_min_ptr + tile, tl.min(tl.where(inside, u, float("inf")), axis=0))
            tl.store(tile_max_ptr + tile, tl.max(tl.where(inside, u, float("-inf")), axis=0))


@triton.jit
def _ncc_kernel(
    u_ptr, u_range_ptr, edge_ptr, partial_ptr, coef_ptr, grad_cc_ptr,
    N, H, W, D, total_pixels, n_tiles, radius, radius_z, window_count,
    BACKWARD: tl.constexpr,
    EPS: tl.constexpr, EPS_NORM: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    acc_dtype = u_ptr.dtype.element_ty
    eps = tl.full((), EPS, acc_dtype)
    eps_norm = tl.full((), EPS_NORM, acc_dtype)
    count = tl.cast(window_count, acc_dtype)  # n = window^ndim, an exact integer
    n = tl.cast(N, tl.int64)
    if BACKWARD:
        # L = -mean(f) scaled by grad_cc: dL/df = -grad_cc / (B * prod(S))
        scale = -tl.load(grad_cc_ptr) / tl.cast(total_pixels, acc_dtype)
    for tile in range(pid, n_tiles, n_programs):
        g = tl.cast(tile, tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
        inside = g < total_pixels
        b = g // n
        s = g - b * n
        y = s // W
        x = s - y * W
        z = y // H
        y = y - z * H
        lo = tl.load(u_range_ptr + 2 * b, mask=inside, other=0.0)
        denominator = tl.load(u_range_ptr + 2 * b + 1, mask=inside, other=1.0) - lo + eps_norm
        s_u = tl.zeros((BLOCK_P,), dtype=acc_dtype)
        s_uu = tl.zeros((BLOCK_P,), dtype=acc_dtype)
        s_ue = tl.zeros((BLOCK_P,), dtype=acc_dtype)
        s_e = tl.zeros((BLOCK_P,), dtype=acc_dtype)
        s_ee = tl.zeros((BLOCK_P,), dtype=acc_dtype)
        for dz in range(-radius_z, radius_z + 1):
            z2 = z + dz
            ok_z = inside & (z2 >= 0) & (z2 < D)
            for dy in range(-radius, radius + 1):
                y2 = y + dy
                ok_zy = ok_z & (y2 >= 0) & (y2 < H)
                row = g + (dz * H + dy) * W
                for dx in range(-radius, radius + 1):
                    x2 = x + dx
                    ok = ok_zy & (x2 >= 0) & (x2 < W)
                    # a missing neighbour reads U = lo, i.e. Un = 0: zero padding of Un
                    un = (tl.load(u_ptr + (row + dx), mask=ok, other=lo) - lo) / denominator
                    e = tl.load(edge_ptr + (row + dx), mask=ok, other=0.0)
                    s_u += un
                    s_uu += un * un
                    s_ue += un * e
                    s_e += e
                    s_ee += e * e
        # the reference's expressions, in its order
        mu_u = s_u / count
        mu_e = s_e / count
        cross_raw = s_ue - mu_e * s_u - mu_u * s_e + mu_u * mu_e * count
        var_u_raw = s_uu - 2 * mu_u * s_u + mu_u * mu_u * count
        var_e_raw = s_ee - 2 * mu_e * s_e + mu_e * mu_e * count
        cross = tl.maximum(cross_raw, eps)
        var_u = tl.maximum(var_u_raw, eps)
        var_e = tl.maximum(var_e_raw, eps)
        if BACKWARD:
            # f = cross^2 / (var_u var_e); df/dcross and df/dvar_u, zero where clamped
            d_cross = tl.where(cross_raw >= eps, 2 * cross / (var_u * var_e), 0.0)
            d_var_u = tl.where(var_u_raw >= eps, -(cross * cross) / (var_u * var_u * var_e), 0.0)
            # through the box sums: dcross/dS(U) = -mu_e, dvar_u/dS(U) = -2 mu_u
            coef_u = scale * (-mu_e * d_cross - 2 * mu_u * d_var_u)
            coef_uu = scale * d_var_u
            coef_ue = scale * d_cross
            tl.store(coef_ptr + g, coef_u, mask=inside)
            tl.store(coef_ptr + total_pixels + g, coef_uu, mask=inside)
            tl.store(coef_ptr + 2 * total_pixels + g, coef_ue, mask=inside)
        else:
            f = tl.where(inside, cross * cross / (var_u * var_e), 0.0)
            tl.store(partial_ptr + tile, tl.sum(f, axis=0))


@triton.jit
def _boundary_grad_kernel(
    p_ptr, u_ptr, u_range_ptr, edge_ptr, coef_ptr, grad_ptr,
    K, N, H, W, D, total_pixels, n_tiles, radius, radius_z,
    EPS_NORM: tl.constexpr, EPS_LOG: tl.constexpr, K_PAD: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    acc_dtype = u_ptr.dtype.element_ty
    eps_norm = tl.full((), EPS_NORM, acc_dtype)
    eps_log = tl.full((), EPS_LOG, acc_dtype)
    k = tl.arange(0, K_PAD)
    k_ok = k < K
    n = tl.cast(N, tl.int64)
    k_stride = k.to(tl.int64) * n
    for tile in range(pid, n_tiles, n_programs):
        g = tl.cast(tile, tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
        inside = g < total_pixels
        b = g // n
        s = g - b * n
        y = s // W
        x = s - y * W
        z = y // H
        y = y - z * H
        # box sums of the coefficient maps (the window is symmetric: its own transpose)
        t_u = tl.zeros((BLOCK_P,), dtype=acc_dtype)
        t_uu = tl.zeros((BLOCK_P,), dtype=acc_dtype)
        t_ue = tl.zeros((BLOCK_P,), dtype=acc_dtype)
        for dz in range(-radius_z, radius_z + 1):
            z2 = z + dz
            ok_z = inside & (z2 >= 0) & (z2 < D)
            for dy in range(-radius, radius + 1):
                y2 = y + dy
                ok_zy = ok_z & (y2 >= 0) & (y2 < H)
                row = g + (dz * H + dy) * W
                for dx in range(-radius, radius + 1):
                    x2 = x + dx
                    ok = ok_zy & (x2 >= 0) & (x2 < W)
                    t_u += tl.load(coef_ptr + (row + dx), mask=ok, other=0.0)
                    t_uu += tl.load(coef_ptr + total_pixels + (row + dx), mask=ok, other=0.0)
                    t_ue += tl.load(coef_ptr + 2 * total_pixels + (row + dx), mask=ok, other=0.0)
        lo = tl.load(u_range_ptr + 2 * b, mask=inside, other=0.0)
        denominator = tl.load(u_range_ptr + 2 * b + 1, mask=inside, other=1.0) - lo + eps_norm
        un = (tl.load(u_ptr + g, mask=inside, other=0.0) - lo) / denominator
        e = tl.load(edge_ptr + g, mask=inside, other=0.0)
        # dL/dU = dL/dUn / (max - min + 1e-6), min and max detached
        grad_u = (t_u + 2 * un * t_uu + e * t_ue) / denominator
        index = k_stride[:, None] + (b * K * n + s)[None, :]
        tile_ok = k_ok[:, None] & inside[None, :]
        q = tl.load(p_ptr + index, mask=tile_ok, other=0.0).to(acc_dtype)
        # U = -sum_k q_k log(q_k + eps): dU/dq_k = -(log(q_k + eps) + q_k / (q_k + eps))
        grad = -grad_u[None, :] * (tl.log(q + eps_log) + q / (q + eps_log))
        tl.store(grad_ptr + index, grad.to(grad_ptr.dtype.element_ty), mask=tile_ok)


# ------------------------------------------------------------------------------------------------
# launchers
# ------------------------------------------------------------------------------------------------
def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def default_block_p(k_pad: int) -> int:
    """Pixels per tile. On a GPU the (K_PAD, BLOCK_P) tile of p in the gradient kernel is kept
    to 2048 values per program (4 warps: 16 per thread), the box-sum kernels (k_pad=1) use 256;
    chosen from `ptxas -v` register counts, not timed on hardware yet."""
    if INTERPRETED:
        return INTERPRETER_BLOCK_P
    return max(32, min(256, 2048 // k_pad))


def _check_block(block_p: int) -> int:
    block_p = int(block_p)
    if block_p < 1 or block_p & (block_p - 1):
        raise ValueError(f"block_p: expected a power of two, got {block_p}")
    return block_p


def uncertainty(p, *, with_range=True, block_p=None, max_programs=None):
    """U (B, N) in the accumulation dtype and, if asked, the per-sample [min, max] (B, 2)."""
    batch, k = int(p.shape[0]), int(p.shape[1])
    _, _, _, n = spatial_dims(p.shape)
    acc_dtype = _accumulation_dtype(p.dtype)
    k_pad = padded_k(k)
    block_p = _check_block(block_p if block_p is not None else default_block_p(k_pad))
    tiles_per_sample = triton.cdiv(n, block_p)
    n_tiles = batch * tiles_per_sample
    u = torch.empty((batch, n), dtype=acc_dtype, device=p.device)
    tile_min = torch.empty((batch, tiles_per_sample), dtype=acc_dtype, device=p.device)
    tile_max = torch.empty_like(tile_min)
    if n_tiles > 0:
        n_programs = grid_size(n_tiles, p.device)
        if max_programs is not None:
            n_programs = max(1, min(n_programs, int(max_programs)))
        _uncertainty_kernel[(n_programs,)](
            p, u, tile_min, tile_max,
            k, n, n_tiles, tiles_per_sample,
            WRITE_RANGE=with_range, EPS_LOG=EPS_LOG_U, K_PAD=k_pad, BLOCK_P=block_p,
            num_warps=4,
        )
    if not with_range:
        return u, None
    u_range = torch.stack([tile_min.amin(dim=1), tile_max.amax(dim=1)], dim=1)
    return u, u_range


def _box_geometry(p, window):
    d, h, w, n = spatial_dims(p.shape)
    radius = int(window) // 2
    radius_z = radius if p.dim() == 5 else 0
    window_count = int(window) ** (p.dim() - 2)
    return d, h, w, n, radius, radius_z, window_count


def boundary_cc(p, edge, window, *, block_p=None, max_programs=None):
    """(cc, u_range): the contract's `boundary_cc`. cc is 0-dim in the accumulation dtype."""
    u, u_range = uncertainty(p, block_p=block_p, max_programs=max_programs)
    acc_dtype = u.dtype
    d, h, w, n, radius, radius_z, window_count = _box_geometry(p, window)
    total_pixels = int(p.shape[0]) * n
    block_p = _check_block(block_p if block_p is not None else default_block_p(1))
    n_tiles = triton.cdiv(total_pixels, block_p)
    if n_tiles == 0:
        # the mean over no pixel, as torch's mean gives it
        return torch.full((), float("nan"), dtype=acc_dtype, device=p.device), u_range
    n_programs = grid_size(n_tiles, p.device)
    if max_programs is not None:
        n_programs = max(1, min(n_programs, int(max_programs)))
    partial = torch.empty((n_tiles,), dtype=acc_dtype, device=p.device)
    edge = edge.to(acc_dtype).contiguous()
    _ncc_kernel[(n_programs,)](
        u, u_range, edge, partial, partial, partial,
        n, h, w, d, total_pixels, n_tiles, radius, radius_z, window_count,
        BACKWARD=False, EPS=EPS_CC, EPS_NORM=EPS_MINMAX, BLOCK_P=block_p,
        num_warps=4,
    )
    # fixed-order sum of the tiles' partial sums: deterministic
    return -(partial.sum() / total_pixels), u_range


def boundary_cc_backward(grad_cc, p, edge, u_range, window, *, block_p=None, max_programs=None):
    """dL/dp in p's dtype: the contract's `boundary_cc_backward`."""
    u, _ = uncertainty(p, with_range=False, block_p=block_p, max_programs=max_programs)
    acc_dtype = u.dtype
    d, h, w, n, radius, radius_z, window_count = _box_geometry(p, window)
    batch, k = int(p.shape[0]), int(p.shape[1])
    total_pixels = batch * n
    grad_p = torch.empty_like(p)
    if total_pixels == 0:
        return grad_p
    grad_cc = grad_cc.to(acc_dtype).reshape(1).contiguous()
    u_range = u_range.to(acc_dtype).contiguous()
    edge = edge.to(acc_dtype).contiguous()
    coef = torch.empty((3, total_pixels), dtype=acc_dtype, device=p.device)

    block_p_box = _check_block(block_p if block_p is not None else default_block_p(1))
    n_tiles = triton.cdiv(total_pixels, block_p_box)
    n_programs = grid_size(n_tiles, p.device)
    if max_programs is not None:
        n_programs = max(1, min(n_programs, int(max_programs)))
    _ncc_kernel[(n_programs,)](
        u, u_range, edge, coef, coef, grad_cc,
        n, h, w, d, total_pixels, n_tiles, radius, radius_z, window_count,
        BACKWARD=True, EPS=EPS_CC, EPS_NORM=EPS_MINMAX, BLOCK_P=block_p_box,
        num_warps=4,
    )

    k_pad = padded_k(k)
    block_p_grad = _check_block(block_p if block_p is not None else default_block_p(k_pad))
    n_tiles = triton.cdiv(total_pixels, block_p_grad)
    n_programs = grid_size(n_tiles, p.device)
    if max_programs is not None:
        n_programs = max(1, min(n_programs, int(max_programs)))
    _boundary_grad_kernel[(n_programs,)](
        p, u, u_range, edge, coef, grad_p,
        k, n, h, w, d, total_pixels, n_tiles, radius, radius_z,
        EPS_NORM=EPS_MINMAX, EPS_LOG=EPS_LOG_U, K_PAD=k_pad, BLOCK_P=block_p_grad,
        num_warps=4,
    )
    return grad_p
