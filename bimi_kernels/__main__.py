"""Command line: `bimi {info,demo,bench}` (also `python -m bimi_kernels ...`).

`bimi bench` runs the benchmarks of a source checkout (`benchmarks/` is not part of the installed
package): it works for an editable install or from the repository root, and otherwise says so.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path
from typing import Optional

from ._version import __version__


def info() -> int:
    import torch

    import bimi_kernels

    try:
        import triton

        triton_version = triton.__version__
    except Exception as exc:  # triton is optional off Linux
        triton_version = f"not installed ({type(exc).__name__})"
    print(f"bimi_kernels {bimi_kernels.__version__} ({Path(bimi_kernels.__file__).parent})")
    print(f"python       {platform.python_version()} ({sys.executable})")
    print(f"torch        {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})")
    print(f"triton       {triton_version}")
    print(f"threads      {torch.get_num_threads()}")
    from .native import cpu_isa, processor_name

    print(f"processor    {processor_name()}")

    for module in ("bimi_kernels._C", "bimi_kernels._C_cuda"):
        loaded = sys.modules.get(module)
        if loaded is not None:  # where it came from: another checkout's build can be picked up
            print(f"{module.split('.')[-1]:<12} {loaded.__file__}")
    try:
        isa = cpu_isa()
        loops = (f"{isa} build of the C++ inner loops (BIMI_CPU_ISA=generic, avx2 or avx512 asks for one)"
                 if isa else "not built")
    except ValueError as exc:  # a BIMI_CPU_ISA the loops do not know or this processor cannot run
        # (every cpp call refuses it)
        loops = f"error: {exc}"
    print(f"cpu loops    {loops}")
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
        print(f"device       cuda: {torch.cuda.get_device_name()}")
    else:
        print("device       cpu only (no CUDA device visible)")
    from . import backends

    status = 0
    for device in devices:
        refusal = None
        try:
            chosen = backends.resolve("auto", device)
        except (ValueError, RuntimeError) as exc:  # BIMI_BACKEND or BIMI_CPU_ISA naming what cannot run
            chosen, refusal, status = "none", exc, 1
        print(f"\nbackends for {device} tensors (auto picks: {chosen}):")
        for name, reason in bimi_kernels.available_backends(device).items():
            print(f"  {name:<10} {'available' if reason is None else 'unavailable: ' + reason}")
        if refusal is not None:
            print(f"every call with backend='auto' on {device} tensors raises {type(refusal).__name__}: {refusal}")
    return status


BENCH_PACKAGES = ("numpy", "matplotlib")  # pyproject.toml's `bench` extras


def benchmarks_checkout() -> Optional[Path]:
    """The source checkout whose `benchmarks/` package goes with this bimi_kernels, or None.

    The package's parent folder, when it holds `benchmarks/run.py` (a checkout, or an editable
    install of one); else the current directory, when it is such a checkout.
    """
    package_parent = Path(__file__).resolve().parent.parent
    for candidate in (package_parent, Path.cwd()):
        if (candidate / "benchmarks" / "run.py").is_file():
            return candidate
    return None


def bench(argv) -> int:
    checkout = benchmarks_checkout()
    if checkout is None:
        message = ("bimi bench: the benchmarks are not part of the installed package; they live in the "
                   "source checkout's benchmarks/ folder. From the repository root run "
                   "`python -m benchmarks.run --help`.")
        if any(arg in ("-h", "--help") for arg in argv):  # asked for help: this is the help
            print(message)
            return 0
        print(message, file=sys.stderr)
        return 2
    from .demo.packages import missing_packages

    missing = missing_packages(BENCH_PACKAGES)
    if missing:
        print(f"bimi bench: the benchmarks need {', '.join(missing)} "
              f"({'is' if len(missing) == 1 else 'are'} not installed). Install the bench extras:\n"
              f"    pip install {' '.join(BENCH_PACKAGES)}   (in the source tree: pip install "
              "--no-build-isolation '.[bench]')", file=sys.stderr)
        return 2
    if str(checkout) not in sys.path:
        sys.path.insert(0, str(checkout))
    from benchmarks.run import main as bench_main

    return bench_main(argv, prog="bimi bench") or 0


def main(argv=None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        # whoever read the output went away (`bimi info | head -3`): stop quietly, as other
        # command-line tools do, with stdout pointed at /dev/null so that the interpreter's last
        # flush does not raise again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _main(argv) -> int:
    parser = argparse.ArgumentParser(prog="bimi", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"bimi_kernels {__version__}")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("info", help="versions, device, and which backends are available (or why not)")
    sub.add_parser("demo", help="pre-train a U-Net with BIMILoss on brain MRI (see `bimi demo --help`)", add_help=False)
    sub.add_parser("bench", help="run the benchmarks of a source checkout (see `bimi bench --help`)", add_help=False)
    argv = list(sys.argv[1:] if argv is None else argv)
    # demo and bench parse their own arguments
    if argv and argv[0] == "demo":
        from .demo.cli import main as demo_main

        return demo_main(argv[1:]) or 0
    if argv and argv[0] == "bench":
        return bench(argv[1:])
    args = parser.parse_args(argv)
    if args.command in (None, "info"):
        return info()
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
