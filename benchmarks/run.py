"""Benchmark every provider of the BIMI loss ops: time and peak extra memory, as CSV, markdown
and PNG plots.

    python -m benchmarks.run [--quick] [--op OP ...] [--device cpu|cuda] [--out DIR]
                             [--providers P ...] [--mode MODE ...] [--group G ...] [--threads N]

Writes DIR/results.csv (one row per measurement, skipped ones included with the reason),
DIR/summary.md and DIR/plots/*.png. `main(argv)` is what `python -m bimi_kernels bench` calls.
See benchmarks/measure.py for how time and memory are measured.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from . import measure
from .configs import TIMING, configs_for, gpu_peaks
from .providers import (ALL_PROVIDERS, BACKEND_PROVIDERS, MODES, OPS, applicable, describe,
                        estimate_peak_bytes, make_inputs, mode_callable, num_offsets,
                        package_backend_reasons, roofline_bytes_flops, skip_reason, work_units)

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"

COLUMNS = (
    "timestamp", "git_commit", "device_type", "device_name", "torch_version", "triton_version",
    "num_threads", "load_avg_1m", "suite", "command", "native_build", "tf32",
    "config", "group", "label", "ndim", "batch", "clusters", "spatial", "radius", "num_offsets",
    "window", "dtype", "sweep_value",
    "provider", "provider_call", "op", "mode",
    "repeats", "time_median_s", "time_p20_s", "time_p80_s", "first_call_s",
    "input_bytes", "grad_bytes", "peak_extra_bytes", "peak_extra_minus_grads_bytes", "memory_method",
    "roofline_bytes", "roofline_flops", "roofline_bound_s", "roofline_fraction",
    "speedup_vs_iic_conv2d", "speedup_vs_reference", "memory_ratio_vs_reference",
    "check_max_rel_diff", "note", "skipped_reason",
)

ALWAYS_MEASURED = ("target", "authors")

# Reference first (the correctness check compares with its outputs), the IIC baseline second.
PROVIDER_ORDER = ("reference", "iic-conv2d", "unfold", "gemm", "voxelmorph-cc", "cpp", "triton", "cuda")


# ------------------------------------------------------------------------------------------------
# environment
# ------------------------------------------------------------------------------------------------
def device_name(device_type: str) -> str:
    if device_type == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} logical cores)"


def git_commit() -> str:
    """HEAD, with '+dirty' when the package's own sources differ from it. Where the tree has no
    git metadata (a copy on a lent GPU machine), BIMI_BENCH_COMMIT names the commit."""
    if os.environ.get("BIMI_BENCH_COMMIT"):
        return os.environ["BIMI_BENCH_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO_ROOT,
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                "bimi_kernels", "csrc", "setup.py"], cwd=REPO_ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def native_build() -> str:
    """The compiled extensions in the package folder and when each was built: the C++ kernels are
    rebuilt in place while people work, and the git commit alone does not say which build ran."""
    import glob

    import bimi_kernels

    folder = os.path.dirname(bimi_kernels.__file__)
    builds = []
    for path in sorted(glob.glob(os.path.join(folder, "_C*.so"))):
        built = datetime.datetime.fromtimestamp(os.path.getmtime(path), datetime.timezone.utc)
        builds.append(f"{os.path.basename(path).split('.')[0]} built {built.isoformat(timespec='seconds')}")
    return "; ".join(builds) or "no compiled extension"


def tf32_flags(device_type: str) -> str:
    """torch's TF32 switches, left at their defaults (what users get): on GPUs cuDNN convolutions
    run in TF32 by default, which sets the precision of the reference's box sums and of the
    conv-based peers, and so the size of the `check` column."""
    if device_type != "cuda":
        return ""
    return (f"cudnn.allow_tf32={torch.backends.cudnn.allow_tf32} "
            f"cuda.matmul.allow_tf32={torch.backends.cuda.matmul.allow_tf32}")


def triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "not installed"


# ------------------------------------------------------------------------------------------------
# one measurement
# ------------------------------------------------------------------------------------------------
def _max_rel_diff(result, expected) -> float:
    worst = 0.0
    for got, want in zip(result, expected):
        want = want.detach().double()
        scale = max(float(want.abs().max()), 1e-30)
        worst = max(worst, float((got.detach().double() - want).abs().max()) / scale)
    return worst


class CostModel:
    """Predicts a provider's seconds per call from its measured smaller configs in this run."""

    def __init__(self):
        self.seen = {}

    def add(self, key, work, seconds):
        self.seen.setdefault(key, []).append((work, seconds))

    def predict(self, key, work):
        smaller = [(w, s) for w, s in self.seen.get(key, ()) if w <= work]
        if not smaller:
            return None
        w, s = max(smaller)
        return s * work / w


