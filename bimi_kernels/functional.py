"""The BIMI loss composed from the ops (`ops.apply_*`). Shapes: maps (B, K, H, W) or (B, K, D, H, W).

Each public function gathers its settings into one `LossConfig` (checked when made), checks the
tensors once (docs/contract.md §9), calls `ops` for the parts that touch every pixel, and does
the small (|O|, K, K) epilogue in torch with the one definition of that math in `reference`.
`backend` is "auto" (fastest available for the tensors' device, overridden by BIMI_BACKEND) or
one of "reference", "cpp", "triton", "cuda". The modules in `losses.py` hold a config and call the
`*_from_config` functions directly.

Example::

    >>> import torch, bimi_kernels.functional as BF
    >>> p1 = torch.randn(2, 10, 64, 64).softmax(1); p2 = torch.randn(2, 10, 64, 64).softmax(1)
    >>> image = torch.rand(2, 1, 64, 64)
    >>> loss = BF.bimi_loss(p1, p2, image, offsets=1)   # 3x3 neighbourhood
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from . import checks, ops, reference
from .config import LossConfig
from .numerics import EPS_CC, EPS_MI, accumulation_dtype
from .offsets import OffsetSpec, flat_offsets_for

# The building blocks without a kernel of their own are the reference's, called here with the
# arguments checked, so there is one definition of each piece of math, and with autocast off, so
# that they compute in their accumulation dtype as the ops do (docs/contract.md §8).
def joint_distributions(j: torch.Tensor, symmetric: bool = True):
    """`reference.joint_distributions` (docs/contract.md §4): joint counts J (|O|, K, K) -> (P,
    valid), each offset's counts normalised (and symmetrised if asked), P in J's accumulation
    dtype; valid (|O|,) is False where an offset had no pair."""
    checks.check_tensor("j", j)
    checks.check_bool("symmetric", symmetric)
    if not j.is_floating_point():
        raise TypeError(f"j: expected a floating dtype, got {j.dtype}")
    if j.dim() != 3 or j.shape[1] != j.shape[2] or j.numel() == 0:
        raise ValueError(f"j: expected joint counts of shape (|O|, K, K), got {tuple(j.shape)}")
    with ops.autocast_off(j.device.type):
        return reference.joint_distributions(j.to(accumulation_dtype(j.dtype)), symmetric)


def uncertainty_map(p: torch.Tensor) -> torch.Tensor:
    """`reference.uncertainty_map` (docs/contract.md §5): U = -sum_k p_k log(p_k + 1e-16),
    (B, K, *S) -> (B, 1, *S) in the accumulation dtype, for a cluster map checked like the loss's."""
    checks.check_map(p, "p")
    with ops.autocast_off(p.device.type):
        return reference.uncertainty_map(p)


def local_cross_correlation(u: torch.Tensor, e: torch.Tensor, window: int = 5, eps: float = EPS_CC) -> torch.Tensor:
    """`reference.local_cross_correlation` (docs/contract.md §5) of two maps of one shape
    (B, C, *S), usually (B, 1, *S), with the window checked (an even window has no centre),
    computed in the accumulation dtype of the two maps' common dtype."""
    checks.check_window(window)
    checks.check_number("eps", eps, above=0.0)
    eps = float(eps)  # a Fraction or numpy number passes the check; torch takes a float
    for name, t in (("u", u), ("e", e)):
        checks.check_float_tensor(name, t)
    if u.shape != e.shape or u.dim() not in (4, 5):
        raise ValueError(f"u, e: expected two tensors of one shape (B, C, *S), got {tuple(u.shape)} and {tuple(e.shape)}")
    acc = accumulation_dtype(torch.promote_types(u.dtype, e.dtype))
    with ops.autocast_off(u.device.type):
        return reference.local_cross_correlation(u.to(acc), e.to(acc), window, eps)

__all__ = [
    "joint_counts", "joint_distributions", "regularized_mi", "edge_map", "uncertainty_map",
    "local_cross_correlation", "boundary_cc", "boundary_cc_loss", "bimi_loss",
    "bimi_loss_from_config", "regularized_mi_from_config", "boundary_cc_loss_from_config",
]


