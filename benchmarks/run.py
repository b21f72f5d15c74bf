"""Benchmark every provider of the BIMI loss ops: time, peak extra memory, the roofline and the
ratios to the peers, as CSV, markdown and PNG plots.

    python -m benchmarks.run [--suite full|quick|smoke | --quick] [--device cpu|cuda] [--out DIR]
                             [--op OP ...] [--mode MODE ...] [--providers P ...] [--group G ...]
                             [--threads N|all] [--no-memory] [--max-call-seconds S]

Writes DIR/results.csv (one `schema.Row` per measurement, skipped ones with the reason),
DIR/summary.md and DIR/plots/*.png; DIR defaults to results/benchmarks/<device>[-<suite>].
CPU runs use 1 torch thread unless `--threads` says otherwise. `main(argv)` is what
`python -m bimi_kernels bench` calls. How time and memory are measured: benchmarks/measure.py;
what is measured: benchmarks/configs.py; who computes it: benchmarks/providers.py.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from . import measure, report
from .configs import ALWAYS_MEASURED, GROUPS, TIMING, BenchConfig, TimingPolicy, configs_for
from .providers import PACKAGE_PROVIDERS, PROVIDER_ORDER, PROVIDERS
from .roofline import offset_set
from .schema import RunInfo, new_row, write_csv
from .workloads import MAP_OPS, MODES, OP_SPECS, OPS, estimate_peak_bytes, make_inputs, max_rel_diff, mode_callable

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "results" / "benchmarks"


# ------------------------------------------------------------------------------------------------
# the environment
# ------------------------------------------------------------------------------------------------
def device_name(device_type: str) -> str:
    if device_type == "cuda":
        return torch.cuda.get_device_name()
    from bimi_kernels.native import processor_name

    return f"{processor_name()}, {os.cpu_count()} logical cores"


def git_commit() -> str:
    """HEAD, with '+dirty' when the package's own sources differ from it. Where the tree has no
    git metadata (a copied tree on a remote GPU machine), BIMI_BENCH_COMMIT names the commit."""
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
    import bimi_kernels

    folder = os.path.dirname(bimi_kernels.__file__)
    builds = []
    for path in sorted(glob.glob(os.path.join(folder, "_C*.so"))):
        built = datetime.datetime.fromtimestamp(os.path.getmtime(path), datetime.timezone.utc)
        builds.append(f"{os.path.basename(path).split('.')[0]} built {built.isoformat(timespec='seconds')}")
    if not builds:
        return "no compiled extension"
    from bimi_kernels.native import cpu_isa

    return "; ".join(builds) + f"; C++ CPU loops: {cpu_isa() or 'not loaded'} build"


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


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------------------------
# budgets: what is skipped before it is tried
# ------------------------------------------------------------------------------------------------
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
    work = OP_SPECS[op].work(config)
    if config.group not in ALWAYS_MEASURED:
        predicted = cost_model.predict((provider.name, op, mode, len(config.spatial)), work)
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


# ------------------------------------------------------------------------------------------------
# one (config, op, mode): every provider
# ------------------------------------------------------------------------------------------------
def measure_group(rows: dict, config, inputs, op, mode, device_type, policy, threads, cost_model,
                  memory_server, timer) -> None:
    """Measure every provider in `rows` ({name: Row}, reference first) for one config, op and
    mode: warm up and check each, time them interleaved, then measure each one's memory. Fills
    the rows; a provider that fails or would not fit gets a skipped reason. Never raises."""
    fns, reference_result = {}, None
    for name, row in rows.items():
        provider = PROVIDERS[name]
        reason = _budget_reason(config, provider, op, mode, device_type, policy, cost_model)
        if reason:
            row.skipped_reason = reason
            continue
        try:
            fn = mode_callable(provider, op, mode, inputs)
            first, result = measure.timed_call(fn, device_type)
            row.first_call_s = first
            if name == "reference":
                reference_result = tuple(t.detach() for t in result)
            elif reference_result is not None and provider.checked:
                row.check_max_rel_diff = max_rel_diff(result, reference_result)
            result = None
            for _ in range(policy.warmup_calls - 1):
                measure.timed_call(fn, device_type)
            if first > 2 * policy.max_call_seconds:
                second, _ = measure.timed_call(fn, device_type)
                if second > policy.max_call_seconds:
                    # too slow to repeat (twice: a first call can be slow for one-off reasons)
                    _set_time(row, [second])
                    row.add_note(f"one timed call only, not interleaved (first {first:.1f} s, "
                                 f"second {second:.1f} s > budget)")
                    fns[name] = fn
                    continue
            fns[name] = fn
        except Exception as exc:  # a provider that fails is reported, not fatal
            row.skipped_reason = _failure(exc)
    reference_result = None
    to_repeat = {name: fn for name, fn in fns.items() if rows[name].time_median_s is None}
    load_start = measure.load_average()
    try:
        samples = measure.time_interleaved(to_repeat, timer, policy)
    except Exception as exc:
        for name in to_repeat:
            rows[name].skipped_reason = _failure(exc)
        samples = {}
    load_end = measure.load_average()
    for name, seconds in samples.items():
        _set_time(rows[name], seconds)
    for name, fn in fns.items():
        row = rows[name]
        if row.skipped_reason:
            continue
        row.load_avg_1m_start, row.load_avg_1m_end = load_start, load_end
        cost_model.add((name, op, mode, len(config.spatial)), OP_SPECS[op].work(config), row.time_median_s)
        if mode != "forward" and op != "train_step":
            row.grad_bytes = inputs.grad_bytes()
        if memory_server is not None:
            _measure_memory(row, fn, config, name, op, mode, device_type, threads, memory_server)
    fns.clear()
    if device_type == "cuda":
        torch.cuda.empty_cache()


def _set_time(row, seconds) -> None:
    for key, value in measure.summarize(seconds).items():
        setattr(row, key, value)


def _measure_memory(row, fn, config, name, op, mode, device_type, threads, memory_server) -> None:
    try:
        if device_type == "cuda":
            row.peak_extra_bytes = measure.gpu_peak_extra_bytes(fn)
            row.memory_method = measure.GPU_MEMORY_METHOD
        else:
            timeout = 60 + 20 * (row.first_call_s + row.time_median_s)
            peak, error = memory_server.peak_extra_bytes(config, name, op, mode, threads, timeout)
            row.memory_method = measure.CPU_MEMORY_METHOD
            if peak is None:
                row.add_note(f"memory not measured: {error}")
            else:
                row.peak_extra_bytes = peak
    except Exception as exc:
        row.add_note(f"memory not measured: {_failure(exc)}")
    if row.peak_extra_bytes is not None and row.grad_bytes is not None:
        # RSS is page-granular and small buffers reuse heap pages: never below 0
        row.peak_extra_minus_grads_bytes = max(0, row.peak_extra_bytes - row.grad_bytes)


# ------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------
def resolve_threads(requested, device_type: str) -> int:
    """1 by default on CPU (target checks are timed on one thread unless asked otherwise); on a
    GPU torch's own default (the host threads only launch kernels)."""
    if requested == "all":
        return os.cpu_count() or 1
    if requested is not None:
        return int(requested)
    return 1 if device_type == "cpu" else torch.get_num_threads()


