"""The BIMI loss composed from the custom ops. Shapes: maps (B, K, H, W) or (B, K, D, H, W).

Each function checks its arguments (SPEC §9) before any kernel runs, calls `ops` for the parts
that touch every pixel, and does the small (|O|, K, K) epilogue in torch with the one definition
of that math in `reference`. `backend` is "auto" (fastest available for the tensors' device,
overridden by BIMI_BACKEND) or one of "reference", "cpp", "triton", "cuda".

Example::

    >>> import torch, bimi_kernels.functional as BF
    >>> p1 = torch.randn(2, 10, 64, 64).softmax(1); p2 = torch.randn(2, 10, 64, 64).softmax(1)
    >>> image = torch.rand(2, 1, 64, 64)
    >>> loss = BF.bimi_loss(p1, p2, image, offsets=1)   # 3x3 neighbourhood
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import checks, ops, reference
from .offsets import OffsetSpec, check_offsets_fit, flatten, make_offsets
from .numerics import accumulation_dtype

# The building blocks without a kernel of their own are the reference's, re-exported here so
# there is one definition of each piece of math.
joint_distributions = reference.joint_distributions
uncertainty_map = reference.uncertainty_map
local_cross_correlation = reference.local_cross_correlation


def edge_map(image: torch.Tensor, gamma: float = 0.75, size: Optional[Sequence[int]] = None):
    """Edge map of `image` (B, C, *S) -> (B, 1, *S) (SPEC §5), resized to `size` if given."""
    checks.check_gamma(gamma)
    return reference.edge_map(image, gamma, size)


def _prepare_pair(p1, p2, offsets, dilation, mask, validate):
    checks.check_maps(p1, p2)
    offset_set = make_offsets(offsets, p1.dim() - 2, dilation)
    check_offsets_fit(offset_set, p1.shape[2:])
    flat_mask = checks.normalize_mask(mask, p1)
    if checks.should_validate(validate):
        checks.validate_values({"p1": p1, "p2": p2}, {"mask": mask})
    return list(flatten(offset_set)), flat_mask


def joint_counts(
    p1: torch.Tensor,
    p2: torch.Tensor,
    offsets: OffsetSpec = 0,
    dilation: int = 1,
    mask: Optional[torch.Tensor] = None,
    backend: str = "auto",
    validate: Optional[bool] = None,
) -> torch.Tensor:
    """Joint counts J (|O|, K, K) of SPEC §3, in float32 (float64 for float64 maps).

    `offsets`: a window radius r (the set {-r..r}^n times `dilation`) or a list of n-tuples.
    `mask`: (B, 1, *S) or (B, *S), 1 where a pixel is valid; a pair counts when both are.
    """
    checks.check_backend_name(backend)
    flat_offsets, flat_mask = _prepare_pair(p1, p2, offsets, dilation, mask, validate)
    return ops.joint_counts(p1, p2, flat_offsets, flat_mask, backend)


def _sync(j, sync, process_group):
    if not sync:
        return j
    from .distributed import sync_joint_counts

    return sync_joint_counts(j, process_group)


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
    eps: float = reference.EPS_MI,
) -> torch.Tensor:
    """The regularised mutual information L_MI of SPEC §4 (a 0-dim tensor).

    `sync=True` all-reduces the joint counts over `process_group` (default: the default group)
    before normalising, so the MI is that of the global batch (see `bimi_kernels.distributed`).
    """
    checks.check_mi_weights(alpha, lamda)
    j = joint_counts(p1, p2, offsets, dilation, mask, backend, validate)
    return reference.regularized_mi_from_counts(_sync(j, sync, process_group), alpha, lamda, symmetric, eps)


def boundary_cc(p: torch.Tensor, edge: torch.Tensor, window: int = 5, backend: str = "auto") -> torch.Tensor:
    """CC(U(p), edge) of SPEC §5 for one cluster map and a precomputed edge map (B, 1, *S)."""
    checks.check_map(p, "p")
    checks.check_window(window)
    checks.check_backend_name(backend)
    if not isinstance(edge, torch.Tensor) or tuple(edge.shape) != (p.shape[0], 1) + tuple(p.shape[2:]):
        got = tuple(edge.shape) if isinstance(edge, torch.Tensor) else type(edge).__name__
        raise ValueError(f"edge: expected shape {(p.shape[0], 1) + tuple(p.shape[2:])}, got {got}")
    if edge.device != p.device:
        raise ValueError(f"edge: on device {edge.device}, but p is on {p.device}")
    edge = edge.detach().to(accumulation_dtype(p.dtype)).contiguous()
    return ops.boundary_cc(p, edge, int(window), backend)[0]


def boundary_cc_loss(
    p1: torch.Tensor,
    p2: torch.Tensor,
    image: torch.Tensor,
    window: int = 5,
    gamma: float = 0.75,
    backend: str = "auto",
    validate: Optional[bool] = None,
) -> torch.Tensor:
    """L_CC = (CC(U(p1), E) + CC(U(p2), E)) / 2 with E = edge_map(image) (SPEC §5)."""
    checks.check_maps(p1, p2)
    checks.check_window(window)
    checks.check_gamma(gamma)
    checks.check_backend_name(backend)
    if image is None:
        raise ValueError("image: required for the boundary term (boundary_weight > 0)")
    checks.check_image(image, p1)
    if checks.should_validate(validate):
        checks.validate_values({"p1": p1, "p2": p2}, {"image": image})
    return _boundary_term(p1, p2, image, window, gamma, backend)


def _boundary_term(p1, p2, image, window, gamma, backend):
    """(CC(U(p1), E) + CC(U(p2), E)) / 2 on checked arguments: one edge map, two kernel calls."""
    edge = ops.edge_map(reference.resized_image(image, p1.shape[2:]), float(gamma), backend)
    edge = edge.to(accumulation_dtype(p1.dtype)).contiguous()
    cc1 = ops.boundary_cc(p1, edge, int(window), backend)[0]
    cc2 = ops.boundary_cc(p2, edge, int(window), backend)[0]
    return (cc1 + cc2) / 2


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
) -> torch.Tensor:
    """L = mi_weight * L_MI + boundary_weight * L_CC (SPEC §6), a 0-dim float32 tensor
    (float64 for float64 maps). `image` (B, C, *S') is required when boundary_weight > 0."""
    checks.check_maps(p1, p2)
    checks.check_mi_weights(alpha, lamda)
    checks.check_loss_weights(mi_weight, boundary_weight)
    checks.check_window(window)
    checks.check_gamma(gamma)
    checks.check_backend_name(backend)
    if boundary_weight > 0:
        if image is None:
            raise ValueError("image: required when boundary_weight > 0 (pass boundary_weight=0 to omit the boundary term)")
        checks.check_image(image, p1)
    flat_offsets, flat_mask = _prepare_pair(p1, p2, offsets, dilation, mask, validate)
    if checks.should_validate(validate) and boundary_weight > 0:
        checks.validate_values({}, {"image": image})

    loss = p1.new_zeros((), dtype=accumulation_dtype(p1.dtype))
    if mi_weight > 0:
        j = _sync(ops.joint_counts(p1, p2, flat_offsets, flat_mask, backend), sync, process_group)
        loss = loss + mi_weight * reference.regularized_mi_from_counts(j, alpha, lamda, symmetric)
    if boundary_weight > 0:
        loss = loss + boundary_weight * _boundary_term(p1, p2, image, window, gamma, backend)
    return loss