# ------------------------------------------------------------------------------------------------
# checks, once per call
# ------------------------------------------------------------------------------------------------
def _check_pair(p1, p2, mask, config: LossConfig, image=None) -> Tuple[List[int], Optional[torch.Tensor]]:
    """Every tensor check of one loss call (the settings were checked when `config` was made).
    Returns the flat offsets and the mask as (B, *S) in the maps' dtype."""
    checks.check_maps(p1, p2)
    flat_offsets = list(flat_offsets_for(config.offsets, config.dilation, tuple(p1.shape[2:])))
    flat_mask = checks.normalize_mask(mask, p1)
    if image is not None:
        checks.check_image(image, p1)
    _check_values(config, {"p1": p1, "p2": p2}, image, mask)
    return flat_offsets, flat_mask


def _dense(p1, p2):
    """The maps in the contiguous layout the kernels read, made once per call: every op would
    otherwise copy a map that is not (channels_last, a slice, an expanded view) again, forward
    and backward, up to four copies of each map per training step instead of one."""
    d1 = p1.contiguous()
    return d1, (d1 if p2 is p1 else p2.contiguous())


def _check_values(config: LossConfig, maps: dict, image=None, mask=None) -> None:
    mode = checks.validation_mode(config.validate)
    if mode == "full":
        checks.validate_values(maps, {"image": image}, mask)
    elif mode == "sampled":
        checks.check_probabilities_sampled(maps, mask)


# ------------------------------------------------------------------------------------------------
# the terms, on checked inputs
# ------------------------------------------------------------------------------------------------
def _mi_term(p1, p2, flat_offsets, flat_mask, config: LossConfig, eps: float = EPS_MI):
    counts = ops.apply_joint_counts(p1, p2, flat_offsets, flat_mask, config.backend)
    if config.sync:
        from .distributed import sync_joint_counts

        counts = sync_joint_counts(counts, config.process_group)
    return reference.regularized_mi_from_counts(
        counts, config.alpha, config.lamda, config.symmetric, eps, config.pool_offsets, config.eps_convention
    )


def _edge(image, size, dtype, gamma, backend):
    """The edge map through `ops.apply_edge_map` (the loss's own route), from the image resized to `size` in `dtype`."""
    return ops.apply_edge_map(reference.resized_image(image, size, dtype), float(gamma), backend)


def _boundary_term(p1, p2, image, config: LossConfig):
    """(CC(U(p1), E) + CC(U(p2), E)) / 2: one edge map (in the maps' accumulation dtype), two
    kernel calls."""
    acc = accumulation_dtype(p1.dtype)
    edge = _edge(image, p1.shape[2:], acc, config.gamma, config.backend)
    cc1 = ops.apply_boundary_cc(p1, edge, int(config.window), config.backend)[0]
    cc2 = ops.apply_boundary_cc(p2, edge, int(config.window), config.backend)[0]
    return (cc1 + cc2) / 2


# ------------------------------------------------------------------------------------------------
# from a config: what the modules call
# ------------------------------------------------------------------------------------------------
def bimi_loss_from_config(p1, p2, image, mask, config: LossConfig) -> torch.Tensor:
    """L = mi_weight * L_MI + boundary_weight * L_CC (docs/contract.md §6) with the settings of
    `config`."""
    need_image = config.boundary_weight > 0
    if need_image and image is None:
        raise ValueError("image: required when boundary_weight > 0 (pass boundary_weight=0 to omit the boundary term)")
    flat_offsets, flat_mask = _check_pair(p1, p2, mask, config, image if need_image else None)
    if image is not None and not need_image:
        checks.check_image(image, p1)  # unused, but a wrong tensor is still a mistake to report
    if config.mi_weight > 0 or need_image:  # no kernel reads the maps when both terms are off
        p1, p2 = _dense(p1, p2)
    with ops.autocast_off(p1.device.type):
        loss = p1.new_zeros((), dtype=accumulation_dtype(p1.dtype))
        if config.mi_weight > 0:
            loss = loss + config.mi_weight * _mi_term(p1, p2, flat_offsets, flat_mask, config)
        if need_image:
            loss = loss + config.boundary_weight * _boundary_term(p1, p2, image, config)
        elif config.mi_weight == 0:
            # both terms off: an exact 0 that still joins the maps' graph, so that backward()
            # works and gives zero gradients (where(), not 0 * sum: a nan in a map stays out)
            joined = (p1.sum() + p2.sum()).to(loss.dtype)
            loss = torch.where(torch.zeros((), dtype=torch.bool, device=loss.device), joined, loss)
    return loss


