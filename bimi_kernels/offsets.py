"""Offset sets: a window radius (times a dilation) or an explicit list of displacements."""
from __future__ import annotations

import functools
import itertools
import numbers
from typing import Sequence, Tuple, Union

import torch

OffsetSpec = Union[int, Sequence[Sequence[int]]]
Offsets = Tuple[Tuple[int, ...], ...]


def canonical_offset_spec(offsets: OffsetSpec) -> OffsetSpec:
    """An int radius as it is, an explicit list as a tuple of int tuples (hashable, and safe from
    the caller's later edits); the checks that need no spatial dims are made here."""
    if isinstance(offsets, bool):
        raise TypeError(f"offsets: expected an int radius or a sequence of tuples, got {offsets!r}")
    if isinstance(offsets, torch.Tensor):  # its iteration would fail inside torch, not naming offsets
        raise TypeError(
            f"offsets: expected an int radius or a sequence of tuples of Python ints, got a tensor of shape "
            f"{tuple(offsets.shape)} (pass offsets.tolist())"
        )
    if isinstance(offsets, numbers.Integral):
        if offsets < 0:
            raise ValueError(f"offsets: a window radius must be >= 0, got {int(offsets)}")
        return int(offsets)
    if isinstance(offsets, (str, bytes)) or not hasattr(offsets, "__iter__"):
        raise TypeError(f"offsets: expected an int radius or a sequence of tuples, got {offsets!r}")
    result = []
    for d in offsets:
        if isinstance(d, numbers.Integral) or not hasattr(d, "__len__"):
            raise TypeError(f"offsets: each offset must be a tuple of ints, got {d!r}")
        if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in d):
            raise TypeError(f"offsets: offset {tuple(d)!r} must hold ints")
        result.append(tuple(int(v) for v in d))
    if not result:
        raise ValueError("offsets: the offset list is empty")
    return tuple(result)


def make_offsets(offsets: OffsetSpec, ndim: int, dilation: int = 1) -> Offsets:
    """The displacement set as a tuple of n-tuples (n = `ndim` spatial dims).

    An int `r >= 0` gives the full window {-r..r}^n times `dilation` in lexicographic order;
    `r = 0` is the zero displacement alone. A sequence gives exactly those displacements
    (`dilation` is not applied to an explicit list).
    """
    if ndim not in (2, 3):
        raise ValueError(f"offsets: expected 2 or 3 spatial dims, got {ndim}")
    if isinstance(dilation, bool) or not isinstance(dilation, numbers.Integral):
        raise TypeError(f"dilation: expected a Python int >= 1, got {dilation!r}")
    if dilation < 1:
        raise ValueError(f"dilation: expected an int >= 1, got {dilation!r}")
    spec = canonical_offset_spec(offsets)
    if isinstance(spec, int):
        steps = [k * int(dilation) for k in range(-spec, spec + 1)]
        return tuple(tuple(d) for d in itertools.product(steps, repeat=ndim))
    for d in spec:
        if len(d) != ndim:
            raise ValueError(
                f"offsets: offset {d!r} has {len(d)} components, expected {ndim} (one per spatial dim)"
            )
    return spec


def flat_offsets_for(spec: OffsetSpec, dilation: int, spatial: Tuple[int, ...]) -> Tuple[int, ...]:
    """The checked, flat offset list of a canonical spec (see `canonical_offset_spec`) for maps of
    spatial size `spatial`: made and checked once per (spec, dilation, size), since a training
    loop asks for the same one every step. (torch.compile traces the plain function: it runs
    once per compiled graph anyway; so do symbolic sizes, which cannot key a cache.)"""
    if torch.compiler.is_compiling() or not all(type(s) is int for s in spatial):
        return _flat_offsets(spec, dilation, spatial)
    return _cached_flat_offsets(spec, dilation, spatial)


def _flat_offsets(spec, dilation, spatial):
    offsets = make_offsets(spec, len(spatial), dilation)
    check_offsets_fit(offsets, spatial)
    return flatten(offsets)


_cached_flat_offsets = functools.lru_cache(maxsize=256)(_flat_offsets)


def check_offsets_fit(offsets: Offsets, spatial: Sequence[int]) -> None:
    """Every |d_k| must be smaller than the spatial size in dim k, else no pair is left to count."""
    for d in offsets:
        for k, (dk, size) in enumerate(zip(d, spatial)):
            if abs(dk) >= size:
                raise ValueError(
                    f"offsets: offset {d!r} is too large for spatial size {tuple(spatial)!r} "
                    f"(|{dk}| >= {size} in spatial dim {k}); no pixel pair would be left"
                )


def flatten(offsets: Offsets) -> Tuple[int, ...]:
    """The flat int list the kernels take: offset o is flat[o*n:(o+1)*n]."""
    return tuple(v for d in offsets for v in d)


def unflatten(flat: Sequence[int], ndim: int) -> Offsets:
    return tuple(tuple(int(v) for v in flat[i : i + ndim]) for i in range(0, len(flat), ndim))


def overlap_slices(d: Sequence[int], spatial: Sequence[int]):
    """Slices (first, second) over the spatial dims such that first-pixel s and second-pixel s+d
    are both inside: first = s-range, second = (s+d)-range. Used by the reference."""
    if len(d) != len(spatial):  # zip would drop (or never reach) a component
        raise ValueError(f"offsets: offset {tuple(d)!r} has {len(d)} components for {len(spatial)} spatial dims")
    first, second = [], []
    for dk, size in zip(d, spatial):
        first.append(slice(max(0, -dk), size - max(0, dk)))
        second.append(slice(max(0, dk), size - max(0, -dk)))
    return tuple(first), tuple(second)
