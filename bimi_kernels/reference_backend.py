"""The `reference` backend: the kernels of `backends.py` implemented by `reference.py`.

Slow but always there, on any device. The backward kernels are the written-out formulas of
`reference.joint_counts_backward` and `reference.boundary_cc_backward` (docs/contract.md §3, §5).
"""
from __future__ import annotations

import torch

from . import reference
from .backends import Backend
from .offsets import unflatten


def _offsets(flat, p):
    return unflatten(flat, p.dim() - 2)


def joint_counts(p1, p2, offsets, mask):
    with torch.no_grad():
        return reference.joint_counts(p1, p2, _offsets(offsets, p1), mask)


def joint_counts_backward(grad_j, p1, p2, offsets, mask):
    with torch.no_grad():
        return reference.joint_counts_backward(grad_j, p1, p2, _offsets(offsets, p1), mask)


def boundary_cc(p, edge, window):
    with torch.no_grad():
        u = reference.uncertainty_map(p)  # once: for the CC and for the [min, max] it returns
        cc = reference.local_cross_correlation(reference.minmax_normalize(u), edge, window)
        flat = u.flatten(1)
        return cc, torch.stack([flat.min(dim=1).values, flat.max(dim=1).values], dim=1)


def boundary_cc_backward(grad_cc, p, edge, u_range, window):
    with torch.no_grad():  # the reference recomputes the min-max itself; u_range is for kernels
        return reference.boundary_cc_backward(grad_cc, p, edge, window)


BACKEND = Backend(
    name="reference",
    devices=frozenset({"cpu", "cuda", "meta", "mps", "xpu"}),
    joint_counts=joint_counts,
    joint_counts_backward=joint_counts_backward,
    boundary_cc=boundary_cc,
    boundary_cc_backward=boundary_cc_backward,
)
