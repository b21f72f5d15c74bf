"""The `triton` backend: the four kernels of the contract in `bimi_kernels/backends.py`.

CUDA tensors: compiled Triton kernels. CPU tensors: the same kernels under Triton's interpreter,
only when TRITON_INTERPRET=1 was set before triton was imported (slow; meant for tests).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Optional

import torch

from ..backends import Backend
from . import INTERPRETED, boundary, joint


def _contiguous(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.contiguous()


def _on_device_of(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensors' device."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def joint_counts(p1, p2, offsets, mask):
    with torch.no_grad(), _on_device_of(p1):
        return joint.joint_counts(p1.contiguous(), p2.contiguous(), offsets, _contiguous(mask))


def joint_counts_backward(grad_j, p1, p2, offsets, mask):
    with torch.no_grad(), _on_device_of(p1):
        return joint.joint_counts_backward(
            grad_j, p1.contiguous(), p2.contiguous(), offsets, _contiguous(mask)
        )


def boundary_cc(p, edge, window):
    with torch.no_grad(), _on_device_of(p):
        return boundary.boundary_cc(p.contiguous(), edge.contiguous(), window)


def boundary_cc_backward(grad_cc, p, edge, u_range, window):
    with torch.no_grad(), _on_device_of(p):
        return boundary.boundary_cc_backward(
            grad_cc, p.contiguous(), edge.contiguous(), u_range, window
        )


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
)


# ------------------------------------------------------------------------------------------------
# ahead-of-time compilation check (no GPU needed)
# ------------------------------------------------------------------------------------------------
def compile_for_gpu(arch: int = 90, full: bool = False) -> list:
    """Compile the kernels for an NVIDIA GPU of compute capability `arch` (90 = H100) without a
    GPU, with the launch settings the launchers would use, so GPU-only compile errors (types,
    layouts, tl.dot shapes) show up on any machine. Needs TRITON_INTERPRET unset. Returns one
    dict per variant: kernel, settings, and registers / spilled bytes from `ptxas -v` (None
    when the ptxas that ships with triton is not found). `full` compiles every dtype, K and
    layout combination instead of a representative set.
    """
    import os
    import re
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import padded_k

    if INTERPRETED:
        raise RuntimeError("compile_for_gpu needs TRITON_INTERPRET unset (kernels are interpreted)")
    target = GPUTarget("cuda", arch, 32)
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    type_names = {
        torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"
    }
    results = []

    def build(fn, pointer_types, constexprs, num_warps):
        signature = {
            p.name: "constexpr" if p.is_constexpr else pointer_types.get(p.name, "i32")
            for p in fn.params
        }
        kernel = triton.compile(
            ASTSource(fn=fn, signature=signature, constexprs=constexprs),
            target=target,
            options={"num_warps": num_warps},
        )
        registers = spilled = None
        if os.path.exists(ptxas):
            with tempfile.TemporaryDirectory() as folder:
                path = os.path.join(folder, "kernel.ptx")
                with open(path, "w") as handle:
                    handle.write(kernel.asm["ptx"])
                suffix = "a" if arch >= 90 else ""
                report = subprocess.run(
                    [ptxas, "-v", f"-arch=sm_{arch}{suffix}", path, "-o", os.devnull],
                    capture_output=True, text=True,
                ).stderr
            found = re.search(r"Used (\d+) registers", report)
            registers = int(found.group(1)) if found else None
            found = re.search(r"(\d+) bytes spill stores", report)
            spilled = int(found.group(1)) if found else None
        results.append(
            {"kernel": fn.__name__, "settings": dict(constexprs), "num_warps": num_warps,
             "registers": registers, "spill_store_bytes": spilled}
        )

    if full:
        joint_variants = [
            (dtype, k, ndim, masked)
            for dtype in type_names
            for k in (3, 17, 40)
            for ndim in (2, 3)
            for masked in (False, True)
        ]
        boundary_dtypes = list(type_names)
    else:
        joint_variants = [
            (torch.bfloat16, 10, 3, True), (torch.float32, 40, 3, True),
            (torch.float64, 17, 3, True), (torch.float32, 10, 2, False),
        ]
        boundary_dtypes = [torch.bfloat16, torch.float64]

    for dtype, k, ndim, masked in joint_variants:
        acc = "fp64" if dtype == torch.float64 else "fp32"
        maps = "*" + type_names[dtype]
        pointers = {
            "p1_ptr": maps, "p2_ptr": maps, "mask_ptr": maps,
            "grad_p1_ptr": maps, "grad_p2_ptr": maps,
            "table_ptr": "*i64", "reverse_table_ptr": "*i64",
            "partial_ptr": "*" + acc, "grad_j_ptr": "*" + acc,
        }
        k_pad = padded_k(k)
        use_dot = dtype != torch.float64
        config = joint.default_config(k_pad, use_dot)
        common = {
            "IS_3D": ndim == 3, "HAS_MASK": masked, "USE_DOT": use_dot,
            "DOT_PRECISION": "tf32x3" if arch >= 80 else "ieee", "K_PAD": k_pad,
            "BLOCK_P": config.block_p,
        }
        build(joint._joint_counts_forward_kernel, pointers, common, config.num_warps)
        passes = [(True, False), (False, True)] if config.split_backward else [(True, True)]
        for want_p1, want_p2 in passes:
            build(
                joint._joint_counts_backward_kernel, pointers,
                dict(common, GRAD_P1=want_p1, GRAD_P2=want_p2), config.num_warps,
            )

    for dtype in boundary_dtypes:
        acc = "*fp64" if dtype == torch.float64 else "*fp32"
        maps = "*" + type_names[dtype]
        pointers = {
            "p_ptr": maps, "grad_ptr": maps, "u_ptr": acc, "tile_min_ptr": acc, "tile_max_ptr": acc,
            "u_range_ptr": acc, "edge_ptr": acc, "partial_ptr": acc, "coef_ptr": acc,
            "grad_cc_ptr": acc,
        }
        for k in (10, 40):
            k_pad = padded_k(k)
            block = boundary.default_block_p(k_pad)
            for with_range in (True, False):
                build(
                    boundary._uncertainty_kernel, pointers,
                    {"WRITE_RANGE": with_range, "EPS_LOG": boundary.EPS_LOG_U, "K_PAD": k_pad,
                     "BLOCK_P": block}, 4,
                )
            build(
                boundary._boundary_grad_kernel, pointers,
                {"EPS_NORM": boundary.EPS_MINMAX, "EPS_LOG": boundary.EPS_LOG_U, "K_PAD": k_pad,
                 "BLOCK_P": block}, 4,
            )
        for backward in (False, True):
            build(
                boundary._ncc_kernel, pointers,
                {"BACKWARD": backward, "EPS": boundary.EPS_CC, "EPS_NORM": boundary.EPS_MINMAX,
                 "BLOCK_P": boundary.default_block_p(1)}, 4,
            )
    return results
