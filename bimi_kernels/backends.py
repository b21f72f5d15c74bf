"""Which kernel backends exist, why one is missing, and how one is chosen.

A backend is a small object with four kernels (the contract every backend implements):

    joint_counts(p1, p2, offsets, mask) -> J
        p1, p2  : (B, K, *S) contiguous, float16/bfloat16/float32/float64, same device
        offsets : flat tuple of ints, |O| * n values (n = len(S)), offset o is
                  offsets[o*n:(o+1)*n] in spatial-dim order (D, H, W) or (H, W)
        mask    : None or (B, *S) contiguous, same dtype as p1, weights in [0, 1]
        J       : (|O|, K, K) in the accumulation dtype (float64 for float64 inputs,
                  float32 otherwise), J[o, i, j] = sum_{b,s: s+d inside} m[s] m[s+d] p1[b,i,s] p2[b,j,s+d]
    joint_counts_backward(grad_J, p1, p2, offsets, mask) -> (grad_p1, grad_p2)
        grad_J  : (|O|, K, K) in the accumulation dtype; grads in the dtype of p1
    boundary_cc(p, edge, window) -> (cc, u_range)
        p       : (B, K, *S); edge: (B, 1, *S) contiguous in the accumulation dtype
        cc      : 0-dim, accumulation dtype: CC(U(p), edge) of docs/contract.md §5 (<= 0)
        u_range : (B, 2) accumulation dtype, per-sample [min, max] of the raw uncertainty U
                  (saved for the backward so it need not re-reduce)
    boundary_cc_backward(grad_cc, p, edge, u_range, window) -> grad_p
        grad_cc : 0-dim accumulation dtype; grad_p in the dtype of p

and may add a fused fifth (None where it has none: then `reference.edge_map` computes it):

    edge_map(image, gamma) -> edge
        image   : (B, C, *S) contiguous, already at the maps' spatial size, any float dtype
        edge    : (B, 1, *S) in the accumulation dtype, `reference.edge_map(image, gamma)`

Kernels never modify their inputs, never synchronise with the host for values, and run with
autocast off (the ops switch it off around them).
`bimi_kernels.ops` is the only caller: its custom ops and its eager route (`ops.apply_*`) call
them through one implementation per op.
"""
from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .checks import stacklevel_outside_package


@dataclass
class Backend:
    """A set of kernels. The kernel functions follow the contract in this module's docstring."""

    name: str
    devices: frozenset
    joint_counts: Callable
    joint_counts_backward: Callable
    boundary_cc: Callable
    boundary_cc_backward: Callable
    # device_type -> None when usable there, else a human-readable reason
    unavailable_reason: Callable[[str], Optional[str]] = field(default=lambda device_type: None)
    # device_type -> None, or the error in a setting of this backend (an environment variable
    # naming a build the machine cannot run): a mistake to report, which `auto` never moves past
    # to a slower backend; it is also the backend's unavailable reason
    setting_error: Callable[[str], Optional[str]] = field(default=lambda device_type: None)
    # optional fused edge map (see the module docstring); None: the torch definition is used
    edge_map: Optional[Callable] = None


# Where each backend lives. Plain functions, so the import is lazy (triton, and the extensions,
# load only when a backend is first asked for) and a reader can follow each one to its module.
def _load_reference() -> Backend:
    from .reference_backend import BACKEND

    return BACKEND


def _load_cpp() -> Backend:
    from .native import CPP_BACKEND

    return CPP_BACKEND


def _load_triton() -> Backend:
    from .triton.backend import BACKEND

    return BACKEND


def _load_cuda() -> Backend:
    from .native import CUDA_BACKEND

    return CUDA_BACKEND


_LOADERS = {"reference": _load_reference, "cpp": _load_cpp, "triton": _load_triton, "cuda": _load_cuda}
BACKEND_NAMES = tuple(_LOADERS)  # registering a backend is one entry above (and its `auto` place below)

# `auto` tries these in order; the first available for the tensors' device wins. The last one,
# `reference`, is slow: reaching it where a native backend belongs warns once (see `resolve`).
AUTO_ORDER = {
    "cpu": ("cpp", "reference"),
    "cuda": ("triton", "cuda", "reference"),
}

_loaded: dict = {}
_load_errors: dict = {}


def _load(name: str) -> Optional[Backend]:
    """Import a backend once; remember why it failed so `available_backends` can say it."""
    if name in _loaded:
        return _loaded[name]
    if name in _load_errors:
        return None
    try:
        backend = _LOADERS[name]()
    except Exception as exc:  # an extension that was not built, triton missing, ...
        _load_errors[name] = f"{type(exc).__name__}: {exc}"
        return None
    _loaded[name] = backend
    return backend


