"""The BIMI loss in plain PyTorch: the ground truth of every test, written to be read.

docs/contract.md §3-§6. Everything here is differentiable by autograd and works for 2-D maps
(B, K, H, W) and 3-D maps (B, K, D, H, W). It is not fast: each offset slices the two maps and
contracts them, and the box sums are convolutions with a window of ones (average pools off the
CPU, immune to TF32). Memory stays at a few copies of the inputs.

Accumulation follows docs/contract.md §8: float64 inputs are computed in float64, everything else in float32.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .numerics import EPS_CC, EPS_IIC_CLAMP, EPS_LOG_U, EPS_MI, EPS_MINMAX, accumulation_dtype  # noqa: F401
from .offsets import Offsets, make_offsets, overlap_slices


def _apply_mask(p: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """p (B, K, *S) times mask (B, *S) or (B, 1, *S), in p's dtype."""
    if mask is None:
        return p
    return p * mask.reshape(p.shape[0], 1, *p.shape[2:]).to(p.dtype)


# ------------------------------------------------------------------------------------------------
# §3 joint counts (docs/contract.md)
# ------------------------------------------------------------------------------------------------
def joint_counts(
    p1: torch.Tensor, p2: torch.Tensor, offsets: Union[Offsets, int], mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """J[o, i, j] = sum over b and s with s+d_o inside (both pixels valid) of p1[b,i,s] p2[b,j,s+d_o].

    `offsets`: explicit n-tuples, or an int radius r for the window {-r..r}^n
    (`bimi_kernels.offsets.make_offsets`). Returns (|O|, K, K) in the accumulation dtype.
    """
    if isinstance(offsets, int) and not isinstance(offsets, bool):
        offsets = make_offsets(offsets, p1.dim() - 2)
    acc = accumulation_dtype(p1.dtype)
    a = _apply_mask(p1.to(acc), mask)
    b = _apply_mask(p2.to(acc), mask)
    spatial = p1.shape[2:]
    counts = []
    for d in offsets:
        first, second = overlap_slices(d, spatial)
        x = a[(slice(None), slice(None)) + first]  # p1 at s
        y = b[(slice(None), slice(None)) + second]  # p2 at s + d
        counts.append(torch.einsum("bi...,bj...->ij", x, y))
    return torch.stack(counts)


def joint_counts_backward(
    grad_j: torch.Tensor,
    p1: torch.Tensor,
    p2: torch.Tensor,
    offsets: Offsets,
    mask: Optional[torch.Tensor] = None,
):
    """The backward of `joint_counts` written out (docs/contract.md §3), not by autograd:

        dL/dp1[b,i,s] = sum_d sum_j G_d[i,j] p2[b,j,s+d]     dL/dp2[b,j,t] = sum_d sum_i G_d[i,j] p1[b,i,t-d]

    over pairs inside and valid (docs/contract.md §3). Returns gradients in the dtypes of p1 and p2.
    """
    acc = grad_j.dtype
    a = _apply_mask(p1.to(acc), mask)
    b = _apply_mask(p2.to(acc), mask)
    grad_a = torch.zeros_like(a)
    grad_b = torch.zeros_like(b)
    spatial = p1.shape[2:]
    lead = (slice(None), slice(None))
    for g, d in zip(grad_j, offsets):
        first, second = overlap_slices(d, spatial)
        grad_a[lead + first] += torch.einsum("ij,bj...->bi...", g, b[lead + second])
        grad_b[lead + second] += torch.einsum("ij,bi...->bj...", g, a[lead + first])
    # the mask multiplies each map once more: d(m p)/dp = m
    return _apply_mask(grad_a, mask).to(p1.dtype), _apply_mask(grad_b, mask).to(p2.dtype)


# ------------------------------------------------------------------------------------------------
# §4 regularised mutual information (docs/contract.md)
# ------------------------------------------------------------------------------------------------
def joint_distributions(j: torch.Tensor, symmetric: bool = True):
    """Normalise each offset's counts to a distribution; symmetrise if asked.

    Returns (P, valid): P (|O|, K, K), valid (|O|,) bool, False where an offset had no pair
    (its P is all zeros). No host sync.
    """
    total = j.sum(dim=(-2, -1), keepdim=True)
    valid = total > 0
    p = j / torch.where(valid, total, torch.ones_like(total))
    if symmetric:
        p = (p + p.transpose(-2, -1)) / 2
    return p, valid.reshape(-1)


def regularized_mi_of_distribution(
    p: torch.Tensor, alpha: float = 0.5, lamda: float = 1.0, eps: float = EPS_MI, eps_convention: str = "add"
) -> torch.Tensor:
    """L_RMI(P) for each distribution in a (..., K, K) batch (docs/contract.md §4):

    - sum T log(P + eps) + lamda sum P [log(r + eps) + log(c + eps)],  T = alpha I/K + (1-alpha) P.

    eps_convention="clamp" is IIC's instead: the marginals r, c are taken from P, then P, r and c
    are clamped from below at 2.2e-16 (a clamped entry passes no gradient) and no eps is added.
    """
    k = p.shape[-1]
    rows = p.sum(dim=-1, keepdim=True)  # r_i
    cols = p.sum(dim=-2, keepdim=True)  # c_j
    if eps_convention == "clamp":
        p, rows, cols = (t.clamp(min=EPS_IIC_CLAMP) for t in (p, rows, cols))
        log = torch.log
    else:
        def log(t):
            return torch.log(t + eps)
    eye = torch.eye(k, dtype=p.dtype, device=p.device)
    target = alpha * eye / k + (1 - alpha) * p
    cross_entropy = -(target * log(p)).sum(dim=(-2, -1))
    marginals = (p * (log(rows) + log(cols))).sum(dim=(-2, -1))
    return cross_entropy + lamda * marginals


def regularized_mi_from_counts(
    j: torch.Tensor,
    alpha: float = 0.5,
    lamda: float = 1.0,
    symmetric: bool = True,
    eps: float = EPS_MI,
    pool_offsets: bool = False,
    eps_convention: str = "add",
) -> torch.Tensor:
    """L_MI from joint counts J (|O|, K, K): the mean over offsets with at least one pair of
    L_RMI(P_d); 0 (with zero gradient) when no offset has one. With `pool_offsets` the counts
    are summed over the offsets first and one L_RMI is taken (IIC's collapsed loss)."""
    if pool_offsets:
        j = j.sum(dim=0, keepdim=True)
    p, valid = joint_distributions(j, symmetric)
    per_offset = regularized_mi_of_distribution(p, alpha, lamda, eps, eps_convention)
    weight = valid.to(per_offset.dtype)
    return (per_offset * weight).sum() / weight.sum().clamp(min=1)


def regularized_mi(
    p1: torch.Tensor,
    p2: torch.Tensor,
    offsets: Union[Offsets, int],
    mask: Optional[torch.Tensor] = None,
    alpha: float = 0.5,
    lamda: float = 1.0,
    symmetric: bool = True,
    eps: float = EPS_MI,
    pool_offsets: bool = False,
    eps_convention: str = "add",
) -> torch.Tensor:
    """L_MI of two cluster maps (docs/contract.md §4)."""
    counts = joint_counts(p1, p2, offsets, mask)
    return regularized_mi_from_counts(counts, alpha, lamda, symmetric, eps, pool_offsets, eps_convention)


# ------------------------------------------------------------------------------------------------
# §5 boundary-aware cross-correlation (docs/contract.md)
# ------------------------------------------------------------------------------------------------
def minmax_normalize(x: torch.Tensor) -> torch.Tensor:
    """(x - min) / (max - min + 1e-6) per sample, min and max detached."""
    flat = x.detach().flatten(1)
    shape = (x.shape[0],) + (1,) * (x.dim() - 1)
    lo, hi = (t.reshape(shape) for t in torch.aminmax(flat, dim=1))
    return (x - lo) / (hi - lo + EPS_MINMAX)


def resized_image(
    image: torch.Tensor, size: Optional[Sequence[int]] = None, dtype: Optional[torch.dtype] = None
) -> torch.Tensor:
    """The image detached, in `dtype` (default: the image's accumulation dtype), resized
    (bilinear/trilinear, align_corners=False) when `size` differs from its spatial size."""
    x = image.detach().to(dtype or accumulation_dtype(image.dtype))
    if size is not None and tuple(x.shape[2:]) != tuple(size):
        mode = "bilinear" if x.dim() == 4 else "trilinear"
        x = F.interpolate(x, size=tuple(size), mode=mode, align_corners=False)
    return x


def edge_map(
    image: torch.Tensor,
    gamma: float = 0.75,
    size: Optional[Sequence[int]] = None,
    dtype: Optional[torch.dtype] = None,
):
    """Edge magnitude of an image (B, C, *S): wrap-around backward differences along each spatial
    dim, sqrt of the sum of squares, mean over channels, min-max per sample, to the power gamma.

    Resized first (bilinear/trilinear, align_corners=False) when `size` differs from S.
    Returns (B, 1, *S) without gradient, in `dtype` (default: the image's accumulation dtype;
    the loss passes the maps' accumulation dtype, docs/contract.md §5).
    """
    x = resized_image(image, size, dtype)
    ndim = x.dim() - 2
    differences = [x - torch.roll(x, 1, dims=2 + k) for k in range(ndim)]
    squares = sum(d * d for d in differences)
    magnitude = squares.sqrt().mean(dim=1, keepdim=True)
    return minmax_normalize(magnitude).pow(gamma)


def uncertainty_map(p: torch.Tensor) -> torch.Tensor:
    """U = -sum_k p_k log(p_k + 1e-16): (B, K, *S) -> (B, 1, *S), accumulation dtype."""
    q = p.to(accumulation_dtype(p.dtype))
    return -(q * torch.log(q + EPS_LOG_U)).sum(dim=1, keepdim=True)


def box_sum(x: torch.Tensor, window: int) -> torch.Tensor:
    """Sum over a window^n box around each pixel, zero padding window // 2. x is (B, C, *S),
    each channel summed on its own.

    A convolution with ones on the CPU; elsewhere `pooled_box_sum`, the same sums, because cuDNN
    runs float32 convolutions in TF32 by default (torch.backends.cudnn.allow_tf32: 10
    significant bits, which the variances' cancellation turns into errors of 1e-3)."""
    if x.device.type != "cpu":
        return pooled_box_sum(x, window)
    ndim, channels = x.dim() - 2, x.shape[1]
    ones = torch.ones((channels, 1) + (window,) * ndim, dtype=x.dtype, device=x.device)
    conv = F.conv2d if ndim == 2 else F.conv3d
    return conv(x, ones, padding=window // 2, groups=channels)


def pooled_box_sum(x: torch.Tensor, window: int) -> torch.Tensor:
    """`box_sum` as an average pool times the count: float32 sums whatever the TF32 flags.
    (Padded first: a pool refuses a map smaller than its window.)"""
    ndim = x.dim() - 2
    pool = F.avg_pool2d if ndim == 2 else F.avg_pool3d
    padded = F.pad(x, [window // 2] * (2 * ndim))
    return pool(padded, window, stride=1) * float(window ** ndim)


def local_cross_correlation(u: torch.Tensor, e: torch.Tensor, window: int = 5, eps: float = EPS_CC):
    """CC(U, E) = -mean over (b, s) of cross^2 / (var_U var_E) with box windows (docs/contract.md §5).

    The window count is fixed at n = window^ndim (also at the borders); the cross term and both
    variances are clamped at >= eps, so negatively correlated windows give no gradient.
    """
    n = float(window ** (u.dim() - 2))
    s_u, s_e = box_sum(u, window), box_sum(e, window)
    s_uu, s_ee, s_ue = box_sum(u * u, window), box_sum(e * e, window), box_sum(u * e, window)
    mu_u, mu_e = s_u / n, s_e / n
    cross = (s_ue - mu_e * s_u - mu_u * s_e + mu_u * mu_e * n).clamp(min=eps)
    var_u = (s_uu - 2 * mu_u * s_u + mu_u * mu_u * n).clamp(min=eps)
    var_e = (s_ee - 2 * mu_e * s_e + mu_e * mu_e * n).clamp(min=eps)
    return -(cross * cross / (var_u * var_e)).mean()


def boundary_cc(p: torch.Tensor, edge: torch.Tensor, window: int = 5) -> torch.Tensor:
    """CC of one cluster map's normalised uncertainty with a precomputed edge map (B, 1, *S)."""
    return local_cross_correlation(minmax_normalize(uncertainty_map(p)), edge, window)


def boundary_cc_backward(
    grad_cc: torch.Tensor, p: torch.Tensor, edge: torch.Tensor, window: int = 5, eps: float = EPS_CC
) -> torch.Tensor:
    """The backward of `boundary_cc` written out (what the kernels implement), not by autograd.

    With c the window centres, N = B * prod(S) and g = dL/dCC, the per-centre coefficients

        dcross = -g/N * 2 cross / (var_U var_E)       (0 where cross was clamped)
        dvar_U = +g/N * cross^2 / (var_U^2 var_E)     (0 where var_U was clamped)
        a = -mu_E dcross - 2 mu_U dvar_U,  b = dvar_U,  c = dcross

    are box-summed back onto the pixels (the zero-padded odd box is its own transpose):
    dL/dUn = S(a) + 2 Un S(b) + E S(c); then through the min-max (detached) and the entropy:
    dL/dp_k = dL/dUn / (max - min + 1e-6) * -(log(p_k + 1e-16) + p_k / (p_k + 1e-16)).
    """
    q = p.to(accumulation_dtype(p.dtype))
    u = uncertainty_map(q)
    flat = u.flatten(1)
    shape = (u.shape[0],) + (1,) * (u.dim() - 1)
    lo, hi = flat.min(dim=1).values.reshape(shape), flat.max(dim=1).values.reshape(shape)
    scale = 1.0 / (hi - lo + EPS_MINMAX)
    un = (u - lo) * scale
    e = edge.to(q.dtype)

    n = float(window ** (u.dim() - 2))
    s_u, s_e = box_sum(un, window), box_sum(e, window)
    s_uu, s_ee, s_ue = box_sum(un * un, window), box_sum(e * e, window), box_sum(un * e, window)
    mu_u, mu_e = s_u / n, s_e / n
    cross_raw = s_ue - mu_e * s_u - mu_u * s_e + mu_u * mu_e * n
    var_u_raw = s_uu - 2 * mu_u * s_u + mu_u * mu_u * n
    var_e = (s_ee - 2 * mu_e * s_e + mu_e * mu_e * n).clamp(min=eps)
    cross, var_u = cross_raw.clamp(min=eps), var_u_raw.clamp(min=eps)

    g = grad_cc.to(q.dtype) / u.numel()  # d(-mean)/d(term) = -1/N, sign applied below
    d_cross = -g * 2 * cross / (var_u * var_e) * (cross_raw >= eps)
    d_var_u = g * cross * cross / (var_u * var_u * var_e) * (var_u_raw >= eps)
    coef_u = -mu_e * d_cross - 2 * mu_u * d_var_u
    grad_un = box_sum(coef_u, window) + 2 * un * box_sum(d_var_u, window) + e * box_sum(d_cross, window)
    grad_u = grad_un * scale
    grad_p = -grad_u * (torch.log(q + EPS_LOG_U) + q / (q + EPS_LOG_U))
    return grad_p.to(p.dtype)


def boundary_cc_loss(
    p1: torch.Tensor, p2: torch.Tensor, image: torch.Tensor, window: int = 5, gamma: float = 0.75
) -> torch.Tensor:
    """L_CC = (CC(U(p1), E) + CC(U(p2), E)) / 2 with E the edge map of `image`, computed in the
    maps' accumulation dtype."""
    edge = edge_map(image, gamma, size=p1.shape[2:], dtype=accumulation_dtype(p1.dtype))
    return (boundary_cc(p1, edge, window) + boundary_cc(p2, edge, window)) / 2


# ------------------------------------------------------------------------------------------------
# §6 the full loss (docs/contract.md)
# ------------------------------------------------------------------------------------------------
def bimi_loss(
    p1: torch.Tensor,
    p2: torch.Tensor,
    image: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    offsets: Union[Offsets, int, None] = None,
    alpha: float = 0.5,
    lamda: float = 1.0,
    mi_weight: float = 1.0,
    boundary_weight: float = 1.0,
    window: int = 5,
    gamma: float = 0.75,
    symmetric: bool = True,
    pool_offsets: bool = False,
    eps_convention: str = "add",
) -> torch.Tensor:
    """L = mi_weight * L_MI + boundary_weight * L_CC (docs/contract.md §6). `offsets` is an
    explicit tuple of tuples or an int radius (`bimi_kernels.offsets.make_offsets`); None:
    offset 0 alone."""
    if offsets is None:
        offsets = ((0,) * (p1.dim() - 2),)
    mi = regularized_mi(p1, p2, offsets, mask, alpha, lamda, symmetric, EPS_MI, pool_offsets, eps_convention)
    loss = mi_weight * mi
    if boundary_weight:
        loss = loss + boundary_weight * boundary_cc_loss(p1, p2, image, window, gamma)
    return loss
