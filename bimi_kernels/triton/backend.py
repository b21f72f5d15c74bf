"""The `triton` backend: the four kernels of the contract in `bimi_kernels/backends.py`.

CUDA tensors: compiled Triton kernels. CPU tensors: the same kernels under Triton's interpreter,
only when TRITON_INTERPRET=1 was set before triton was imported (slow; meant for tests).
scripts/triton_compile_check.py compiles them for a GPU without one.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Optional

import torch

from ..backends import Backend
from . import INTERPRETED, boundary, joint


def _on_device_of(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensors' device."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


# The launchers take any batch and channel strides and copy only maps whose pixels are not
# laid out densely, so no `.contiguous()` here.
def joint_counts(p1, p2, offsets, mask):
    with torch.no_grad(), _on_device_of(p1):
        return joint.joint_counts(p1, p2, offsets, mask)


def joint_counts_backward(grad_j, p1, p2, offsets, mask):
    with torch.no_grad(), _on_device_of(p1):
        return joint.joint_counts_backward(grad_j, p1, p2, offsets, mask)


def boundary_cc(p, edge, window):
    with torch.no_grad(), _on_device_of(p):
        return boundary.boundary_cc(p, edge, window)


def boundary_cc_backward(grad_cc, p, edge, u_range, window):
    with torch.no_grad(), _on_device_of(p):
        return boundary.boundary_cc_backward(grad_cc, p, edge, u_range, window)


def edge_map(image, gamma):
    with torch.no_grad(), _on_device_of(image):
        return boundary.edge_map(image, gamma)


@functools.lru_cache(maxsize=None)
def _gpu_reason() -> Optional[str]:
    if not torch.cuda.is_available():
        return "no CUDA device is visible (torch.cuda.is_available() is False)"
    if INTERPRETED:
        return None  # the interpreter runs anywhere, slowly
    try:
        import triton

        target = triton.runtime.driver.active.get_current_target()
    except Exception as exc:  # no driver, broken install, ...
        return f"triton cannot reach the GPU ({type(exc).__name__}: {exc})"
    if target.backend != "cuda":
        return f"triton targets {target.backend!r}; these kernels are written for NVIDIA CUDA GPUs"
    return None


def unavailable_reason(device_type: str) -> Optional[str]:
    if device_type == "cpu":
        if INTERPRETED:
            return None
        return (
            "Triton compiles for GPUs; on CPU tensors it runs only under its interpreter, which "
            "needs TRITON_INTERPRET=1 in the environment before triton is first imported"
        )
    if device_type == "cuda":
        return _gpu_reason()
    return f"runs on cuda (and, under TRITON_INTERPRET=1, cpu) tensors, not {device_type}"


BACKEND = Backend(
    name="triton",
    devices=frozenset({"cuda", "cpu"}),
    joint_counts=joint_counts,
    joint_counts_backward=joint_counts_backward,
    boundary_cc=boundary_cc,
    boundary_cc_backward=boundary_cc_backward,
    unavailable_reason=unavailable_reason,
    edge_map=edge_map,
)
