"""Turn benchmark rows into a markdown summary and PNG plots, with the derived columns (roofline,
ratios, the loss's share of a training step) and the target checks.

    python -m benchmarks.report DIR   # re-derive DIR/results.csv, rewrite DIR/summary.md and DIR/plots/

Re-rendering never changes what was measured (times, memory, checks); it recomputes what is
derived from them with the current roofline model and peaks.
"""
from __future__ import annotations

import argparse
import sys
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .providers import NATIVE, NATIVE_FOR_DEVICE, PROVIDER_ORDER
from .roofline import device_peaks, roofline
from .schema import read_csv, write_csv
from .workloads import OP_SPECS

MIB = 2**20
SWEEPS = OrderedDict(size="H = W (pixels)", clusters="clusters K", radius="window radius r",
                     batch="batch B")
BASELINES = (("reference", "speedup_vs_reference"), ("unfold", "speedup_vs_unfold"),
             ("iic-conv2d", "speedup_vs_iic_conv2d"))
PROVIDER_COLORS = {"reference": "tab:blue", "reference-autograd": "tab:cyan", "iic-conv2d": "tab:orange",
                   "unfold": "tab:green", "gemm": "tab:purple", "voxelmorph-cc": "tab:brown",
                   "unet-only": "tab:gray", "cpp": "tab:red", "triton": "tab:pink", "cuda": "tab:olive"}


# ------------------------------------------------------------------------------------------------
# derived columns
# ------------------------------------------------------------------------------------------------
def add_derived(rows) -> None:
    """Fill the roofline, ratio and share fields from the measured ones (same config, op and mode
    of the same run for the ratios)."""
    by_key = {(r.config, r.op, r.mode, r.provider): r for r in rows if r.measured}
    for row in rows:
        for _, column in BASELINES:
            setattr(row, column, None)
        row.memory_ratio_vs_reference = row.share_of_train_step = None
        for field in ("min_bytes", "min_flops", "achieved_bytes_per_s", "achieved_flops_per_s",
                      "roofline_bound_s", "roofline_fraction", "roofline_bound_tensor_s",
                      "roofline_fraction_tensor"):
            setattr(row, field, None)
        if not row.measured:
            continue
        for baseline, column in BASELINES:
            base = by_key.get((row.config, row.op, row.mode, baseline))
            if base is not None:
                setattr(row, column, base.time_median_s / row.time_median_s)
        base = by_key.get((row.config, row.op, row.mode, "reference"))
        if base is not None and base.peak_extra_bytes and row.peak_extra_bytes is not None:
            row.memory_ratio_vs_reference = row.peak_extra_bytes / base.peak_extra_bytes
        step = by_key.get((row.config, "train_step", "forward+backward", row.provider))
        if row.op == "bimi" and row.mode == "forward+backward" and step is not None:
            row.share_of_train_step = row.time_median_s / step.time_median_s
        bounds = OP_SPECS[row.op].bounds
        if bounds is not None:
            config = row.bench_config()
            line = roofline(bounds(config, row.mode), config, row.time_median_s,
                            device_peaks(row.device_type, row.device_name))
            row.min_bytes, row.min_flops = line.min_bytes, line.min_flops
            row.achieved_bytes_per_s = line.min_bytes / row.time_median_s
            row.achieved_flops_per_s = line.min_flops / row.time_median_s
            row.roofline_bound_s, row.roofline_fraction = line.bound_s, line.fraction
            row.roofline_bound_tensor_s, row.roofline_fraction_tensor = line.bound_tensor_s, line.fraction_tensor


# ------------------------------------------------------------------------------------------------
# the targets
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    device_type: str
    group: str  # the rows: this config group, op, forward+backward, float32 ...
    op: str
    radius: Optional[int]  # ... this window radius (None: any)
    clusters: Optional[int]  # ... this K (None: any)
    metric: str  # see `_metric`
    bound: float
    providers: tuple = ()  # default: the device's native backends


