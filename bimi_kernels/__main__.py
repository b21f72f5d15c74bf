"""Command line: `python -m bimi_kernels {info,demo,bench}` (also the `bimi` console script)."""
from __future__ import annotations

import argparse
import platform
import sys


def info() -> int:
    import torch

    import bimi_kernels

    try:
        import triton

        triton_version = triton.__version__
    except Exception as exc:  # triton is optional off Linux
        triton_version = f"not installed ({type(exc).__name__})"
    print(f"bimi_kernels {bimi_kernels.__version__}")
    print(f"python       {platform.python_version()} ({sys.executable})")
    print(f"torch        {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})")
    print(f"triton       {triton_version}")
    print(f"threads      {torch.get_num_threads()}")
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
        print(f"device       cuda: {torch.cuda.get_device_name()}")
    else:
        print("device       cpu only (no CUDA device visible)")
    from . import backends

    for device in devices:
        chosen = backends.resolve("auto", device)
        print(f"\nbackends for {device} tensors (auto picks: {chosen}):")
        for name, reason in bimi_kernels.available_backends(device).items():
            print(f"  {name:<10} {'available' if reason is None else 'unavailable: ' + reason}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bimi", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("info", help="versions, device, and which backends are available (or why not)")
    sub.add_parser("demo", help="pre-train a U-Net with BIMILoss on brain MRI (see `bimi demo --help`)", add_help=False)
    sub.add_parser("bench", help="run the benchmarks (see `bimi bench --help`; run from a source checkout)", add_help=False)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo":
        from .demo.cli import main as demo_main

        return demo_main(argv[1:]) or 0
    if argv and argv[0] == "bench":
        try:
            from benchmarks.run import main as bench_main
        except ImportError as exc:
            print(f"bimi bench: the benchmarks live in the source checkout's benchmarks/ folder; "
                  f"run it from the repository root ({exc})", file=sys.stderr)
            return 2
        return bench_main(argv[1:]) or 0
    args = parser.parse_args(argv)
    if args.command in (None, "info"):
        return info()
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
