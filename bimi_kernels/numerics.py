"""Numerics constants and dtype rules of the loss, defined once (docs/contract.md §8).

Every Python module (reference, ops, the Triton kernels' launchers) takes these from here; the C++
and CUDA kernels take the same values from csrc/common (one header).
"""
from __future__ import annotations

import sys

import torch

EPS_MI = 1e-5  # added inside the logs of the regularised MI (§4)
EPS_CC = 1e-5  # lower clamp of the NCC cross term and of both variances (§5)
EPS_LOG_U = 1e-16  # added inside the log of the uncertainty map (§5)
EPS_MINMAX = 1e-6  # added to the denominator of every per-sample min-max normalisation (§5)
# IIC's convention (Ji et al.): P, r and c clamped from below at the double machine epsilon
EPS_IIC_CLAMP = sys.float_info.epsilon

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for everything else (float16, bfloat16, float32)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