TARGETS = (
    Target("cpu", "target", "joint_counts", 1, 10, "speedup_vs_iic_conv2d", 5.0),
    Target("cpu", "target", "joint_counts", 3, 10, "speedup_vs_iic_conv2d", 4.0),
    Target("cpu", "target", "joint_counts", 1, 10, "extra_over_inputs", 0.10),
    Target("cpu", "target", "joint_counts", 3, 10, "extra_over_inputs", 0.10),
    Target("cpu", "target", "boundary", 1, 10, "speedup_vs_reference", 10.0),
    Target("cpu", "target", "boundary", 1, 10, "extra_over_inputs", 0.10),
    Target("cuda", "target", "joint_counts", 1, 10, "time_ms", 0.3),
    Target("cuda", "target", "joint_counts", 3, 10, "time_ms", 1.0),
    Target("cuda", "target", "joint_counts", 1, 10, "roofline", 0.20),
    Target("cuda", "target", "joint_counts", 3, 10, "roofline", 0.20),
    Target("cuda", "target", "joint_counts", 1, 40, "roofline", 0.20),
    Target("cuda", "target", "joint_counts", 1, 10, "speedup_vs_iic_conv2d", 5.0),
    Target("cuda", "target", "joint_counts", 3, 10, "speedup_vs_iic_conv2d", 5.0),
    Target("cuda", "target", "joint_counts", 1, 10, "extra_mib", 1.0),
    Target("cuda", "target", "joint_counts", 3, 10, "extra_mib", 1.0),
    Target("cuda", "target", "boundary", 1, 10, "time_ms", 0.3),
    Target("cuda", "target", "boundary", 1, 10, "memory_ratio_vs_reference", 0.25),
    Target("cuda", "training", "bimi", None, None, "share_of_train_step", 0.05),
    Target("cuda", "target", "joint_counts", 1, 10, "vs_triton", 2.0, ("cuda",)),
    Target("cuda", "target", "boundary", 1, 10, "vs_triton", 2.0, ("cuda",)),
)


def _extra_beyond_grads(row):
    """Peak extra memory beyond the gradients (forward: beyond nothing)."""
    if row.peak_extra_bytes is None:
        return None
    return row.peak_extra_minus_grads_bytes if row.peak_extra_minus_grads_bytes is not None else row.peak_extra_bytes


def _roofline_for_target(row):
    """The roofline a kernel is held to: FP32 FMAs below K=16, tensor cores (TF32) from K=16."""
    return row.roofline_fraction_tensor if row.clusters >= 16 else row.roofline_fraction


_REQUIREMENTS = {  # metric -> (what is required, comparison)
    "speedup_vs_iic_conv2d": ("speedup vs iic-conv2d", ">= {:g}x"),
    "speedup_vs_reference": ("speedup vs reference", ">= {:g}x"),
    "extra_over_inputs": ("peak extra beyond grads / inputs", "<= {:.0%}"),
    "extra_mib": ("peak extra beyond grads", "<= {:g} MiB"),
    "memory_ratio_vs_reference": ("peak extra / reference's", "<= {:g}"),
    "time_ms": ("median time", "<= {:g} ms"),
    "roofline": ("fraction of the roofline (FP32 below K=16, TF32 tensor cores from K=16)", ">= {:.0%}"),
    "share_of_train_step": ("whole loss (all heads, fwd+bwd) / U-Net training step", "< {:.0%}"),
    "vs_triton": ("time / Triton's", "<= {:g}x"),
}


def requirement(target: Target) -> tuple:
    """(what, required) in words."""
    r = f" r={target.radius}" if target.radius is not None else ""
    k = f" K={target.clusters}" if target.clusters not in (None, 10) else ""
    what, required = _REQUIREMENTS[target.metric]
    group = "" if target.group == "target" else f"{target.group} config, "
    return f"{group}{target.op} fwd+bwd{r}{k}: {what}", required.format(target.bound)


