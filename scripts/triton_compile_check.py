"""Compile the Triton kernels for an NVIDIA GPU without one, and report registers and spills.

Runs Triton's real compiler (TTIR -> PTX) and the ptxas that ships with Triton on every kernel
variant the launchers would launch, with the launchers' own settings, so GPU-only compile errors
(types, layouts, tl.dot shapes) and register spills show up on a machine with no GPU. Needs
TRITON_INTERPRET unset (the kernels must not be interpreted).

    python scripts/triton_compile_check.py                 # the full set: K x dtype x layout
    python scripts/triton_compile_check.py --quick         # a representative set (the CI test)
    python scripts/triton_compile_check.py --k 10 40 --dtype fp32 --json out.json
    python scripts/triton_compile_check.py --wide          # the 64-bit index variants
    python scripts/triton_compile_check.py --launch --k 10 100 --window 5 7
                                                           # as launched (see run_as_launched)

Prints one line per variant (kernel, settings, registers, spilled bytes, shared memory, the
matrix instruction and the approximate float instructions in the PTX) and exits 1 when a variant fails to compile, spills (more than
--max-spill bytes) or asks more shared memory than a block of that GPU may have.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Dict, Iterable, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32", "fp64": "float64"}
FULL_K = (2, 10, 16, 40, 64, 128, 1000)  # 1000: the channel blocks of K above 128
# Shared memory one block may use (opt-in maximum, bytes) by compute capability; Triton raises
# OutOfResources at launch above it, which compiling alone does not show.
MAX_SHARED_BYTES = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448, 120: 101376}
# the kernels' unannotated arguments that the launchers pass as Python floats (the rest are ints)
FLOAT_ARGUMENTS = {"zero_power"}


def _ptxas_report(ptx: str, arch: int) -> Dict[str, Optional[int]]:
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        return {"registers": None, "spill_store_bytes": None, "spill_load_bytes": None,
                "stack_bytes": None}
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.ptx")
        with open(path, "w") as handle:
            handle.write(ptx)
        suffix = "a" if arch >= 90 else ""
        report = subprocess.run(
            [ptxas, "-v", f"-arch=sm_{arch}{suffix}", path, "-o", os.devnull],
            capture_output=True, text=True,
        ).stderr

    def number(pattern):
        found = re.search(pattern, report)
        return int(found.group(1)) if found else None

    return {
        "registers": number(r"Used (\d+) registers"),
        "spill_store_bytes": number(r"(\d+) bytes spill stores"),
        "spill_load_bytes": number(r"(\d+) bytes spill loads"),
        "stack_bytes": number(r"(\d+) bytes stack frame"),
    }


def _matrix_instruction(ptx: str) -> str:
    if "wgmma" in ptx:
        return "wgmma"
    found = re.search(r"mma\.sync\.aligned\.(m\d+n\d+k\d+)\S*?\.(\w+)\.(\w+)\.(\w+)\.(\w+)", ptx)
    if found:
        return f"mma.{found.group(1)}.{found.group(3)}"
    return "fma"


def _approximate_math(ptx: str) -> str:
    """The approximate float instructions in the PTX (Triton's float32 tl.sqrt, "/" and tl.exp
    compile to them; tl.sqrt_rn, tl.div_rn are correctly rounded), comma-separated, or "-"."""
    found = sorted(set(re.findall(r"\b(sqrt\.approx|div\.full|div\.approx|ex2\.approx|lg2\.approx)", ptx)))
    return ",".join(found) or "-"


def compile_variant(fn, pointer_types: Dict[str, str], constexprs: Dict, num_warps: int,
                    arch: int, wide_ints: Iterable[str] = ()) -> Dict:
    """Compile one kernel variant; returns its report row."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    wide_ints = set(wide_ints)
    signature = {}
    for p in fn.params:
        if p.is_constexpr:
            signature[p.name] = "constexpr"
        elif p.name in pointer_types:
            signature[p.name] = pointer_types[p.name]
        elif p.annotation_type:  # an annotated scalar (gamma: tl.float64) is launched as annotated
            signature[p.name] = p.annotation_type
        elif p.name in FLOAT_ARGUMENTS:  # a Python float: the launcher passes float32
            signature[p.name] = "fp32"
        else:
            signature[p.name] = "i64" if p.name in wide_ints else "i32"
    row = {"kernel": fn.__name__, "settings": {k: v for k, v in constexprs.items()},
           "num_warps": num_warps}
    try:
        kernel = triton.compile(
            ASTSource(fn=fn, signature=signature, constexprs=constexprs),
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": num_warps},
        )
    except Exception as exc:  # report and go on: one failure should not hide the others
        row["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}"
        return row
    ptx = kernel.asm["ptx"]
    if constexprs.get("WIDE"):
        row["narrow"] = _narrow_size_products(kernel.asm["ttir"])
    row.update(_ptxas_report(ptx, arch))
    row["shared_bytes"] = kernel.metadata.shared
    row["shared_over"] = kernel.metadata.shared > MAX_SHARED_BYTES.get(arch, 49152)
    row["matrix"] = _matrix_instruction(ptx)
    row["approx"] = _approximate_math(ptx)
    return row


SIZE_ARGUMENTS = ("D", "H", "W", "N")


def _narrow_size_products(ttir: str) -> List[str]:
    """The 32-bit multiplications that take a size argument (D, H, W, N) in a 64-bit (WIDE)
    variant: each size fits in 32 bits, a product of one with anything need not (a row offset
    dy W, a wrap-around (H - 1) W), so there every such product must be formed in 64 bits."""
    found = []
    for line in ttir.splitlines():
        match = re.search(r"arith\.muli (%[\w.]+), (%[\w.]+) : (i32|tensor<[^>]*xi32>)", line)
        if match and {match.group(1)[1:], match.group(2)[1:]} & set(SIZE_ARGUMENTS):
            found.append(line.strip())
    return found


def joint_variants(dtype_names: Iterable[str], ks: Iterable[int], layouts: Iterable[tuple]):
    """(kernel, pointer types, constexprs, num_warps, wide ints) of the joint-count kernels, with
    the settings the launchers derive for each (dtype, K, layout)."""
    import torch

    from bimi_kernels.triton import joint

    for name in dtype_names:
        dtype = getattr(torch, DTYPES[name])
        acc = "fp64" if dtype == torch.float64 else "fp32"
        base_precision = "ieee" if dtype == torch.float64 else "tf32x3"
        for k in ks:
            for shape_tail, radius, masked in layouts:
                shape = (2, k) + tuple(shape_tail)
                p = torch.empty(shape, dtype=dtype, device="meta")
                mask = torch.empty((2,) + tuple(shape_tail), dtype=dtype, device="meta")
                ndim = len(shape_tail)
                flat = tuple(v for d in _window(radius, ndim) for v in d)
                prob = joint._problem(p, p, mask if masked else None, flat, None, None)
                precision = joint.product_precision(prob, base_precision)
                pointers = {"p1_ptr": "*" + name, "p2_ptr": "*" + name, "mask_ptr": "*" + name,
                            "grad_p1_ptr": "*" + name, "grad_p2_ptr": "*" + name,
                            "rows_ptr": "*i64", "reverse_rows_ptr": "*i64",
                            "partial_ptr": "*" + acc, "grad_j_ptr": "*" + acc,
                            "out_ptr": "*" + acc}
                label = {"dtype": name, "K": k, "shape": "x".join(map(str, shape_tail)),
                         "radius": radius, "mask": masked}
                settings = joint.forward_constexprs(prob, dtype, masked, precision)
                warps = settings.pop("num_warps")
                yield joint._joint_counts_forward_kernel, pointers, settings, warps, label
                for want_p1, want_p2 in joint.backward_passes(prob):
                    settings = joint.backward_constexprs(prob, masked, precision, want_p1,
                                                         want_p2)
                    warps = settings.pop("num_warps")
                    yield joint._joint_counts_backward_kernel, pointers, settings, warps, label
            yield (joint._sum_partials_kernel,
                   {"partial_ptr": "*" + acc, "out_ptr": "*" + acc},
                   {"K_PAD": joint.padded_k(k), "BLOCK": 1024}, 4, {"dtype": name, "K": k})


def boundary_variants(dtype_names: Iterable[str], ks: Iterable[int], windows=(5,)):
    import torch

    from bimi_kernels.triton import boundary

    for name in dtype_names:
        dtype = getattr(torch, DTYPES[name])
        acc = "fp64" if dtype == torch.float64 else "fp32"
        pointers = {"p_ptr": "*" + name, "grad_ptr": "*" + name}
        for param in boundary.ACCUMULATOR_POINTERS:
            pointers[param] = "*" + acc
        for k in ks:
            for shape_tail in ((256, 256), (32, 32, 32)):
                for window in windows:
                    shape = (2, k) + shape_tail
                    p = torch.empty(shape, dtype=dtype, device="meta")
                    plan = boundary._plan(p, window, None, None)
                    label = {"dtype": name, "K": k, "shape": "x".join(map(str, shape_tail)),
                             "window": window}
                    for fn, settings in boundary.kernel_constexprs(plan):
                        settings = dict(settings)
                        warps = settings.pop("num_warps")
                        yield fn, pointers, settings, warps, label
        for is_3d in (False, True):
            for fn, settings in boundary.edge_constexprs(is_3d):
                settings = dict(settings)
                warps = settings.pop("num_warps")
                yield fn, dict(pointers, image_ptr="*" + name), settings, warps, {"dtype": name}


def _window(radius: int, ndim: int):
    import itertools

    steps = range(-radius, radius + 1)
    return list(itertools.product(steps, repeat=ndim))


def _wide_copies(variants):
    """Each variant that has a WIDE setting again with WIDE=True and its strides as 64-bit ints,
    as the launchers compile them for a sample of more than 2^31 - 2^16 elements."""
    for fn, pointers, settings, warps, label, _ in variants:
        if "WIDE" in settings:
            strides = [p.name for p in fn.params if "stride" in p.name and not p.is_constexpr]
            yield fn, pointers, dict(settings, WIDE=True), warps, dict(label, wide=True), strides


def assume_multiprocessors(count: int) -> None:
    """Size the launch settings that follow the GPU's multiprocessor count (programs per sample,
    the padded count of partial sums) for `count` multiprocessors: the shapes here live on the
    meta device, which would count as one."""
    import bimi_kernels.triton as package
    from bimi_kernels.triton import boundary, joint

    for module in (package, boundary, joint):
        module.multiprocessor_count = lambda device: count


def _require_the_compiler() -> None:
    if "TRITON_INTERPRET" in os.environ and os.environ["TRITON_INTERPRET"] not in ("", "0"):
        raise SystemExit("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")


def run(arch: int, dtype_names: List[str], ks: List[int], quick: bool,
        wide: bool = False, multiprocessors: int = 132, windows=(5,)) -> List[Dict]:
    _require_the_compiler()
    assume_multiprocessors(multiprocessors)
    if quick:
        layouts = [((256, 256), 0, False), ((256, 256), 1, False), ((16, 16, 16), 1, True)]
    else:
        layouts = [((256, 256), 0, False), ((256, 256), 1, False), ((256, 256), 3, True),
                   ((32, 32, 32), 1, True)]
    rows = []
    seen = set()
    variants = list(joint_variants(dtype_names, ks, layouts)) + \
        list(boundary_variants(dtype_names, ks if not quick else sorted({ks[0], ks[-1]}), windows))
    variants = [v + ([],) for v in variants]
    if wide:
        variants = list(_wide_copies(variants))
    for fn, pointers, settings, warps, label, wide_ints in variants:
        key = (fn.__name__, tuple(sorted(settings.items())), tuple(sorted(pointers.items())),
               warps)
        if key in seen:  # layouts that give the same compile-time settings compile once
            continue
        seen.add(key)
        row = compile_variant(fn, pointers, settings, warps, arch, wide_ints)
        row["case"] = label
        rows.append(row)
        print(_format(row), flush=True)
    return rows


# --launch: the launchers' own calls, compiled as a launch compiles them
LAUNCH_JOINT_LAYOUTS = (  # (spatial shape, offset radius, masked, batch)
    ((256, 256), 0, False, 16), ((256, 256), 1, False, 16), ((16, 16), 3, True, 1),
    ((7, 9), 1, False, 1), ((16, 16, 16), 1, True, 2), ((3, 5, 7), 1, True, 1),
)
LAUNCH_BOUNDARY_SHAPES = ((256, 256), (16, 16), (7, 9), (32, 32, 32), (4, 16, 16))


def _stand_in_driver(arch: int) -> None:
    """Make Triton compile for sm_`arch` and never launch: its active driver is replaced by one
    that names that target (and no device), and every JIT call becomes a warm-up (compile only)."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.runtime import jit
    from triton.runtime.driver import driver

    class StandInDriver:
        target = GPUTarget("cuda", arch, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return self.target

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_benchmarker(self):
            raise RuntimeError("nothing runs under the stand-in driver")

        def is_active(self):
            return True

        def map_python_to_cpp_type(self, name):
            return name

    driver.set_active(StandInDriver())
    launch = jit.JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = launch(self, *args, grid=grid, warmup=True, **kwargs)
        COMPILED_AS_LAUNCHED.setdefault(id(kernel), (self, kernel, LAUNCH_CASE[0]))
        return kernel

    jit.JITFunction.run = compile_only


COMPILED_AS_LAUNCHED: Dict = {}
LAUNCH_CASE: List = [None]


def run_as_launched(arch: int, dtype_names: List[str], ks: List[int], windows=(5,),
                    multiprocessors: int = 132, ops=("joint", "boundary")) -> List[Dict]:
    """Call the launchers (joint counts forward and backward, boundary term forward and
    backward, edge map) on meta tensors, with Triton's own argument binder between them and the
    compiler, as on a GPU: an int argument equal to 1 becomes a constant, ints divisible by 16
    and aligned pointers get alignment hints. `run` compiles from signatures with every int
    32-bit and no hints, which compiles other code for some shapes (small maps, batch 1) and has
    missed spills that these show. `ops`: which launchers ("joint": the joint counts;
    "boundary": the boundary term and the edge map)."""
    import torch

    from bimi_kernels.triton import boundary, joint

    _require_the_compiler()
    assume_multiprocessors(multiprocessors)
    _stand_in_driver(arch)
    rows, failures = [], []

    def attempt(label, call):
        LAUNCH_CASE[0] = label
        try:
            call()
        except Exception as exc:  # report and go on
            failures.append({"kernel": "(launcher)", "settings": {}, "num_warps": None, "case": label,
                             "error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}"})
            print(_format(failures[-1]), flush=True)

    for name in dtype_names:
        dtype = getattr(torch, DTYPES[name])
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        for k in ks:
            for shape, radius, masked, batch in LAUNCH_JOINT_LAYOUTS if "joint" in ops else ():
                p = torch.empty((batch, k) + shape, dtype=dtype, device="meta")
                mask = torch.empty((batch,) + shape, dtype=dtype, device="meta") if masked else None
                flat = tuple(v for d in _window(radius, len(shape)) for v in d)
                grad_j = torch.empty((len(flat) // len(shape), k, k), dtype=acc, device="meta")
                label = {"dtype": name, "K": k, "B": batch, "shape": "x".join(map(str, shape)),
                         "radius": radius, "mask": masked}
                attempt(label, lambda: (joint.joint_counts(p, p, flat, mask),
                                        joint.joint_counts_backward(grad_j, p, p, flat, mask)))
            for shape in LAUNCH_BOUNDARY_SHAPES if "boundary" in ops else ():
                for window in windows:
                    for batch in (1, 2):
                        p = torch.empty((batch, k) + shape, dtype=dtype, device="meta")
                        edge = torch.empty((batch, 1) + shape, dtype=acc, device="meta")
                        grad_cc = torch.empty((), dtype=acc, device="meta")
                        label = {"dtype": name, "K": k, "B": batch, "shape": "x".join(map(str, shape)),
                                 "window": window}

                        def boundary_term():
                            _, u_range = boundary.boundary_cc(p, edge, window)
                            boundary.boundary_cc_backward(grad_cc, p, edge, u_range, window)

                        attempt(label, boundary_term)
        for shape in LAUNCH_BOUNDARY_SHAPES if "boundary" in ops else ():
            for channels in (1, 3):
                image = torch.empty((2, channels) + shape, dtype=dtype, device="meta")
                attempt({"dtype": name, "C": channels, "shape": "x".join(map(str, shape))},
                        lambda: boundary.edge_map(image, 0.75))
    for fn, kernel, label in COMPILED_AS_LAUNCHED.values():
        names = [p.name for p in fn.params]
        settings = {names[index[0]]: value for index, value in kernel.src.constants.items()}
        ptx = kernel.asm["ptx"]
        row = {"kernel": fn.__name__, "settings": settings, "num_warps": kernel.metadata.num_warps,
               "case": label, "shared_bytes": kernel.metadata.shared,
               "shared_over": kernel.metadata.shared > MAX_SHARED_BYTES.get(arch, 49152),
               "matrix": _matrix_instruction(ptx), "approx": _approximate_math(ptx)}
        row.update(_ptxas_report(ptx, arch))
        rows.append(row)
        print(_format(row), flush=True)
    return failures + rows


def _format(row: Dict) -> str:
    settings = ",".join(f"{k}={v}" for k, v in row["settings"].items()
                        if k not in ("DOT_PRECISION",))
    case = ",".join(f"{k}={v}" for k, v in row.get("case", {}).items())
    if "error" in row:
        return f"FAIL {row['kernel']} [{case}] {settings}: {row['error']}"
    spills = row.get("spill_store_bytes")
    status = "ok  " if not spills else "SPILL"
    if row.get("narrow"):
        status = "NARROW"
        settings += " 32-bit size products: " + "; ".join(row["narrow"])
    if row.get("shared_over"):
        status = "SMEM "
    return (f"{status} {row['kernel']:<32} regs={row['registers']} spill={spills} "
            f"smem={row['shared_bytes']} {row['matrix']:<18} approx={row['approx']} warps={row['num_warps']} "
            f"[{case}] {settings}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability (90 = H100/H200)")
    parser.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--k", nargs="+", type=int, default=list(FULL_K))
    parser.add_argument("--quick", action="store_true",
                        help="three layouts instead of four, boundary kernels for the first and last K only")
    parser.add_argument("--wide", action="store_true",
                        help="the 64-bit index variants (WIDE=True) instead, as launched for a "
                        "sample of more than 2^31 - 2^16 elements")
    parser.add_argument("--window", nargs="+", type=int, default=[5],
                        help="box windows of the boundary kernels (default 5)")
    parser.add_argument("--max-spill", type=int, default=0, metavar="BYTES",
                        help="spill stores a variant may have before the check fails (default 0)")
    parser.add_argument("--multiprocessors", type=int, default=132,
                        help="the target GPU's multiprocessor count, which sizes some launch "
                        "settings (default 132: H100/H200 SXM)")
    parser.add_argument("--launch", action="store_true",
                        help="compile what the launchers launch, through Triton's own argument "
                        "binder (sizes equal to 1 become constants, alignment hints), on a set "
                        "of shapes from 3x5x7 to 256x256 and batches 1 to 16 (the first case "
                        "that compiles a variant labels it)")
    parser.add_argument("--ops", nargs="+", choices=["joint", "boundary"],
                        default=["joint", "boundary"],
                        help="with --launch: the launchers to compile (default both)")
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args(argv)
    if args.launch:
        rows = run_as_launched(args.arch, args.dtype, args.k, tuple(args.window), args.multiprocessors,
                               tuple(args.ops))
    else:
        rows = run(args.arch, args.dtype, args.k, args.quick, args.wide, args.multiprocessors,
                   tuple(args.window))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1, default=str)
    failed = [r for r in rows if "error" in r]
    spilled = [r for r in rows if r.get("spill_store_bytes")]
    over = [r for r in spilled if r["spill_store_bytes"] > args.max_spill]
    too_much_shared = [r for r in rows if r.get("shared_over")]
    narrow = [r for r in rows if r.get("narrow")]
    print(f"{len(rows)} variants compiled for sm_{args.arch}: {len(failed)} failed, "
          f"{len(spilled)} spill ({len(over)} over {args.max_spill} bytes), "
          f"{len(too_much_shared)} over the shared memory of a block"
          + (f", {len(narrow)} with 32-bit size products" if args.wide else ""))
    return 1 if failed or over or too_much_shared or narrow else 0


if __name__ == "__main__":
    sys.exit(main())