def run(args) -> list:
    device_type = args.device
    suite = "quick" if args.quick else args.suite
    policy = TIMING[(device_type, suite)]
    configs = [c for c in configs_for(suite, device_type) if not args.group or c.group in args.group]
    if not configs:  # nothing to measure: stop before writing an empty report
        raise SystemExit(f"benchmarks: the {suite} suite on {device_type} has no config in the "
                         f"groups {' '.join(args.group)}")
    if args.max_call_seconds is not None:
        policy = TimingPolicy(**{**policy.__dict__, "max_call_seconds": args.max_call_seconds})
    threads = resolve_threads(args.threads, device_type)
    torch.set_num_threads(threads)
    memory = policy.measure_memory and not args.no_memory
    info = RunInfo(git_commit=git_commit(), device_type=device_type, device_name=device_name(device_type),
                   torch_version=torch.__version__, triton_version=triton_version(),
                   num_threads=torch.get_num_threads(), suite=suite, command=args.command,
                   native_build=native_build(), tf32=tf32_flags(device_type))
    unavailable = {name: PROVIDERS[name].unavailable(device_type) for name in PROVIDER_ORDER}
    providers = [p for p in PROVIDER_ORDER if p in (args.providers or PROVIDER_ORDER)]
    print(f"benchmarks: {suite} suite on {info.device_name} ({threads} threads), {len(configs)} "
          f"configs, providers {providers}", flush=True)
    for name in providers:
        if unavailable[name]:
            print(f"  {name}: not benchmarked: {unavailable[name]}", flush=True)
    warm_up_package(providers, unavailable, device_type)
    memory_server = None
    if memory:
        memory_server = measure.MemoryServer() if device_type == "cpu" else "in-process"
    try:
        return _run_configs(args, configs, providers, unavailable, info, policy, threads, memory_server)
    finally:
        if isinstance(memory_server, measure.MemoryServer):
            memory_server.close()


