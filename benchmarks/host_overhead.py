"""The host-side cost of one BIMILoss call (forward + backward): Python, the ops' dispatch (the
eager route, for these eager calls), the autograd graph and the small K x K epilogue, without the
value checks (validate=False), measured on maps so small that the kernels' own time is nil.

    python -m benchmarks.host_overhead [--device cpu|cuda] [--calls N] [--out DIR]

For each available backend on the device: eager calls (by the ops' eager route, and the same
calls through the custom ops for comparison), and on CUDA also the same call captured
once in a CUDA graph and replayed (what torch.compile(mode="reduce-overhead") does), which
removes the host cost. Writes DIR/host_overhead.csv and DIR/host_overhead.md (device, versions,
load average); DIR defaults to results/benchmarks/<device>.
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import bimi_kernels
from bimi_kernels import ops

from .run import RESULTS_DIR, device_name, git_commit, triton_version

SHAPE = (1, 2, 8, 8)  # kernels cost nothing here: what is timed is the host's work


def _inputs(device):
    g = torch.Generator().manual_seed(0)
    p1 = torch.randn(SHAPE, generator=g).softmax(1).to(device).requires_grad_(True)
    p2 = torch.randn(SHAPE, generator=g).softmax(1).to(device).requires_grad_(True)
    image = torch.rand((SHAPE[0], 1) + SHAPE[2:], generator=g).to(device)
    return p1, p2, image


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_eager(loss_fn, device, calls):
    """Microseconds per call by the eager route and through the custom ops (ops.EAGER_ROUTE
    False): batches of calls timed end to end (the device is idle meanwhile, so this is the
    host's time), the two routes' batches interleaved, median over batches."""
    p1, p2, image = _inputs(device)
    batches = {True: [], False: []}
    try:
        for eager_route in (True, False):
            ops.EAGER_ROUTE = eager_route
            for _ in range(20):
                loss_fn(p1, p2, image).backward()
        for _ in range(7):
            for eager_route in (True, False):
                ops.EAGER_ROUTE = eager_route
                _sync(device)
                start = time.perf_counter()
                for _ in range(calls):
                    loss_fn(p1, p2, image).backward()
                _sync(device)
                batches[eager_route].append((time.perf_counter() - start) / calls * 1e6)
    finally:
        ops.EAGER_ROUTE = True
    return statistics.median(batches[True]), statistics.median(batches[False])


def capture_loss_and_backward(loss_fn, p1, p2, image):
    """(graph, loss): one call of `loss_fn` and its backward captured in a CUDA graph, after a
    warm-up on a side stream (kernels compiled, offset tables cached). A replay recomputes the
    loss and p1.grad, p2.grad from the current values of p1, p2 and image."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            p1.grad = p2.grad = None
            loss_fn(p1, p2, image).backward()
    torch.cuda.current_stream().wait_stream(side)
    p1.grad = p2.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = loss_fn(p1, p2, image)
        loss.backward()
    return graph, loss


def time_graph_replay(loss_fn, calls):
    """Microseconds per replay of the call captured in one CUDA graph (forward and backward)."""
    graph, _ = capture_loss_and_backward(loss_fn, *_inputs("cuda"))
    batches = []
    for _ in range(7):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            graph.replay()
        torch.cuda.synchronize()
        batches.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(batches)


def measure(device: str, calls: int):
    """Yields one row per backend and offset set, as each is measured."""
    for name, reason in bimi_kernels.available_backends(device).items():
        if reason is not None or (name == "triton" and device == "cpu"):
            continue  # Triton on CPU tensors is its interpreter: a test tool, not a runtime
        for offsets in (0, 1):
            loss_fn = bimi_kernels.BIMILoss(offsets=offsets, backend=name, validate=False)
            load = os.getloadavg()[0]
            eager_route_us, custom_ops_us = time_eager(loss_fn, device, calls)
            row = {"backend": name, "offsets": offsets, "eager_us": round(eager_route_us, 1),
                   "custom_ops_us": round(custom_ops_us, 1), "graph_replay_us": "", "load_avg_1m": round(load, 2)}
            if device == "cuda":
                try:
                    row["graph_replay_us"] = round(time_graph_replay(loss_fn, calls), 1)
                except Exception as exc:  # a backend that cannot be captured says so here
                    row["graph_replay_us"] = f"capture failed: {type(exc).__name__}: {exc}"[:200]
            yield row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.host_overhead", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(1)
    out = args.out or RESULTS_DIR / ("cpu" if args.device == "cpu" else "cuda")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for row in measure(args.device, args.calls):
        rows.append(row)
        markdown = write_tables(out, args.device, args.calls, rows)  # after every row: a stopped run keeps them
    if not rows:
        print(f"no backend to time on {args.device}", file=sys.stderr)
        return 1
    print(markdown)
    return 0


def write_tables(out: Path, device: str, calls: int, rows) -> str:
    """host_overhead.csv and host_overhead.md in `out`; returns the markdown."""
    with open(out / "host_overhead.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    header = (f"# Host overhead of one BIMILoss call (forward + backward)\n\n"
              f"Device {device_name(device)}; torch {torch.__version__}; triton {triton_version()}; commit {git_commit()}; "
              f"maps {SHAPE} (the kernels' time is nil); median of 7 batches of {calls} calls; "
              f"`python -m benchmarks.host_overhead --device {device}`.\n\n"
              "'eager': what an eager call costs (the ops' eager route); 'through the custom ops': the "
              "same calls with `bimi_kernels.ops.EAGER_ROUTE = False`, their batches interleaved with "
              "the eager ones; the CUDA-graph replay is of the eager call.\n\n"
              "| backend | offsets | eager us/call | through the custom ops us/call | CUDA-graph replay us/call "
              "| load (1 min) |\n|---|---|---|---|---|---|\n")
    lines = [f"| {r['backend']} | {r['offsets']} | {r['eager_us']} | {r['custom_ops_us']} | "
             f"{r['graph_replay_us'] or '—'} | {r['load_avg_1m']} |" for r in rows]
    markdown = header + "\n".join(lines) + "\n"
    (out / "host_overhead.md").write_text(markdown)
    return markdown


if __name__ == "__main__":
    raise SystemExit(main())