def regularized_mi_from_config(p1, p2, mask, config: LossConfig, eps: float = EPS_MI) -> torch.Tensor:
    """L_MI (docs/contract.md §4) with the settings of `config`."""
    flat_offsets, flat_mask = _check_pair(p1, p2, mask, config)
    p1, p2 = _dense(p1, p2)
    with ops.autocast_off(p1.device.type):
        return _mi_term(p1, p2, flat_offsets, flat_mask, config, eps)


def boundary_cc_loss_from_config(p1, p2, image, config: LossConfig) -> torch.Tensor:
    """L_CC (docs/contract.md §5) with the settings of `config`."""
    if image is None:
        raise ValueError("image: required for the boundary term (boundary_weight > 0)")
    checks.check_maps(p1, p2)
    checks.check_image(image, p1)
    _check_values(config, {"p1": p1, "p2": p2}, image)
    p1, p2 = _dense(p1, p2)
    with ops.autocast_off(p1.device.type):
        return _boundary_term(p1, p2, image, config)


# ------------------------------------------------------------------------------------------------
# the public functions (each builds its LossConfig from its arguments by name: torch.compile traces
# that on every supported torch, where `LossConfig.of(locals())` does not trace before torch 2.13)
# ------------------------------------------------------------------------------------------------
def joint_counts(
    p1: torch.Tensor,
    p2: torch.Tensor,
    offsets: OffsetSpec = 0,
    dilation: int = 1,
    mask: Optional[torch.Tensor] = None,
    backend: str = "auto",
    validate: Optional[bool] = None,
) -> torch.Tensor:
    """Joint counts J (|O|, K, K) of docs/contract.md §3, in float32 (float64 for float64 maps).

    `offsets`: a window radius r (the set {-r..r}^n times `dilation`) or a list of n-tuples.
    `mask`: (B, 1, *S) or (B, *S), weights in [0, 1] (1: valid); a pair counts with the product
    of its two weights.
    """
    config = LossConfig(offsets=offsets, dilation=dilation, backend=backend, validate=validate)
    flat_offsets, flat_mask = _check_pair(p1, p2, mask, config)
    return ops.apply_joint_counts(*_dense(p1, p2), flat_offsets, flat_mask, backend)


def regularized_mi(
    p1: torch.Tensor,
    p2: torch.Tensor,
    offsets: OffsetSpec = 0,
    dilation: int = 1,
    alpha: float = 0.5,
    lamda: float = 1.0,
    symmetric: bool = True,
    mask: Optional[torch.Tensor] = None,
    backend: str = "auto",
    validate: Optional[bool] = None,
    sync: bool = False,
    process_group=None,
    eps: float = EPS_MI,
    pool_offsets: bool = False,
    eps_convention: str = "add",
) -> torch.Tensor:
    """The regularised mutual information L_MI of docs/contract.md §4 (a 0-dim tensor).

    `pool_offsets=True` sums the counts over the offsets before one MI (IIC's collapsed loss);
    `eps_convention="clamp"` uses IIC's clamp instead of adding `eps` inside the logs.
    `sync=True` all-reduces the joint counts over `process_group` (default: the default group)
    before normalising, so the MI is that of the global batch (see `bimi_kernels.distributed`).
    """
    config = LossConfig(
        offsets=offsets, dilation=dilation, alpha=alpha, lamda=lamda, boundary_weight=0.0,
        symmetric=symmetric, backend=backend, validate=validate, sync=sync,
        process_group=process_group, pool_offsets=pool_offsets, eps_convention=eps_convention,
    )
    checks.check_number("eps", eps, above=0.0)
    return regularized_mi_from_config(p1, p2, mask, config, float(eps))


