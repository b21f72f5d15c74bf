"""Input checks of SPEC §9: a wrong call raises ValueError/TypeError naming the argument.

Shape, dtype and device checks cost nothing and always run. Checks that read values (non-finite
numbers, negative probabilities) need a device sync, so they run only when asked for
(`validate=True`, or `BIMI_VALIDATE=1` when `validate` is None).
"""
from __future__ import annotations

import numbers
import os
from typing import Optional

import torch

from .numerics import FLOAT_DTYPES


def _check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")


def check_maps(p1, p2) -> None:
    """p1, p2: (B, K, H, W) or (B, K, D, H, W), same shape, dtype and device, K >= 2."""
    for name, t in (("p1", p1), ("p2", p2)):
        _check_tensor(name, t)
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"{name}: expected a float dtype (float16, bfloat16, float32 or float64), got {t.dtype}"
            )
        if t.dim() not in (4, 5):
            raise ValueError(
                f"{name}: expected shape (B, K, H, W) or (B, K, D, H, W), "
                f"got {tuple(t.shape)} with {t.dim()} dims"
            )
    if p1.shape != p2.shape:
        raise ValueError(f"p2: shape {tuple(p2.shape)} must equal the shape of p1, {tuple(p1.shape)}")
    if p1.dtype != p2.dtype:
        raise TypeError(f"p2: dtype {p2.dtype} must equal the dtype of p1, {p1.dtype}")
    if p1.device != p2.device:
        raise ValueError(f"p2: on device {p2.device}, but p1 is on {p1.device}; expected the same device")
    check_map(p1, "p1")


def check_map(p, name: str = "p") -> None:
    """One cluster map: float dtype, 4 or 5 dims, K >= 2, no empty dim."""
    _check_tensor(name, p)
    if p.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a float dtype (float16, bfloat16, float32 or float64), got {p.dtype}")
    if p.dim() not in (4, 5):
        raise ValueError(
            f"{name}: expected shape (B, K, H, W) or (B, K, D, H, W), got {tuple(p.shape)} with {p.dim()} dims"
        )
    if p.shape[1] < 2:
        raise ValueError(f"{name}: expected K >= 2 clusters in dim 1, got shape {tuple(p.shape)}")
    if p.numel() == 0:
        raise ValueError(f"{name}: has an empty dimension, shape {tuple(p.shape)}")


def check_image(image, p, name: str = "image") -> None:
    """image: (B, C, *S') with the maps' batch size and number of spatial dims, same device."""
    _check_tensor(name, image)
    if not image.is_floating_point():
        raise TypeError(f"{name}: expected a floating dtype, got {image.dtype}")
    if image.dim() != p.dim():
        raise ValueError(
            f"{name}: expected {p.dim()} dims (B, C, {'D, ' if p.dim() == 5 else ''}H, W) like the maps, "
            f"got shape {tuple(image.shape)}"
        )
    if image.shape[0] != p.shape[0]:
        raise ValueError(f"{name}: batch size {image.shape[0]} does not match the maps' batch size {p.shape[0]}")
    if image.device != p.device:
        raise ValueError(f"{name}: on device {image.device}, but the maps are on {p.device}")
    if image.numel() == 0:
        raise ValueError(f"{name}: has an empty dimension, shape {tuple(image.shape)}")


def normalize_mask(mask, p) -> Optional[torch.Tensor]:
    """mask (B, 1, *S) or (B, *S) -> a contiguous (B, *S) tensor of 0/1 in p's dtype, or None."""
    if mask is None:
        return None
    _check_tensor("mask", mask)
    if mask.is_complex():
        raise TypeError(f"mask: expected a bool, integer or float dtype, got {mask.dtype}")
    batch, spatial = p.shape[0], tuple(p.shape[2:])
    if tuple(mask.shape) not in ((batch, 1) + spatial, (batch,) + spatial):
        raise ValueError(
            f"mask: expected shape {(batch, 1) + spatial} or {(batch,) + spatial}, got {tuple(mask.shape)}"
        )
    if mask.device != p.device:
        raise ValueError(f"mask: on device {mask.device}, but the maps are on {p.device}")
    return mask.reshape((batch,) + spatial).to(p.dtype).contiguous()


def check_window(window) -> None:
    if isinstance(window, bool) or not isinstance(window, numbers.Integral):
        raise TypeError(f"window: expected an odd int >= 1, got {window!r}")
    if window < 1 or window % 2 == 0:
        raise ValueError(f"window: expected an odd int >= 1, got {window}")


def check_mi_weights(alpha, lamda) -> None:
    if not isinstance(alpha, numbers.Real) or not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha: expected a number in [0, 1], got {alpha!r}")
    if not isinstance(lamda, numbers.Real) or not float(lamda) > 0.0:
        raise ValueError(f"lamda: expected a number > 0, got {lamda!r}")


def check_gamma(gamma) -> None:
    if not isinstance(gamma, numbers.Real) or not float(gamma) > 0.0:
        raise ValueError(f"gamma: expected a number > 0, got {gamma!r}")


def check_loss_weights(mi_weight, boundary_weight) -> None:
    for name, w in (("mi_weight", mi_weight), ("boundary_weight", boundary_weight)):
        if not isinstance(w, numbers.Real) or not float(w) >= 0.0:
            raise ValueError(f"{name}: expected a number >= 0, got {w!r}")


def check_backend_name(backend) -> None:
    from .backends import BACKEND_NAMES

    if not isinstance(backend, str) or (backend != "auto" and backend not in BACKEND_NAMES):
        raise ValueError(f"backend: expected 'auto' or one of {BACKEND_NAMES}, got {backend!r}")


def should_validate(validate: Optional[bool]) -> bool:
    if validate is None:
        return os.environ.get("BIMI_VALIDATE", "0") not in ("", "0", "false", "False")
    return bool(validate)


def validate_values(maps: dict, others: Optional[dict] = None) -> None:
    """Value checks (each a device sync), naming the argument and what was found: non-finite
    entries in any tensor, negative probabilities in the cluster maps `maps` (name -> tensor)."""
    named = [(name, t, True) for name, t in maps.items()]
    named += [(name, t, False) for name, t in (others or {}).items()]
    for name, t, is_map in named:
        if t is None:
            continue
        t = t.detach()
        if t.is_floating_point():
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                raise ValueError(f"{name}: contains {bad} non-finite value(s) (nan or inf)")
        if is_map:
            negative = int((t < 0).sum())
            if negative:
                raise ValueError(
                    f"{name}: contains {negative} negative probability value(s) "
                    f"(min {float(t.min()):.3g}); expected softmax outputs"
                )
