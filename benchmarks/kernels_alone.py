"""The C++ kernels timed alone: what limits them, separated from the Python layer and allocation.

    python -m benchmarks.kernels_alone [--rounds N] [--out FILE]

At the CPU target (B=4, K=10, 128x128, float32, 1 thread) it times each `torch.ops.bimi_C` op
by itself (its outputs freed and re-allocated by torch as in any call), the same work through
the public functions with autograd (what `summary.md` times), and a 1024^3 float32 `torch.mm`
(this core's practical matrix rate, the yardstick for the joint counts' FLOP rate). For each: the
median time over rounds (all cases interleaved round by round), the FLOP rate where the work is
a product (joint counts: 2 |O| K^2 B N forward, twice that backward, docs/contract.md §3), and
the minor page faults per call (a first touch of a fresh page costs microseconds on a virtual
machine). Writes FILE (default results/benchmarks/cpu/kernels_alone.md) with the device,
versions, commit and load average.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import time
from pathlib import Path

import torch

import bimi_kernels
import bimi_kernels._C  # noqa: F401 (registers torch.ops.bimi_C)
from bimi_kernels import functional

from .run import RESULTS_DIR, device_name, git_commit

SHAPE = (4, 10, 128, 128)
WINDOW = 5


def radius_offsets(radius: int) -> list:
    """The flat (dy, dx) list of the window {-r..r}^2, as the ops take it."""
    return [v for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1) for v in (dy, dx)]


def cases():
    """name -> (call, FLOPs or None)."""
    g = torch.Generator().manual_seed(0)
    p1 = torch.randn(SHAPE, generator=g).softmax(1)
    p2 = torch.randn(SHAPE, generator=g).softmax(1)
    image = torch.rand((SHAPE[0], 1) + SHAPE[2:], generator=g)
    edge = functional.edge_map(image)
    batch, k, pixels = SHAPE[0], SHAPE[1], SHAPE[2] * SHAPE[3]
    ops = torch.ops.bimi_C
    found = {}
    for radius in (1, 3):
        offsets = radius_offsets(radius)
        counts = ops.joint_counts(p1, p2, offsets, None)
        grad = torch.rand_like(counts)
        flops = 2 * (2 * radius + 1) ** 2 * k * k * batch * pixels
        found[f"joint counts r={radius}, forward (op)"] = (lambda o=offsets: ops.joint_counts(p1, p2, o, None), flops)
        found[f"joint counts r={radius}, backward (op)"] = (
            lambda o=offsets, gr=grad: ops.joint_counts_backward(gr, p1, p2, o, None), 2 * flops)
        q1, q2 = p1.clone().requires_grad_(), p2.clone().requires_grad_()

        def route(r=radius, q1=q1, q2=q2, gr=grad):
            torch.autograd.grad(functional.joint_counts(q1, q2, offsets=r, backend="cpp"), (q1, q2), gr)

        found[f"joint counts r={radius}, forward+backward (public function)"] = (route, 3 * flops)
    cc, u_range = ops.boundary_cc(p1, edge, WINDOW)
    one = torch.ones(())
    found["boundary term, one map, forward (op)"] = (lambda: ops.boundary_cc(p1, edge, WINDOW), None)
    found["boundary term, one map, backward (op)"] = (
        lambda: ops.boundary_cc_backward(one, p1, edge, u_range, WINDOW), None)
    found["edge map (op)"] = (lambda: ops.edge_map(image, 1.0), None)
    b1, b2 = p1.clone().requires_grad_(), p2.clone().requires_grad_()
    found["boundary term, both maps + edge map, forward+backward (public function)"] = (
        lambda: torch.autograd.grad(functional.boundary_cc_loss(b1, b2, image, window=WINDOW, backend="cpp"),
                                    (b1, b2)), None)
    a, b = torch.rand(1024, 1024, generator=g), torch.rand(1024, 1024, generator=g)
    found["torch.mm 1024^3 (the core's matrix rate)"] = (lambda: torch.mm(a, b), 2 * 1024 ** 3)
    return found


def measure(rounds: int) -> dict:
    found = cases()
    for call, _ in found.values():  # warm-up: first-call costs, heap grown to its working size
        for _ in range(3):
            call()
    times = {name: [] for name in found}
    faults = {name: [] for name in found}
    for _ in range(rounds):
        for name, (call, _) in found.items():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
            faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return {name: (statistics.median(times[name]), flops, statistics.median(faults[name]))
            for name, (_, flops) in found.items()}


def render(results: dict, load_start: float, load_end: float, rounds: int) -> str:
    peak = results["torch.mm 1024^3 (the core's matrix rate)"]
    peak_rate = peak[1] / peak[0]
    lines = [
        "# The C++ kernels alone (`python -m benchmarks.kernels_alone`)",
        "",
        f"{device_name('cpu')}, torch {torch.__version__}, 1 torch thread, bimi_kernels "
        f"{bimi_kernels.__version__} at commit {git_commit()}; B=4 K=10 128x128 float32, window {WINDOW}; "
        f"median of {rounds} rounds, every case once per round; load average (1 min) {load_start:.2f} at the "
        f"start, {load_end:.2f} at the end.",
        "",
        "| case | ms | GFLOP/s | of torch.mm's rate | page faults per call |",
        "|---|---|---|---|---|",
    ]
    for name, (seconds, flops, faults) in results.items():
        rate = f"{flops / seconds / 1e9:.1f}" if flops else "—"
        share = f"{flops / seconds / peak_rate:.0%}" if flops else "—"
        lines.append(f"| {name} | {seconds * 1e3:.3g} | {rate} | {share} | {faults:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kernels_alone", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=100, help="timed rounds (default 100)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "cpu" / "kernels_alone.md")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("argument --rounds: expected an integer >= 1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        load_start = os.getloadavg()[0]
        results = measure(args.rounds)
        text = render(results, load_start, os.getloadavg()[0], args.rounds)
    finally:
        torch.set_num_threads(threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text, end="")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