def edge_map(
    image: torch.Tensor,
    gamma: float = 0.75,
    size: Optional[Sequence[int]] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Edge map of `image` (B, C, *S) -> (B, 1, *S) (docs/contract.md §5) in the image's
    accumulation dtype, resized to `size` first if given; the same op the loss uses."""
    checks.check_tensor("image", image)
    if not image.is_floating_point():
        raise TypeError(f"image: expected a floating dtype, got {image.dtype}")
    if image.dim() not in (4, 5) or image.numel() == 0:
        raise ValueError(f"image: expected shape (B, C, H, W) or (B, C, D, H, W), got {tuple(image.shape)}")
    if size is not None:
        size = checks.check_size(size, image.dim() - 2)
    config = LossConfig(gamma=gamma, backend=backend)
    with ops.autocast_off(image.device.type):
        return _edge(image, size, accumulation_dtype(image.dtype), config.gamma, config.backend)


def boundary_cc(p: torch.Tensor, edge: torch.Tensor, window: int = 5, backend: str = "auto",
                validate: Optional[bool] = None) -> torch.Tensor:
    """CC(U(p), edge) of docs/contract.md §5 for one cluster map and a precomputed edge map
    (B, 1, *S). `validate` as for the loss: by default a sampled check of p on CPU tensors."""
    checks.check_map(p, "p")
    config = LossConfig(window=window, backend=backend, validate=validate)
    checks.check_float_tensor("edge", edge)  # an integer, bool or complex edge map is a mistake
    if tuple(edge.shape) != (p.shape[0], 1) + tuple(p.shape[2:]):
        raise ValueError(f"edge: expected shape {(p.shape[0], 1) + tuple(p.shape[2:])}, got {tuple(edge.shape)}")
    if edge.device != p.device:
        raise ValueError(f"edge: on device {edge.device}, but p is on {p.device}")
    _check_values(config, {"p": p})
    edge = edge.detach().to(accumulation_dtype(p.dtype)).contiguous()
    with ops.autocast_off(p.device.type):
        return ops.apply_boundary_cc(p.contiguous(), edge, int(config.window), backend)[0]  # one copy, not two


def boundary_cc_loss(
    p1: torch.Tensor,
    p2: torch.Tensor,
    image: torch.Tensor,
    window: int = 5,
    gamma: float = 0.75,
    backend: str = "auto",
    validate: Optional[bool] = None,
) -> torch.Tensor:
    """L_CC = (CC(U(p1), E) + CC(U(p2), E)) / 2 with E = edge_map(image) (docs/contract.md §5)."""
    config = LossConfig(mi_weight=0.0, window=window, gamma=gamma, backend=backend, validate=validate)
    return boundary_cc_loss_from_config(p1, p2, image, config)


def bimi_loss(
    p1: torch.Tensor,
    p2: torch.Tensor,
    image: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    offsets: OffsetSpec = 0,
    dilation: int = 1,
    alpha: float = 0.5,
    lamda: float = 1.0,
    mi_weight: float = 1.0,
    boundary_weight: float = 1.0,
    window: int = 5,
    gamma: float = 0.75,
    symmetric: bool = True,
    backend: str = "auto",
    validate: Optional[bool] = None,
    sync: bool = False,
    process_group=None,
    pool_offsets: bool = False,
    eps_convention: str = "add",
) -> torch.Tensor:
    """L = mi_weight * L_MI + boundary_weight * L_CC (docs/contract.md §6), a 0-dim float32
    tensor (float64 for float64 maps). `image` (B, C, *S') is required when boundary_weight > 0."""
    config = LossConfig(
        offsets=offsets, dilation=dilation, alpha=alpha, lamda=lamda, mi_weight=mi_weight,
        boundary_weight=boundary_weight, window=window, gamma=gamma, symmetric=symmetric,
        backend=backend, validate=validate, sync=sync, process_group=process_group,
        pool_offsets=pool_offsets, eps_convention=eps_convention,
    )
    return bimi_loss_from_config(p1, p2, image, mask, config)