def unavailable_reason(name: str, device_type: str) -> Optional[str]:
    """None when backend `name` can run on tensors of `device_type`, else why not."""
    if name not in _LOADERS:
        return f"unknown backend {name!r}; expected one of {BACKEND_NAMES} or 'auto'"
    backend = _load(name)
    if backend is None:
        return f"could not be loaded ({_load_errors[name]})"
    if device_type not in backend.devices:
        served = ", ".join(sorted(backend.devices))
        return f"runs on {served} tensors, not {device_type}"
    return backend.unavailable_reason(device_type) or backend.setting_error(device_type)


def _refuse_a_bad_setting(name: str, device_type: str) -> None:
    """Raise the ValueError of a backend whose own setting is wrong, rather than choose another."""
    backend = _load(name) if name in _LOADERS else None
    if backend is not None and device_type in backend.devices and backend.unavailable_reason(device_type) is None:
        error = backend.setting_error(device_type)
        if error is not None:
            raise ValueError(error)


def available_backends(device=None) -> dict:
    """Map each backend name to None (available) or the reason it is not, for a device.

    `device` defaults to "cuda" when a GPU is visible, else "cpu".
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device_type = torch.device(device).type
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device: {device!r} is not a torch device ({exc})") from None
    return {name: unavailable_reason(name, device_type) for name in BACKEND_NAMES}


def resolve(requested: str, device_type: str) -> str:
    """The backend name to use for `requested` ("auto" or a name) on tensors of `device_type`.

    `BIMI_BACKEND` overrides "auto". An explicit request that cannot be served raises; it never
    falls back silently. A backend whose own setting is wrong (`BIMI_CPU_ISA` naming a build this
    processor cannot run) is a ValueError, whether asked for or reached by "auto". The answer is
    cached per (request, device type, BIMI_BACKEND, BIMI_CPU_ISA): the ops call this on every
    launch.
    """
    return _resolve(requested, device_type, os.environ.get("BIMI_BACKEND", ""), os.environ.get("BIMI_CPU_ISA", ""))


@functools.lru_cache(maxsize=64)
def _resolve(requested: str, device_type: str, environment: str, cpu_isa_setting: str) -> str:
    # cpu_isa_setting: only part of the cache key (the cpp backend reads BIMI_CPU_ISA itself)
    source = ""
    if requested == "auto" and environment.strip():
        requested = environment.strip()
        source = " (from the environment variable BIMI_BACKEND, which overrides backend='auto')"
    _refuse_a_bad_setting(requested, device_type)
    if requested == "auto":
        order = AUTO_ORDER.get(device_type, ("reference",))
        for name in order:
            _refuse_a_bad_setting(name, device_type)
            if unavailable_reason(name, device_type) is None:
                if name == "reference" and len(order) > 1:
                    _warn_slow_fallback(device_type, order[:-1])
                return name
        return "reference"
    if requested not in _LOADERS:
        raise ValueError(
            f"backend: unknown backend {requested!r}{source}; expected 'auto' or one of {BACKEND_NAMES}"
        )
    reason = unavailable_reason(requested, device_type)
    if reason is not None:
        raise RuntimeError(
            f"backend {requested!r}{source} was requested for {device_type} tensors but is not "
            f"available: {reason}. See bimi_kernels.available_backends()."
        )
    return requested


def _warn_slow_fallback(device_type: str, native: tuple) -> None:
    """Once per device type (the caller is cached): auto is about to run the plain-PyTorch
    reference where a native backend belongs. Say why each native one is missing, and the fix."""
    reasons = "; ".join(f"{name}: {unavailable_reason(name, device_type)}" for name in native)
    warnings.warn(
        f"bimi_kernels: no native backend for {device_type} tensors, so backend='auto' runs the slow "
        f"'reference' backend (several times slower). Why: {reasons}. Fix: build the package against "
        f"your torch with `pip install --no-build-isolation .` (see the README's Install section), "
        f"or pass backend='reference' to choose it knowingly.",
        RuntimeWarning,
        stacklevel=stacklevel_outside_package(),
    )


def reset_cache() -> None:
    """Forget resolved choices (tests that change what is available call this)."""
    _resolve.cache_clear()


def get(name: str) -> Backend:
    """The loaded backend object for an already-resolved name."""
    backend = _load(name)
    if backend is None:
        raise RuntimeError(f"backend {name!r} could not be loaded: {_load_errors.get(name)}")
    return backend
