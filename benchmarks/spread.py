"""How much the target ratios move from run to run: the speed-up targets' configs measured several
times in a row, one table of every run's times and ratios.

    python -m benchmarks.spread [--runs 5] [--device cpu] [--threads N] --out FILE.md

Each run is `python -m benchmarks.run --group target --mode forward+backward` restricted to the ops
and providers of the speed-up targets (benchmarks/report.py, `TARGETS`), without memory
measurements, into a temporary folder; FILE.md gets the table.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from . import run
from .providers import NATIVE_FOR_DEVICE
from .report import TARGETS, _load, _ms
from .schema import read_csv


def speed_targets(device_type: str) -> list:
    """(op, radius, baseline provider) of the device's speed-up targets."""
    return [(t.op, t.radius, t.metric[len("speedup_vs_"):].replace("_", "-")) for t in TARGETS
            if t.device_type == device_type and t.metric.startswith("speedup_vs_")]


def run_arguments(device_type: str, threads) -> list:
    targets = speed_targets(device_type)
    ops = sorted({op for op, _, _ in targets})
    providers = sorted({base for _, _, base in targets} | {"reference"}) + list(NATIVE_FOR_DEVICE[device_type])
    arguments = ["--device", device_type, "--group", "target", "--mode", "forward+backward", "--no-memory",
                 "--op", *ops, "--providers", *providers]
    return arguments + (["--threads", str(threads)] if threads else [])


def spread_table(runs: list, device_type: str) -> list:
    """`runs`: one list of rows per run."""
    lines = ["| config | op | native | baseline | baseline ms (each run) | native ms (each run) | "
             "ratio per run | median ratio | load per run |", "|---|---|---|---|---|---|---|---|---|"]
    for op, radius, baseline in speed_targets(device_type):
        for native in NATIVE_FOR_DEVICE[device_type]:
            pairs = []
            for rows in runs:
                pick = {r.provider: r for r in rows if r.op == op and r.radius == radius and r.measured
                        and r.clusters == 10 and r.dtype == "float32"}
                if native in pick and baseline in pick:
                    pairs.append((pick[baseline], pick[native]))
            if not pairs:
                continue
            ratios = [b.time_median_s / n.time_median_s for b, n in pairs]
            lines.append(" | ".join([
                f"| {pairs[0][1].config}", op, native, baseline,
                ", ".join(_ms(b.time_median_s) for b, _ in pairs),
                ", ".join(_ms(n.time_median_s) for _, n in pairs),
                ", ".join(f"{r:.1f}x" for r in ratios), f"{statistics.median(ratios):.1f}x",
                ", ".join(_load(n) for _, n in pairs)]) + " |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.spread", description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", help="as for benchmarks.run (default 1 on CPU)")
    parser.add_argument("--out", required=True, help="the markdown file to write")
    args = parser.parse_args(argv)
    arguments = run_arguments(args.device, args.threads)
    runs = []
    with tempfile.TemporaryDirectory() as folder:
        for index in range(args.runs):
            out = Path(folder) / f"run{index}"
            run.main(arguments + ["--out", str(out)])
            runs.append(read_csv(out / "results.csv"))
    first = runs[0][0]
    command = " ".join(["python -m benchmarks.spread"] + (argv if argv is not None else sys.argv[1:]))
    text = [f"# Repeated target runs ({first.device_type}, {first.num_threads} thread{'s' if first.num_threads != 1 else ''})", "",
            f"The speed-up target configs, forward+backward, measured {args.runs} times in a row with "
            f"`{command}` (each run: `python -m benchmarks.run {' '.join(arguments)}`), to show how much "
            f"the ratios move. Commit `{first.git_commit}`, torch {first.torch_version}, {first.device_name}. "
            "The load column is the 1-minute load average around the native provider's rounds.", ""]
    Path(args.out).write_text("\n".join(text + spread_table(runs, args.device)) + "\n")
    print(f"benchmarks.spread: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
