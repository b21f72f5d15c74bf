"""Fused Triton kernels of the BIMI loss: the `triton` backend (see `backend.py`).

On CUDA tensors the kernels are compiled by Triton. On CPU tensors they run only under Triton's
interpreter, which Triton picks when `TRITON_INTERPRET=1` is in the environment *before* triton is
imported; that is how CI tests them. This module holds the launch settings shared by `joint.py`
and `boundary.py`.
"""
from __future__ import annotations

import functools
from typing import Sequence, Tuple

import torch
import triton

from .tiles import next_power_of_2

# Decided once, at import, the same way triton.jit decides it for the kernels defined below us.
INTERPRETED: bool = bool(triton.knobs.runtime.interpret)

# Bound on the joint-counts forward's per-program partial sums (docs/contract.md §1: little
# extra memory).
PARTIAL_BYTES_BUDGET = 16 << 20


# Channels per block of a kernel's (K_PAD, pixels) operands: larger K is covered in blocks of this
# many (the launch tables end at K_PAD 128; beyond it, the joint counts' operands outgrow the shared
# memory, float64 at K_PAD 1024 asking 264 KB of sm_90's 227 KB a block, and the boundary term's
# spill kilobytes of registers).
CHANNEL_BLOCK = 128


def padded_k(k: int) -> int:
    """K rounded up to a power of two (tl.arange) and to at least 16 (tl.dot's minimum)."""
    return max(16, next_power_of_2(k))


def dot_precision(device: torch.device, dtype: torch.dtype) -> str:
    """tl.dot precision for operands of `dtype` (float32 after widening): 3xTF32 tensor cores
    for float32 on Ampere and newer (about float32 accuracy; plain TF32 truncates to 10 bits
    and misses the contract's 1e-5); exact arithmetic ("ieee") for float64 (DMMA), under the
    interpreter and on older GPUs. Half-precision operands are not affected by it."""
    if INTERPRETED or device.type != "cuda" or dtype == torch.float64:
        return "ieee"
    return "tf32x3" if torch.cuda.get_device_capability(device)[0] >= 8 else "ieee"


@functools.lru_cache(maxsize=None)
def _multiprocessor_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def multiprocessor_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _multiprocessor_count(index)


def grid_size(n_tiles: int, device: torch.device, programs_per_sm: int = 8) -> int:
    """Programs of a persistent launch that walks `n_tiles` tiles."""
    if INTERPRETED:
        return max(1, min(n_tiles, 2))
    return max(1, min(n_tiles, programs_per_sm * multiprocessor_count(device)))


def spatial_dims(shape: Sequence[int]) -> Tuple[int, int, int, int]:
    """(D, H, W, N) of a (B, K, *S) shape; a 2-D map is a 3-D one with D = 1."""
    spatial = tuple(int(v) for v in shape[2:])
    if len(spatial) == 2:
        spatial = (1,) + spatial
    if len(spatial) != 3:
        raise ValueError(f"expected 2 or 3 spatial dims, got shape {tuple(shape)}")
    d, h, w = spatial
    return d, h, w, d * h * w