def evaluate(target: Target, row, rows) -> tuple:
    """(measured value in words, met) of one target on one measured row."""
    bound, metric = target.bound, target.metric
    if metric.startswith("speedup"):
        value = getattr(row, metric)
        return _ratio(value), value is not None and value >= bound
    if metric == "extra_over_inputs":
        extra = _extra_beyond_grads(row)
        if extra is None:
            return "—", False
        value = extra / row.input_bytes
        return f"{100 * value:.1f}% ({_mib(extra)} of {_mib(row.input_bytes)} MiB)", value <= bound
    if metric == "extra_mib":
        extra = _extra_beyond_grads(row)
        return ("—", False) if extra is None else (f"{_mib(extra)} MiB", extra <= bound * MIB)
    if metric == "memory_ratio_vs_reference":
        value = row.memory_ratio_vs_reference
        return _num(value), value is not None and value <= bound
    if metric == "time_ms":
        return f"{_ms(row.time_median_s)} ms", row.time_median_s * 1e3 <= bound
    if metric == "roofline":
        value = _roofline_for_target(row)
        return _pct(value), value is not None and value >= bound
    if metric == "share_of_train_step":
        value = row.share_of_train_step
        return _pct(value), value is not None and value < bound
    if metric == "vs_triton":
        triton = next((t for t in rows if t.measured and t.provider == "triton" and t.config == row.config
                       and t.op == row.op and t.mode == row.mode), None)
        value = None if triton is None else row.time_median_s / triton.time_median_s
        return ("—", False) if value is None else (f"{value:.2f}x", value <= bound)
    raise KeyError(metric)


def target_checks(rows) -> list:
    device_type = rows[0].device_type if rows else "cpu"
    lines = []
    for target in (t for t in TARGETS if t.device_type == device_type):
        what, required = requirement(target)
        providers = target.providers or NATIVE_FOR_DEVICE[device_type]
        for r in rows:
            if (r.group != target.group or r.op != target.op or r.mode != "forward+backward"
                    or r.dtype != "float32" or r.provider not in providers
                    or (target.radius is not None and r.radius != target.radius)
                    or (target.clusters is not None and r.clusters != target.clusters)):
                continue
            if not r.measured:
                reason = r.skipped_reason or ""
                if reason.startswith("backend not available"):
                    reason = "backend not available (see Skipped)"
                lines.append([what, r.provider, f"not measured: {reason}", required, "no", ""])
                continue
            text, met = evaluate(target, r, rows)
            lines.append([what, r.provider, text, required, "yes" if met else "no", _load(r)])
    if not lines:
        lines.append([f"no target config of this device was measured with "
                      f"{', '.join(NATIVE_FOR_DEVICE[device_type])}", "", "", "", "", ""])
    return _table(["requirement", "provider", "measured", "required", "met", "load (1 min)"], lines)


# ------------------------------------------------------------------------------------------------
# formatting
# ------------------------------------------------------------------------------------------------
def _ms(seconds) -> str:
    if seconds is None:
        return "—"
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def _ratio(value) -> str:
    return "—" if value is None else f"{value:.2f}x" if value < 10 else f"{value:.1f}x"


def _mib(nbytes) -> str:
    if nbytes is None:
        return "—"
    return f"{nbytes / MIB:.3g}" if abs(nbytes) < 100 * MIB else f"{nbytes / MIB:.0f}"


def _pct(value) -> str:
    return "—" if value is None else f"{100 * value:.3g}%"


def _num(value) -> str:
    return "—" if value is None else f"{value:.2f}"


def _load(row) -> str:
    if row.load_avg_1m_start is None:
        return "—"
    if row.load_avg_1m_end is None or row.load_avg_1m_end == row.load_avg_1m_start:
        return f"{row.load_avg_1m_start:.2f}"
    return f"{row.load_avg_1m_start:.2f}–{row.load_avg_1m_end:.2f}"


