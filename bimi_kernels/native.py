"""The `cpp` (CPU C++) and `cuda` (CUDA C++) backends: the kernels compiled from csrc/.

`bimi_kernels._C` registers the ops `torch.ops.bimi_C.*` with their CPU implementations;
`bimi_kernels._C_cuda` adds the CUDA implementations. Both backends call the same ops and the
dispatcher picks the implementation by the tensors' device. Importing this module never fails:
when an extension is missing, the backend's `unavailable_reason` says why and how to build it.
"""
from __future__ import annotations

import importlib
import platform
from typing import Optional

import torch

from .backends import Backend

_REBUILD = ("rebuild it against this torch from the source folder: `pip install --no-build-isolation .` "
            "(`--no-deps -e .` for a development install)")


def _import_error(module: str) -> Optional[str]:
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name == module:
            return f"{module} was not built; {_REBUILD}"
        return f"{module} could not be imported: {type(exc).__name__}: {exc}; {_REBUILD}"
    except Exception as exc:  # an undefined symbol: built against another torch
        return f"{module} was built but does not load: {type(exc).__name__}: {exc}; {_REBUILD}"
    return None


_CPU_ERROR = _import_error("bimi_kernels._C")
if _CPU_ERROR is None:
    _CUDA_ERROR = _import_error("bimi_kernels._C_cuda")
else:
    _CUDA_ERROR = f"needs bimi_kernels._C, which is missing ({_CPU_ERROR})"
if _CUDA_ERROR is not None and _CPU_ERROR is None and torch.version.cuda is None:
    _CUDA_ERROR = (
        f"torch {torch.__version__} is a CPU-only build, so bimi_kernels._C_cuda was not built; "
        f"install a CUDA build of torch, then {_REBUILD} (with CUDA_HOME set)"
    )


def _cpu_reason(device_type: str) -> Optional[str]:
    return _CPU_ERROR


def _cpu_isa_error(device_type: str) -> Optional[str]:
    """The error of a BIMI_CPU_ISA the loops do not know or this processor cannot run, else None."""
    try:
        cpu_isa()
    except ValueError as exc:
        return str(exc)
    return None


def _cuda_reason(device_type: str) -> Optional[str]:
    if _CUDA_ERROR is not None:
        return _CUDA_ERROR
    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    return None


def cpu_isa() -> Optional[str]:
    """Which build of the C++ CPU inner loops runs: "avx512" (AVX-512F+VL on 32-byte vectors),
    "avx2" (AVX2+FMA) or "generic" (baseline x86-64, other processors): the best the processor
    runs, or the one BIMI_CPU_ISA names; None without the extension; a ValueError for any other
    BIMI_CPU_ISA, or one this processor cannot run, as every cpp op raises then.
    csrc/README.md, "The per-ISA build of the CPU loops"."""
    if _CPU_ERROR is not None:
        return None
    try:
        return torch.ops.bimi_C.cpu_isa()
    except (AttributeError, RuntimeError):  # a build from before the op: stale, rebuild it
        return "unknown (an older build without bimi_C::cpu_isa)"


def processor_name() -> str:
    """The CPU's model name with its family and model numbers where /proc/cpuinfo gives them
    ("AMD EPYC (family 25 model 17)"), else what `platform` knows. Results computed on a CPU can
    depend on it beyond rounding in long runs: torch's kernels, like ours, pick their instruction
    set by processor, so a record of a CPU result names it."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if not line.strip():  # the first processor is enough
                    break
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']} model {fields['model']})"
    return name


def joint_counts(p1, p2, offsets, mask):
    return torch.ops.bimi_C.joint_counts(p1, p2, list(offsets), mask)


def joint_counts_backward(grad_j, p1, p2, offsets, mask):
    grad_p1, grad_p2 = torch.ops.bimi_C.joint_counts_backward(grad_j, p1, p2, list(offsets), mask)
    return grad_p1, grad_p2


def boundary_cc(p, edge, window):
    cc, u_range = torch.ops.bimi_C.boundary_cc(p, edge, int(window))
    return cc, u_range


def boundary_cc_backward(grad_cc, p, edge, u_range, window):
    return torch.ops.bimi_C.boundary_cc_backward(grad_cc, p, edge, u_range, int(window))


def edge_map(image, gamma):
    return torch.ops.bimi_C.edge_map(image, float(gamma))


def _native_backend(name, device, reason, edge_map=None, setting_error=None) -> Backend:
    """Both native backends call the same bimi_C ops; the dispatcher picks the CPU or CUDA
    implementation by the tensors' device."""
    return Backend(
        name=name,
        devices=frozenset({device}),
        joint_counts=joint_counts,
        joint_counts_backward=joint_counts_backward,
        boundary_cc=boundary_cc,
        boundary_cc_backward=boundary_cc_backward,
        unavailable_reason=reason,
        edge_map=edge_map,
        setting_error=setting_error or (lambda device_type: None),
    )


CPP_BACKEND = _native_backend("cpp", "cpu", _cpu_reason, edge_map, _cpu_isa_error)  # fused edge map on CPU
CUDA_BACKEND = _native_backend("cuda", "cuda", _cuda_reason)  # the edge map stays torch's on CUDA
