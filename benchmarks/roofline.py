"""The roofline: lower bounds on the bytes moved and the arithmetic of each op, and the peak rates
of the devices they are measured on.

    bound_s  = max(min_bytes / bandwidth, min_flops / flop_rate)
    fraction = bound_s / measured median time

Two fractions per GPU row: against the FP32 (CUDA-core) rate and against the tensor-core rate of
the maps' dtype (TF32 for float32 maps, BF16/FP16 for half maps), because whether a kernel may use
tensor cores depends on the error rule (docs/contract.md §8). For memory-bound rows both agree.

The bytes: every map read once per pass that needs it, every gradient written once, the
(|O|, K, K) counts written (forward) and their upstream gradient read (backward), the image read
once per pass of the boundary term; nothing recomputed, nothing spilled. The arithmetic: joint
counts 2 K^2 flops per valid pixel pair (pairs whose partner is inside the image, so sparse far
offsets count only their overlap) forward, 4 K^2 backward (two gradients); the boundary term per
pixel and map ~3K for the uncertainty (products, logs, sums), ~10 n for five separable box sums in
n dims and ~20 for the NCC, doubled backward. The boundary term's count is an operation count of a
fused algorithm rather than a strict bound; it is far below the bytes' bound anyway.
"""
from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import Dict, Optional, Tuple

import torch

from bimi_kernels.numerics import accumulation_dtype
from bimi_kernels.offsets import make_offsets

PASSES = {"forward": 1, "backward": 1, "forward+backward": 2}  # passes over the maps
FLOP_FACTOR = {"forward": 1, "backward": 2, "forward+backward": 3}  # backward = two gradients


@dataclass(frozen=True)
class DevicePeaks:
    match: str  # substring of torch.cuda.get_device_name(), first match wins
    bandwidth: float  # bytes/s
    fp32_flops: float  # flop/s, FP32 FMA on CUDA cores
    tensor_flops: Dict[str, float]  # flop/s of dense tensor-core math per maps dtype
    source: str


# Dense rates (no sparsity). The H200's bandwidth is the device-to-device copy rate measured on
# the H200 machines we ran on (about 4.3 TB/s, reads + writes; 4.8 TB/s on the datasheet), its BF16
# rate the measured 8192^3 product on random data (788 TFLOP/s; 989 on the datasheet); FP32 and
# TF32 are the datasheet's (67 and 989/2 TFLOP/s). The H100 rows are datasheet figures.
GPU_PEAKS = (
    DevicePeaks("H200", 4.3e12, 67e12, {"float32": 494.7e12, "bfloat16": 788e12, "float16": 788e12},
                "H200: 4.3 TB/s measured copy (4.8 datasheet), FP32 67, TF32 495, BF16 788 measured "
                "(989 datasheet) TFLOP/s"),
    DevicePeaks("H100 NVL", 3.9e12, 60e12, {"float32": 417.5e12, "bfloat16": 835.5e12, "float16": 835.5e12},
                "H100 NVL datasheet: 3.9 TB/s, FP32 60, TF32 418, BF16 836 TFLOP/s"),
    DevicePeaks("H100 PCIe", 2.0e12, 51.2e12, {"float32": 378e12, "bfloat16": 756.5e12, "float16": 756.5e12},
                "H100 PCIe datasheet: 2.0 TB/s, FP32 51, TF32 378, BF16 757 TFLOP/s"),
    DevicePeaks("H100", 3.35e12, 67e12, {"float32": 494.7e12, "bfloat16": 989.5e12, "float16": 989.5e12},
                "H100 SXM5 datasheet: 3.35 TB/s, FP32 67, TF32 495, BF16 990 TFLOP/s"),
)


def device_peaks(device_type: str, device_name: str) -> Optional[DevicePeaks]:
    """The recorded peaks of a GPU, or None (CPUs: rates are reported, no fraction)."""
    if device_type != "cuda":
        return None
    for peaks in GPU_PEAKS:
        if peaks.match.lower() in device_name.lower():
            return peaks
    return None


# ------------------------------------------------------------------------------------------------
# sizes of a config
# ------------------------------------------------------------------------------------------------
def offset_set(config) -> Tuple[Tuple[int, ...], ...]:
    return make_offsets(config.offsets, len(config.spatial), config.dilation)


def pixels(config) -> int:
    """Pixels of one map over every head: heads x B x prod(S)."""
    return config.heads * config.batch * prod(config.spatial)


def valid_pairs(config) -> int:
    """Pixel pairs (s, s + d) with both inside the image, summed over offsets d and heads."""
    per_map = sum(prod(max(size - abs(dk), 0) for dk, size in zip(d, config.spatial))
                  for d in offset_set(config))
    return config.heads * config.batch * per_map


def map_bytes(config) -> int:
    """One (heads x B, K, *S) map in the maps' dtype."""
    return pixels(config) * config.clusters * getattr(torch, config.dtype).itemsize


def _accumulation_bytes(config) -> int:
    return accumulation_dtype(getattr(torch, config.dtype)).itemsize


# ------------------------------------------------------------------------------------------------
# the lower bounds
# ------------------------------------------------------------------------------------------------
def _map_traffic(config, mode: str) -> int:
    """Forward reads p1 and p2; backward reads them and writes dL/dp1 and dL/dp2."""
    moved = {"forward": 2, "backward": 4, "forward+backward": 6}[mode]
    return moved * map_bytes(config)


def counts_bytes_flops(config, mode: str) -> Tuple[int, int]:
    counts = config.heads * len(offset_set(config)) * config.clusters ** 2 * _accumulation_bytes(config)
    bytes_moved = _map_traffic(config, mode) + PASSES[mode] * counts
    return bytes_moved, 2 * config.clusters ** 2 * valid_pairs(config) * FLOP_FACTOR[mode]


def boundary_bytes_flops(config, mode: str, include_maps: bool = True) -> Tuple[int, int]:
    image = config.batch * prod(config.spatial) * getattr(torch, config.dtype).itemsize
    bytes_moved = (_map_traffic(config, mode) if include_maps else 0) + PASSES[mode] * image
    per_pixel = 3 * config.clusters + 10 * len(config.spatial) + 20
    return bytes_moved, 2 * pixels(config) * per_pixel * FLOP_FACTOR[mode]


def bimi_bytes_flops(config, mode: str) -> Tuple[int, int]:
    """The whole loss: the maps are read once for both terms."""
    counts = counts_bytes_flops(config, mode)
    boundary = boundary_bytes_flops(config, mode, include_maps=False)
    return counts[0] + boundary[0], counts[1] + boundary[1]


@dataclass(frozen=True)
class Roofline:
    min_bytes: int
    min_flops: int
    bound_s: Optional[float] = None  # against bandwidth and the FP32 rate
    fraction: Optional[float] = None
    bound_tensor_s: Optional[float] = None  # against bandwidth and the tensor-core rate
    fraction_tensor: Optional[float] = None


def roofline(bounds: Tuple[int, int], config, seconds: float, peaks: Optional[DevicePeaks]) -> Roofline:
    """The roofline of one measured call from its (min bytes, min flops)."""
    nbytes, flops = bounds
    if peaks is None:
        return Roofline(nbytes, flops)
    bound = max(nbytes / peaks.bandwidth, flops / peaks.fp32_flops)
    tensor_rate = peaks.tensor_flops.get(config.dtype, peaks.fp32_flops)
    bound_tensor = max(nbytes / peaks.bandwidth, flops / tensor_rate)
    return Roofline(nbytes, flops, bound, bound / seconds, bound_tensor, bound_tensor / seconds)