def _provider(row) -> str:
    return f"**{row.provider}**" if row.provider in NATIVE else row.provider


def _short(row) -> str:
    heads = f" {row.heads} heads" if row.heads != 1 else ""
    return f"B={row.batch} K={row.clusters} {row.spatial} {row.offsets} w={row.window}{heads}"


def _table(header, lines) -> list:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(str(c) for c in cells) + " |" for cells in lines]


def _results_table(rows, gpu: bool) -> list:
    header = ["config", "op", "mode", "provider", "median ms", "p20–p80 ms", "vs reference",
              "vs unfold", "vs iic-conv2d", "peak extra MiB", "beyond grads MiB"]
    header += ["% roofline FP32", "% roofline tensor"] if gpu else ["GB/s", "GFLOP/s"]
    header += ["load", "check"]
    lines = []
    for r in rows:
        if not r.measured:
            continue
        cells = [r.config, r.op, r.mode, _provider(r), _ms(r.time_median_s),
                 f"{_ms(r.time_p20_s)}–{_ms(r.time_p80_s)}", _ratio(r.speedup_vs_reference),
                 _ratio(r.speedup_vs_unfold), _ratio(r.speedup_vs_iic_conv2d), _mib(r.peak_extra_bytes),
                 _mib(_extra_beyond_grads(r)) if r.mode != "forward" and r.grad_bytes else ""]
        if gpu:
            cells += [_pct(r.roofline_fraction), _pct(r.roofline_fraction_tensor)]
        else:
            cells += [_rate(r.achieved_bytes_per_s), _rate(r.achieved_flops_per_s)]
        cells += [_load(r), "" if r.check_max_rel_diff is None else f"{r.check_max_rel_diff:.0e}"]
        lines.append(cells)
    return _table(header, lines)


def _rate(per_second) -> str:
    return "—" if per_second is None else f"{per_second / 1e9:.3g}"


def headline_rows(rows) -> list:
    """The target configs, forward+backward, float32, every op and measured provider."""
    return [r for r in rows if r.group == "target" and r.mode == "forward+backward"
            and r.dtype == "float32" and r.measured]


def pivot_table(rows) -> list:
    """The README table: one line per target config and op (forward+backward), the median time of
    every provider side by side, then each native backend's speedups, extra memory and the load."""
    headline = headline_rows(rows)
    if not headline:
        return []
    present = [p for p in PROVIDER_ORDER if any(r.provider == p for r in headline)]
    natives = [p for p in present if p in NATIVE]
    gpu = headline[0].device_type == "cuda"
    header = ["config", "op (fwd+bwd)"] + [f"{p} ms" for p in present]
    for native in natives:
        header += [f"{native} vs reference", f"{native} vs unfold", f"{native} vs iic-conv2d",
                   f"{native} extra MiB"] + ([f"{native} % roofline"] if gpu else [])
    header.append("load")
    lines = []
    for config, op in OrderedDict.fromkeys((r.config, r.op) for r in headline):
        by_provider = {r.provider: r for r in headline if r.config == config and r.op == op}
        any_row = next(iter(by_provider.values()))
        cells = [_short(any_row), op]
        cells += [_ms(by_provider[p].time_median_s) if p in by_provider else "—" for p in present]
        for native in natives:
            r = by_provider.get(native)
            width = 5 if gpu else 4
            if r is None:
                cells += ["—"] * width
                continue
            cells += [_ratio(r.speedup_vs_reference), _ratio(r.speedup_vs_unfold),
                      _ratio(r.speedup_vs_iic_conv2d), _mib(_extra_beyond_grads(r))]
            if gpu:
                cells.append(_pct(_roofline_for_target(r)))
        cells.append(_load(any_row))
        lines.append(cells)
    return _table(header, lines)