def warm_up_package(providers, unavailable, device_type) -> None:
    """One tiny call per op and available backend before anything is timed: the first call of the
    custom ops imports torch._dynamo and registers kernels (seconds), which no measurement should
    carry (each one has its own warm-up calls as well)."""
    tiny = BenchConfig("warm-up", 1, 3, (8, 8), 1, window=3)
    inputs = make_inputs(tiny, device_type)
    for name in providers:
        if name in PACKAGE_PROVIDERS and unavailable[name] is None:
            for op in MAP_OPS:
                mode_callable(PROVIDERS[name], op, "forward+backward", inputs)()


class Interrupted(Exception):
    """The run was stopped (Ctrl-C, or a time limit's SIGINT): the rows of the groups measured so
    far, to write and render like a whole run's."""

    def __init__(self, rows):
        super().__init__(f"interrupted after {len(rows)} rows")
        self.rows = rows


def _run_configs(args, configs, providers, unavailable, info, policy, threads, memory_server) -> list:
    rows = []
    try:
        _measure_configs(rows, args, configs, providers, unavailable, info, policy, threads,
                         memory_server)
    except KeyboardInterrupt:
        print(f"benchmarks: interrupted; writing the {len(rows)} rows measured so far", flush=True)
        raise Interrupted(rows) from None
    return rows


def _measure_configs(rows, args, configs, providers, unavailable, info, policy, threads,
                     memory_server) -> None:
    """Appends to `rows` one group (config, op, mode: every provider) at a time."""
    cost_model, started = CostModel(), time.perf_counter()
    timer = measure.Timer(info.device_type)
    for config in configs:
        inputs = make_inputs(config, info.device_type)
        num_offsets = len(offset_set(config))
        for op in [op for op in config.ops if op in (args.op or OPS)]:
            for mode in [m for m in config.modes if (not args.mode or m in args.mode)
                         and m in OP_SPECS[op].modes]:
                group_rows, measured = [], {}
                for name in providers:
                    provider = PROVIDERS[name]
                    if op not in provider.ops or (config.providers and name not in config.providers):
                        continue
                    row = new_row(info, now(), config, provider, op, mode, num_offsets)
                    row.input_bytes = inputs.input_bytes(op)
                    if unavailable[name]:
                        row.skipped_reason = f"backend not available: {unavailable[name]}"
                    else:
                        row.skipped_reason = provider.why_not(op, config)
                    group_rows.append(row)
                    if not row.skipped_reason:
                        measured[name] = row
                measure_group(measured, config, inputs, op, mode, info.device_type, policy, threads,
                              cost_model, memory_server, timer)
                rows.extend(group_rows)
                for row in group_rows:
                    _print_row(row, time.perf_counter() - started)
        del inputs
        if args.out:
            _write(rows, args.out, partial=True)