def _memory_budget_bytes(device_type: str) -> int:
    if device_type == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return int(0.8 * free)
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(0.4 * int(line.split()[1]) * 1024)  # the machine is shared
    except OSError:
        pass
    return 4 << 30


def _budget_reason(config, provider, op, mode, device_type, policy, cost_model):
    """Why a measurement would run out of memory or take too long, or None."""
    # the target and authors' configs are always measured: they hold the headline ratios
    if config.group not in ALWAYS_MEASURED:
        predicted = cost_model.predict((provider, op, mode, len(config.spatial)), work_units(op, config))
        if predicted is not None and predicted > policy.max_call_seconds:
            return (f"too slow: ~{predicted:.1f} s per call extrapolated from smaller configs > "
                    f"budget {policy.max_call_seconds:.0f} s")
    estimate = estimate_peak_bytes(provider, op, mode, config)
    budget = _memory_budget_bytes(device_type)
    if estimate > budget:
        return f"would not fit: estimated peak {estimate / 2**30:.1f} GiB > budget {budget / 2**30:.1f} GiB"
    return None


def _failure(exc: BaseException) -> str:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return f"out of memory: {str(exc).splitlines()[0]}"
    return f"failed: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"


def measure_group(rows: dict, config, inputs, op, mode, device_type, policy, threads, cost_model,
                  memory_server) -> None:
    """Measure every provider in `rows` ({provider: row}, reference first) for one config, op and
    mode: warm-up and check each, time them interleaved, then measure each one's memory. Fills
    the rows; a provider that fails or would not fit gets a skipped reason. Never raises."""
    fns, reference_result = {}, None
    for provider, row in rows.items():
        reason = _budget_reason(config, provider, op, mode, device_type, policy, cost_model)
        if reason:
            row["skipped_reason"] = reason
            continue
        try:
            fn = mode_callable(provider, op, mode, inputs)
            first, result = measure.timed_call(fn, device_type)
            row["first_call_s"] = first
            if provider == "reference":
                reference_result = tuple(t.detach() for t in result)
            elif reference_result is not None:
                row["check_max_rel_diff"] = _max_rel_diff(result, reference_result)
            result = None
            for _ in range(policy.warmup_calls - 1):
                measure.timed_call(fn, device_type)
            if first > 2 * policy.max_call_seconds:
                second, _ = measure.timed_call(fn, device_type)
                if second > policy.max_call_seconds:
                    # too slow to repeat (twice: a first call can be slow for one-off reasons)
                    row.update(measure.summarize([second]))
                    row["note"] = (f"one timed call only (first {first:.1f} s, second {second:.1f} s "
                                   f"> budget)")
                    fns[provider] = fn
                    continue
            fns[provider] = fn
        except Exception as exc:  # a provider that fails is reported, not fatal
            row["skipped_reason"] = _failure(exc)
    reference_result = None
    to_repeat = {p: fn for p, fn in fns.items() if rows[p].get("time_median_s") is None}
    try:
        samples = measure.time_interleaved(to_repeat, device_type, policy)
    except Exception as exc:
        for provider in to_repeat:
            rows[provider]["skipped_reason"] = _failure(exc)
        samples = {}
    for provider, seconds in samples.items():
        rows[provider].update(measure.summarize(seconds))
    for provider, fn in fns.items():
        row = rows[provider]
        if row.get("skipped_reason"):
            continue
        cost_model.add((provider, op, mode, len(config.spatial)), work_units(op, config),
                       row["time_median_s"])
        if mode != "forward":
            row["grad_bytes"] = 2 * inputs.map_bytes()  # dL/dp1 and dL/dp2 in the maps' dtype
        if memory_server is None:
            continue
        try:
            if device_type == "cuda":
                row["peak_extra_bytes"] = measure.gpu_peak_extra_bytes(fn)
                row["memory_method"] = measure.GPU_MEMORY_METHOD
            else:
                timeout = 60 + 20 * (row["first_call_s"] + row["time_median_s"])
                peak, error = memory_server.peak_extra_bytes(config, provider, op, mode, threads, timeout)
                row["memory_method"] = measure.CPU_MEMORY_METHOD
                if peak is None:
                    row["note"] = (row.get("note", "") + f" memory not measured: {error}").strip()
                else:
                    row["peak_extra_bytes"] = peak
        except Exception as exc:
            row["note"] = (row.get("note", "") + f" memory not measured: {_failure(exc)}").strip()
        if row.get("peak_extra_bytes") is not None and row.get("grad_bytes") is not None:
            # RSS is page-granular and small buffers reuse heap pages: never below 0
            row["peak_extra_minus_grads_bytes"] = max(0, row["peak_extra_bytes"] - row["grad_bytes"])
    fns.clear()
    if device_type == "cuda":
        torch.cuda.empty_cache()


