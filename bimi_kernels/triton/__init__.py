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

# Decided once, at import, the same way triton.jit decides it for the kernels defined below us.
INTERPRETED: bool = bool(triton.knobs.runtime.interpret)

# Under the interpreter every program instance costs milliseconds of Python, so a few programs
# with big tiles; on a GPU, tiles that keep the K_PAD x BLOCK_P operands in registers.
INTERPRETER_BLOCK_P = 1024
INTERPRETER_MAX_PROGRAMS = 2

# Bound on the joint-counts forward's per-program partial sums (SPEC: little extra memory).
PARTIAL_BYTES_BUDGET = 1 << 20


def next_power_of_2(value: int) -> int:
    return 1 << max(0, int(value) - 1).bit_length()


def padded_k(k: int) -> int:
    """K rounded up to a power of two (tl.arange) and to at least 16 (tl.dot's minimum)."""
    return max(16, next_power_of_2(k))


def dot_precision(device: torch.device) -> str:
    """float32 tl.dot precision: 3xTF32 tensor cores on Ampere and newer (about float32
    accuracy, unlike plain TF32); plain float32 arithmetic under the interpreter and on
    older GPUs."""
    if INTERPRETED or device.type != "cuda":
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
        return max(1, min(n_tiles, INTERPRETER_MAX_PROGRAMS))
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


_offset_tables: dict = {}


def offset_table(
    flat_offsets: Sequence[int], ndim: int, dims: Tuple[int, int, int], device: torch.device,
    reverse: bool = False,
) -> torch.Tensor:
    """The offsets as an (|O|, 8) int64 table on `device`, one row per offset d (or -d when
    `reverse`): [flat index shift, z_lo, z_hi, y_lo, y_hi, x_lo, x_hi, 0], where a pixel with
    coordinate c in a dim has its partner c + d inside iff lo <= c < hi. Cached, so a training
    loop copies each table to the device once."""
    flat = tuple(int(v) for v in flat_offsets)
    key = (flat, ndim, tuple(dims), str(device), reverse)
    table = _offset_tables.get(key)
    if table is None:
        sign = -1 if reverse else 1
        depth, height, width = dims
        rows = []
        for i in range(0, len(flat), ndim):
            dz, dy, dx = ((0,) * (3 - ndim) + tuple(sign * v for v in flat[i : i + ndim]))
            row = [(dz * height + dy) * width + dx]
            for delta, size in ((dz, depth), (dy, height), (dx, width)):
                row += [max(0, -delta), size - max(0, delta)]
            rows.append(row + [0])
        table = torch.tensor(rows, dtype=torch.int64).reshape(-1, 8).to(device)
        _offset_tables[key] = table
    return table