def roofline_table(rows) -> list:
    """This package's rows of the target, authors' and sparse configs with their bounds."""
    selected = [r for r in rows if r.measured and r.min_bytes is not None and r.provider in NATIVE + ("reference",)
                and r.group in ("target", "authors", "sparse") and r.mode == "forward+backward"]
    gpu = bool(selected) and selected[0].device_type == "cuda"
    header = ["config", "op", "mode", "provider", "median ms", "min MB moved", "min GFLOP", "GB/s", "GFLOP/s"]
    header += ["bound µs FP32", "% FP32", "bound µs tensor", "% tensor"] if gpu else []
    lines = []
    for r in selected:
        cells = [r.config, r.op, r.mode, _provider(r), _ms(r.time_median_s), f"{r.min_bytes / 1e6:.4g}",
                 f"{r.min_flops / 1e9:.4g}", _rate(r.achieved_bytes_per_s), _rate(r.achieved_flops_per_s)]
        if gpu:
            cells += [f"{r.roofline_bound_s * 1e6:.4g}" if r.roofline_bound_s else "—", _pct(r.roofline_fraction),
                      f"{r.roofline_bound_tensor_s * 1e6:.4g}" if r.roofline_bound_tensor_s else "—",
                      _pct(r.roofline_fraction_tensor)]
        lines.append(cells)
    return _table(header, lines) if lines else []


def training_table(rows) -> list:
    """Per provider: the whole loss of every head (fwd+bwd), the training step, the loss's share."""
    steps = [r for r in rows if r.op == "train_step" and r.measured]
    lines = []
    for step in steps:
        loss = next((r for r in rows if r.config == step.config and r.op == "bimi" and r.measured
                     and r.mode == "forward+backward" and r.provider == step.provider), None)
        lines.append([_short(step), _provider(step), _ms(loss.time_median_s) if loss else "—",
                      _ms(step.time_median_s), _pct(loss.share_of_train_step) if loss else "—",
                      _ratio(step.speedup_vs_reference), _load(step)])
    header = ["config", "loss provider", "loss fwd+bwd ms (all heads)", "training step ms",
              "loss / step", "step vs reference", "load"]
    return _table(header, lines) if lines else []