def _roofline(row, op, mode, config, device_type, device):
    if device_type != "cuda" or row.get("time_median_s") is None:
        return
    peaks = gpu_peaks(device)
    if peaks is None:
        row["note"] = (row.get("note", "") + " no roofline: unknown GPU peaks").strip()
        return
    bytes_moved, flops = roofline_bytes_flops(op, mode, config)
    bound = max(bytes_moved / peaks["bandwidth"], flops / peaks["flops"])
    row.update(roofline_bytes=bytes_moved, roofline_flops=flops, roofline_bound_s=bound,
               roofline_fraction=bound / row["time_median_s"])


# ------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------
def run(args) -> list:
    device_type = args.device
    suite = "quick" if args.quick else args.suite
    policy = TIMING[(device_type, suite)]
    if args.max_call_seconds is not None:
        policy = type(policy)(**{**policy.__dict__, "max_call_seconds": args.max_call_seconds})
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    memory = policy.measure_memory and not args.no_memory
    device = device_name(device_type)
    backend_reasons = package_backend_reasons(device_type)
    providers = [p for p in PROVIDER_ORDER if p in (args.providers or ALL_PROVIDERS)]
    configs = [c for c in configs_for(suite, device_type) if not args.group or c.group in args.group]
    environment = {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(), "device_type": device_type, "device_name": device,
        "torch_version": torch.__version__, "triton_version": triton_version(),
        "num_threads": torch.get_num_threads(), "suite": suite, "command": args.command,
        "native_build": native_build(), "tf32": tf32_flags(device_type),
    }
    print(f"benchmarks: {suite} suite on {device} ({threads} threads), {len(configs)} configs, "
          f"providers {providers}", flush=True)
    for name in BACKEND_PROVIDERS:
        if name in providers and backend_reasons.get(name):
            print(f"  {name}: not benchmarked: {backend_reasons[name]}", flush=True)
    warm_up_package(providers, backend_reasons, device_type)
    memory_server = None
    if memory:
        memory_server = measure.MemoryServer() if device_type == "cpu" else "in-process"
    try:
        return _run_configs(args, configs, providers, backend_reasons, device_type, policy, threads,
                            environment, memory_server)
    finally:
        if isinstance(memory_server, measure.MemoryServer):
            memory_server.close()


def warm_up_package(providers, backend_reasons, device_type) -> None:
    """One tiny call per op and available backend before anything is timed: the first call of the
    custom ops imports torch._dynamo and registers kernels (seconds), which no measurement should
    carry (each one has its own warm-up calls as well)."""
    from .configs import BenchConfig

    tiny = BenchConfig("warm-up", 1, 3, (8, 8), 1, window=3)
    inputs = make_inputs(tiny, device_type)
    for provider in providers:
        if provider in BACKEND_PROVIDERS and backend_reasons.get(provider) is None:
            for op in OPS:
                mode_callable(provider, op, "forward+backward", inputs)()