def _print_row(row, elapsed):
    head = f"[{elapsed:6.0f}s] {row.config:<36} {row.op:<12} {row.mode:<16} {row.provider:<18}"
    if row.skipped_reason:
        print(f"{head} skipped: {row.skipped_reason}", flush=True)
        return
    text = (f"{head} {row.time_median_s * 1e3:9.3f} ms "
            f"[{row.time_p20_s * 1e3:.3f}, {row.time_p80_s * 1e3:.3f}] x{row.repeats} "
            f"load {row.load_avg_1m_start}-{row.load_avg_1m_end}")
    if row.peak_extra_bytes is not None:
        text += f"  peak +{row.peak_extra_bytes / 2**20:.2f} MiB"
    if row.check_max_rel_diff is not None:
        text += f"  diff {row.check_max_rel_diff:.1e}"
    if row.note:
        text += f"  ({row.note})"
    print(text, flush=True)


def _write(rows, out_dir, partial=False):
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report.add_derived(rows)
    write_csv(rows, out / "results.csv")
    if not partial:
        # the tables from the CSV as written (6 significant digits), so that
        # `python -m benchmarks.report DIR` re-renders them to the last digit
        report.render(out)


def default_out(device_type: str, suite: str, filtered: bool = False) -> Path:
    """results/benchmarks/cpu, results/benchmarks/cuda-h200, ... with -<suite> unless full, and
    -partial for a run limited by --op/--mode/--providers/--group (so that it never replaces a
    whole suite's committed results with a subset)."""
    if device_type == "cpu":
        folder = "cpu"
    else:
        slug = "".join(c if c.isalnum() else "-" for c in device_name(device_type).lower())
        folder = "cuda-" + "-".join(part for part in slug.split("-") if part and part != "nvidia")
    if suite != "full":
        folder += f"-{suite}"
    return RESULTS_DIR / (folder + "-partial" if filtered else folder)


def parse_args(argv=None, prog="python -m benchmarks.run"):
    parser = argparse.ArgumentParser(prog=prog, description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--quick", action="store_true", help="the quick suite (= --suite quick)")
    parser.add_argument("--suite", choices=("full", "quick", "smoke"), default="full")
    parser.add_argument("--op", nargs="+", choices=OPS, help="only these ops (default: each config's)")
    parser.add_argument("--mode", nargs="+", choices=MODES, help="only these modes (default: each config's)")
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", help="output folder (default results/benchmarks/<device>[-<suite>], "
                        "with -partial added when --op/--mode/--providers/--group limit the run)")
    parser.add_argument("--providers", nargs="+", choices=PROVIDER_ORDER, help="only these providers")
    parser.add_argument("--group", nargs="+", choices=GROUPS, help="only these config groups")
    parser.add_argument("--threads", help="torch.set_num_threads: a number or 'all' (default 1 on "
                        "CPU, so that ratios do not depend on what else the machine runs)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    parser.add_argument("--max-call-seconds", type=float, help="override the per-call time budget")
    args = parser.parse_args(argv)
    if args.max_call_seconds is not None and not args.max_call_seconds > 0:
        parser.error(f"--max-call-seconds: expected a positive number, got {args.max_call_seconds}")
    if args.threads is not None and args.threads != "all" and not (args.threads.isdigit() and int(args.threads) > 0):
        parser.error(f"--threads: expected a positive number or 'all', got {args.threads!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    from bimi_kernels.native import cpu_isa

    try:
        cpu_isa()  # every cpp provider would raise on a BIMI_CPU_ISA its loops refuse
    except ValueError as exc:
        parser.error(str(exc))
    return args


def main(argv=None, prog="python -m benchmarks.run") -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv, prog)
    args.command = " ".join([prog] + argv)
    suite = "quick" if args.quick else args.suite
    filtered = any((args.op, args.mode, args.providers, args.group))
    args.out = args.out or str(default_out(args.device, suite, filtered))
    try:
        rows, interrupted = run(args), False
    except Interrupted as stop:
        rows, interrupted = stop.rows, True
    if interrupted and not rows:  # stopped before a group was measured: nothing to write
        return 130
    _write(rows, args.out)
    measured = sum(1 for r in rows if r.measured)
    print(f"benchmarks: {measured} measured, {len(rows) - measured} skipped; wrote "
          f"{args.out}/results.csv, summary.md, plots/" + (" (interrupted)" if interrupted else ""),
          flush=True)
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