def write_markdown(rows, path) -> None:
    if not rows:
        Path(path).write_text("# Benchmarks\n\nNo rows.\n")
        return
    first = rows[0]
    gpu = first.device_type == "cuda"
    loads = [v for r in rows for v in (r.load_avg_1m_start, r.load_avg_1m_end) if v is not None]
    stamps = sorted(r.timestamp for r in rows)
    measured = [r for r in rows if r.measured]
    peaks = device_peaks(first.device_type, first.device_name)
    out = [f"# BIMI loss benchmarks: {first.device_name}", ""]
    out += [f"- device: **{first.device_name}** ({first.device_type}), {first.num_threads} torch thread{'s' if first.num_threads != 1 else ''}",
            f"- torch {first.torch_version}, triton {first.triton_version}, commit `{first.git_commit}`, "
            f"suite `{first.suite}`",
            f"- run {stamps[0]} to {stamps[-1]}; {len(measured)} measurements, "
            f"{len(rows) - len(measured)} skipped (reasons at the end)"]
    if first.command:
        out.append(f"- command: `{first.command}`")
    if first.native_build:
        out.append(f"- compiled kernels: {first.native_build} (the build that ran)")
    if loads:
        out.append(f"- 1-minute load average from {min(loads):.2f} to {max(loads):.2f}; each row "
                   "shows it before–after its interleaved rounds: compare ratios made under "
                   "low load")
    out += ["- time: median and 20th–80th percentile over repeats after warm-up, the providers of "
            "a row group interleaved round by round to the end "
            + ("(CUDA events, L2 flushed before each call)" if gpu else
               "(`time.perf_counter`, fixed `torch.set_num_threads`)"),
            f"- memory: {next((r.memory_method for r in rows if r.memory_method), 'not measured')}; "
            "'beyond grads' subtracts the two gradients (backward modes)",
            "- check: max |out - reference| / max |reference| of the output (forward), the "
            "gradients (backward modes) or the first step's loss (train_step) against the "
            "`reference` provider of the same run",
            "- providers: `reference`, `cpp`, `triton`, `cuda` are this package "
            "(`bimi_kernels.functional`, `backend=...`); the others are hand-written peers "
            "(benchmarks/providers.py)",
            "- roofline: lower bounds on bytes moved and flops per call (benchmarks/roofline.py); "
            + (f"peaks: {peaks.source}; '% FP32' = max(bytes / bandwidth, flops / FP32 rate) / "
               "median time, '% tensor' the same with the tensor-core rate of the maps' dtype"
               if peaks else "no recorded peaks for this device: the achieved rates min bytes / "
               "time (GB/s) and min flops / time (GFLOP/s) instead")]
    if gpu and first.tf32:
        out.append(f"- torch TF32 defaults kept: {first.tf32} (TF32 convolutions bound the "
                   "accuracy of the reference's box sums and of the conv peers: see `check`)")
    out += ["", "## Headline: the target configs, forward+backward", ""]
    out += pivot_table(rows) or ["No target config measured."]
    out += ["", "'extra MiB': peak extra memory beyond the inputs and the two gradients; "
            "'load': the 1-minute load average around the rounds.", "", "## Targets", ""]
    out += target_checks(rows)
    training = training_table(rows)
    if training:
        out += ["", "## The loss's share of a U-Net training step", "",
                "The demo's U-Net (bimi_kernels/demo/unet.py) over both views of the batch, 3 "
                "cluster heads, the BIMI loss averaged over the heads, backward, AdamW; "
                "`unet-only` replaces the loss by a stand-in of negligible cost.", ""]
        out += training
    line = roofline_table(rows)
    if line:
        out += ["", "## Roofline: this package on the target, authors' and sparse configs, forward+backward", ""] + line
    groups = OrderedDict()
    for r in rows:
        groups.setdefault((r.group, r.label), []).append(r)
    out += ["", "## All measurements", ""]
    for (group, label), group_rows in groups.items():
        if any(r.measured for r in group_rows):
            out += [f"### {group}: {label}", ""] + _results_table(group_rows, gpu) + [""]
    skipped = [r for r in rows if not r.measured]
    unavailable = OrderedDict()  # backends that do not serve this device: one line each
    for r in skipped:
        if (r.skipped_reason or "").startswith("backend not available"):
            unavailable.setdefault((r.provider, r.skipped_reason), []).append(r)
    skipped = [r for r in skipped if not (r.skipped_reason or "").startswith("backend not available")]
    if unavailable or skipped:
        out += ["## Skipped", ""]
        out += [f"- `{provider}` everywhere ({len(group)} rows): {reason}"
                for (provider, reason), group in unavailable.items()]
    if skipped:
        out += [""] + _table(["config", "op", "mode", "provider", "reason"],
                             [[r.config, r.op, r.mode, r.provider, (r.skipped_reason or "").replace("|", "/")]
                              for r in skipped])
    notes = [r for r in measured if r.note]
    if notes:
        out += ["", "## Notes", ""]
        out += [f"- {r.config} {r.op} {r.mode} {r.provider}: {r.note}" for r in notes]
    Path(path).write_text("\n".join(out) + "\n")


# ------------------------------------------------------------------------------------------------
# plots
# ------------------------------------------------------------------------------------------------
def _plot_mode(rows):
    modes = {r.mode for r in rows}
    return "forward+backward" if "forward+backward" in modes else sorted(modes)[0]