def _run_configs(args, configs, providers, backend_reasons, device_type, policy, threads,
                 environment, memory_server) -> list:
    rows, cost_model, started = [], CostModel(), time.perf_counter()
    for config in configs:
        inputs = make_inputs(config, device_type)
        ops = [op for op in config.ops if op in (args.op or OPS)]
        modes = [m for m in config.modes if not args.mode or m in args.mode]
        for op in ops:
            for mode in modes:
                mode_rows, group_rows = [], {}
                for provider in providers:
                    if not applicable(provider, op):
                        continue
                    row = dict(environment)
                    row.update(
                        timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                        load_avg_1m=round(os.getloadavg()[0], 2),
                        config=config.name, group=config.group, label=config.label,
                        ndim=len(config.spatial), batch=config.batch, clusters=config.clusters,
                        spatial="x".join(map(str, config.spatial)), radius=config.radius,
                        num_offsets=num_offsets(config), window=config.window, dtype=config.dtype,
                        sweep_value=config.sweep_value, provider=provider,
                        provider_call=describe(provider), op=op, mode=mode,
                        input_bytes=inputs.input_bytes(op),
                    )
                    row["skipped_reason"] = skip_reason(provider, op, config, backend_reasons)
                    mode_rows.append(row)
                    if not row["skipped_reason"]:
                        group_rows[provider] = row
                measure_group(group_rows, config, inputs, op, mode, device_type, policy, threads,
                              cost_model, memory_server)
                rows.extend(mode_rows)
                for row in mode_rows:
                    _roofline(row, op, mode, config, device_type, environment["device_name"])
                    _print_row(row, time.perf_counter() - started)
        del inputs
        if args.out:
            _write(rows, args.out, partial=True)
    return rows


def _print_row(row, elapsed):
    head = f"[{elapsed:6.0f}s] {row['config']:<34} {row['op']:<12} {row['mode']:<16} {row['provider']:<13}"
    if row.get("skipped_reason"):
        print(f"{head} skipped: {row['skipped_reason']}", flush=True)
        return
    text = (f"{head} {row['time_median_s'] * 1e3:9.2f} ms "
            f"[{row['time_p20_s'] * 1e3:.2f}, {row['time_p80_s'] * 1e3:.2f}] x{row['repeats']}")
    if row.get("peak_extra_bytes") is not None:
        text += f"  peak +{row['peak_extra_bytes'] / 2**20:.2f} MiB"
    if row.get("check_max_rel_diff") is not None:
        text += f"  diff {row['check_max_rel_diff']:.1e}"
    if row.get("note"):
        text += f"  ({row['note']})"
    print(text, flush=True)


def _write(rows, out_dir, partial=False):
    from . import report  # matplotlib only when writing

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report.add_ratios(rows)
    report.write_csv(rows, out / "results.csv", COLUMNS)
    if not partial:
        report.write_markdown(rows, out / "summary.md")
        report.write_plots(rows, out / "plots")


def default_out(device_type: str, suite: str) -> Path:
    folder = "cpu" if device_type == "cpu" else "gpu-" + "".join(
        c if c.isalnum() else "-" for c in device_name(device_type).lower()).strip("-")
    return RESULTS_DIR / (folder if suite == "full" else f"{folder}-{suite}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the quick suite (a few minutes on 2 cores)")
    parser.add_argument("--suite", choices=("full", "quick", "smoke"), default="full")
    parser.add_argument("--op", nargs="+", choices=OPS, help="only these ops (default: all)")
    parser.add_argument("--mode", nargs="+", choices=MODES, help="only these modes (default: each config's)")
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", help="output folder (default benchmarks/results/<device>[-<suite>])")
    parser.add_argument("--providers", nargs="+", choices=ALL_PROVIDERS, help="only these providers")
    parser.add_argument("--group", nargs="+", help="only these config groups (target, authors, size, "
                        "clusters, radius, batch, volume)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: all cores)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    parser.add_argument("--max-call-seconds", type=float, help="override the per-call time budget")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    args.command = " ".join(["python -m benchmarks.run"] + argv)
    suite = "quick" if args.quick else args.suite
    args.out = args.out or str(default_out(args.device, suite))
    rows = run(args)
    _write(rows, args.out)
    measured = sum(1 for r in rows if not r.get("skipped_reason"))
    print(f"benchmarks: {measured} measured, {len(rows) - measured} skipped; wrote "
          f"{args.out}/results.csv, summary.md, plots/", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