def write_plots(rows, folder) -> list:
    """One PNG per sweep (time and memory vs the swept value, one line per provider, one column
    per op), and one bar chart of the target configs. Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    measured = [r for r in rows if r.measured]
    device = rows[0].device_name if rows else ""
    for group, xlabel in SWEEPS.items():
        group_rows = [r for r in measured if r.group == group]
        if not group_rows:
            continue
        mode = _plot_mode(group_rows)
        group_rows = [r for r in group_rows if r.mode == mode]
        ops = list(OrderedDict.fromkeys(r.op for r in group_rows))
        figure, axes = plt.subplots(2, len(ops), figsize=(5.5 * len(ops), 8), squeeze=False)
        for column, op in enumerate(ops):
            op_rows = [r for r in group_rows if r.op == op]
            for provider in OrderedDict.fromkeys(r.provider for r in op_rows):
                points = sorted(((r.sweep_value, r) for r in op_rows if r.provider == provider),
                                key=lambda point: point[0])
                xs = [x for x, _ in points]
                style = dict(marker="o", linewidth=2.5 if provider in NATIVE else 1.2, label=provider,
                             color=PROVIDER_COLORS.get(provider))
                axes[0][column].plot(xs, [r.time_median_s * 1e3 for _, r in points], **style)
                memory = [(x, r.peak_extra_bytes / MIB) for x, r in points if r.peak_extra_bytes is not None]
                if memory:
                    axes[1][column].plot([x for x, _ in memory], [max(m, 1e-3) for _, m in memory], **style)
            for row_index, ylabel in ((0, "median time (ms)"), (1, "peak extra memory (MiB)")):
                axis = axes[row_index][column]
                axis.set_yscale("log")
                if group in ("size", "batch", "clusters"):
                    axis.set_xscale("log", base=2)
                axis.set_xlabel(xlabel)
                axis.set_ylabel(ylabel)
                axis.grid(True, which="both", alpha=0.3)
                axis.legend(fontsize=8)
            axes[0][column].set_title(f"{op}, {mode}")
        figure.suptitle(f"{group} sweep on {device}")
        figure.tight_layout()
        path = folder / f"sweep_{group}.png"
        figure.savefig(path, dpi=90)
        plt.close(figure)
        written.append(path)
    targets = headline_rows(rows)
    if targets:
        keys = list(OrderedDict.fromkeys((r.config, r.op) for r in targets))
        figure, axes = plt.subplots(len(keys), 1, figsize=(8, 1.0 + 0.45 * len(targets)), squeeze=False)
        for axis, (config, op) in zip(axes[:, 0], keys):
            bars = [r for r in targets if r.config == config and r.op == op]
            times = [r.time_median_s * 1e3 for r in bars]
            axis.barh([r.provider for r in bars], times,
                      color=["tab:red" if r.provider in NATIVE else "tab:gray" for r in bars])
            for y, value in enumerate(times):  # linear axis, labelled: the ratios read directly
                axis.text(value, y, f" {_ms(value / 1e3)} ms", va="center", fontsize=8)
            axis.set_xlim(0, max(times) * 1.25)
            axis.set_title(f"{config}: {op}, forward+backward", fontsize=9)
            axis.set_xlabel("median time (ms)")
            axis.grid(True, axis="x", alpha=0.3)
        figure.tight_layout()
        path = folder / "targets.png"
        figure.savefig(path, dpi=90)
        plt.close(figure)
        written.append(path)
    return written


def render(folder) -> None:
    """Re-derive and rewrite a results folder from its CSV."""
    folder = Path(folder)
    rows = read_csv(folder / "results.csv")
    add_derived(rows)
    write_csv(rows, folder / "results.csv")
    write_markdown(rows, folder / "summary.md")
    write_plots(rows, folder / "plots")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.report",
        description="Re-render DIR/summary.md and DIR/plots/ from DIR/results.csv (a benchmark run's folder).")
    parser.add_argument("folder", metavar="DIR", help="a folder written by python -m benchmarks.run")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if not (Path(args.folder) / "results.csv").is_file():
        parser.error(f"{args.folder}: no results.csv there (a folder written by python -m benchmarks.run)")
    render(args.folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
