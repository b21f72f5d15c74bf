"""Turn benchmark rows into a CSV, a markdown summary and PNG plots.

    python -m benchmarks.report DIR     # rewrite DIR/summary.md and DIR/plots/ from DIR/results.csv
"""
from __future__ import annotations

import csv
import sys
from collections import OrderedDict
from pathlib import Path

MIB = 2**20
NUMERIC = ("num_threads", "load_avg_1m", "ndim", "batch", "clusters", "radius", "num_offsets",
           "window", "sweep_value", "repeats", "time_median_s", "time_p20_s", "time_p80_s",
           "first_call_s", "input_bytes", "grad_bytes", "peak_extra_bytes",
           "peak_extra_minus_grads_bytes", "roofline_bytes", "roofline_flops", "roofline_bound_s",
           "roofline_fraction", "speedup_vs_iic_conv2d", "speedup_vs_reference",
           "memory_ratio_vs_reference", "check_max_rel_diff")
SWEEPS = OrderedDict(size="H = W (pixels)", clusters="clusters K", radius="window radius r",
                     batch="batch B")
NATIVE = ("cpp", "triton", "cuda")
NATIVE_FOR_DEVICE = {"cpu": ("cpp",), "cuda": ("triton", "cuda")}
PROVIDER_COLORS = {"reference": "tab:blue", "iic-conv2d": "tab:orange", "unfold": "tab:green",
                   "gemm": "tab:purple", "voxelmorph-cc": "tab:brown", "cpp": "tab:red",
                   "triton": "tab:pink", "cuda": "tab:olive"}

# The performance targets of the issues: (issue, device, config group, radius, op, what, bound).
# `what` is "speedup_vs_iic_conv2d" / "speedup_vs_reference" (>= bound), "extra_over_inputs"
# (peak extra beyond gradients / input bytes, <= bound), "extra_mib" (peak extra beyond
# gradients in MiB, <= bound) or "memory_ratio_vs_reference" (<= bound); mode forward+backward.
TARGETS = (
    ("issue 4", "cpu", 1, "joint_counts", "speedup_vs_iic_conv2d", 5.0),
    ("issue 4", "cpu", 3, "joint_counts", "speedup_vs_iic_conv2d", 4.0),
    ("issue 4", "cpu", 1, "joint_counts", "extra_over_inputs", 0.10),
    ("issue 4", "cpu", 3, "joint_counts", "extra_over_inputs", 0.10),
    ("issue 4", "cpu", 1, "boundary", "speedup_vs_reference", 10.0),
    ("issue 4", "cpu", 1, "boundary", "extra_over_inputs", 0.10),
    ("issue 3", "cuda", 1, "joint_counts", "speedup_vs_iic_conv2d", 5.0),
    ("issue 3", "cuda", 3, "joint_counts", "speedup_vs_iic_conv2d", 5.0),
    ("issue 3", "cuda", 1, "joint_counts", "extra_mib", 1.0),
    ("issue 3", "cuda", 3, "joint_counts", "extra_mib", 1.0),
    ("issue 3", "cuda", 1, "boundary", "speedup_vs_reference", 5.0),
    ("issue 3", "cuda", 1, "boundary", "memory_ratio_vs_reference", 0.25),
)


# ------------------------------------------------------------------------------------------------
# rows
# ------------------------------------------------------------------------------------------------
def _measured(row) -> bool:
    return not row.get("skipped_reason") and row.get("time_median_s") not in (None, "")


def add_ratios(rows) -> None:
    """Speedups against `iic-conv2d` and `reference`, and the memory ratio against `reference`,
    from the same run (same config, op and mode)."""
    by_key = {(r["config"], r["op"], r["mode"], r["provider"]): r for r in rows if _measured(r)}
    for row in rows:
        if not _measured(row):
            continue
        for baseline, column in (("iic-conv2d", "speedup_vs_iic_conv2d"),
                                 ("reference", "speedup_vs_reference")):
            base = by_key.get((row["config"], row["op"], row["mode"], baseline))
            row[column] = base["time_median_s"] / row["time_median_s"] if base else None
        base = by_key.get((row["config"], row["op"], row["mode"], "reference"))
        if base and base.get("peak_extra_bytes") and row.get("peak_extra_bytes") is not None:
            row["memory_ratio_vs_reference"] = row["peak_extra_bytes"] / base["peak_extra_bytes"]
        else:
            row["memory_ratio_vs_reference"] = None


def write_csv(rows, path, columns) -> None:
    def cell(value):
        if value is None:
            return ""
        if isinstance(value, float):
            return f"{value:.6g}"
        return value

    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: cell(row.get(c)) for c in columns})


def read_csv(path) -> list:
    rows = []
    with open(path, newline="") as handle:
        for raw in csv.DictReader(handle):
            row = {}
            for key, value in raw.items():
                if value == "":
                    row[key] = None
                elif key in NUMERIC:
                    number = float(value)
                    row[key] = int(number) if number.is_integer() and key not in (
                        "time_median_s", "time_p20_s", "time_p80_s", "load_avg_1m") else number
                else:
                    row[key] = value
            rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------
# markdown
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


def _extra_beyond_grads(row):
    """Peak extra memory beyond the gradients (forward: beyond nothing)."""
    if row.get("peak_extra_bytes") is None:
        return None
    if row.get("peak_extra_minus_grads_bytes") is not None:
        return row["peak_extra_minus_grads_bytes"]
    return row["peak_extra_bytes"]


def _results_table(rows, gpu: bool) -> list:
    header = ["config", "op", "mode", "provider", "median ms", "p20–p80 ms", "vs iic-conv2d",
              "vs reference", "peak extra MiB", "beyond grads MiB", "check"]
    if gpu:
        header.insert(-1, "roofline")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        if not _measured(r):
            continue
        cells = [r["config"], r["op"], r["mode"], f"**{r['provider']}**" if r["provider"] in NATIVE
                 else r["provider"], _ms(r["time_median_s"]),
                 f"{_ms(r['time_p20_s'])}–{_ms(r['time_p80_s'])}",
                 _ratio(r.get("speedup_vs_iic_conv2d")), _ratio(r.get("speedup_vs_reference")),
                 _mib(r.get("peak_extra_bytes")),
                 _mib(_extra_beyond_grads(r)) if r["mode"] != "forward" else "",
                 "" if r.get("check_max_rel_diff") is None else f"{r['check_max_rel_diff']:.0e}"]
        if gpu:
            fraction = r.get("roofline_fraction")
            cells.insert(-1, "—" if fraction is None else f"{100 * fraction:.1f}%")
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return lines


def headline_rows(rows) -> list:
    """The target configs, forward+backward, every op and measured provider."""
    return [r for r in rows if r["group"] == "target" and r["mode"] == "forward+backward"
            and r.get("dtype", "float32") == "float32" and _measured(r)]


def headline_table(rows) -> list:
    """Compact table for the README: one line per (config, op, provider)."""
    header = ["config", "op (fwd+bwd)", "provider", "median ms", "vs iic-conv2d", "vs reference",
              "peak extra beyond grads MiB"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in headline_rows(rows):
        short = f"B={r['batch']} K={r['clusters']} {r['spatial']} r={r['radius']}"
        provider = f"**{r['provider']}**" if r["provider"] in NATIVE else r["provider"]
        lines.append("| " + " | ".join([
            short, r["op"], provider, _ms(r["time_median_s"]), _ratio(r.get("speedup_vs_iic_conv2d")),
            _ratio(r.get("speedup_vs_reference")), _mib(_extra_beyond_grads(r))]) + " |")
    return lines


def pivot_table(rows) -> list:
    """The README table: one line per target config and op (forward+backward), the median time of
    every provider side by side, then each native backend's speedups and extra memory."""
    headline = headline_rows(rows)
    if not headline:
        return []
    order = ("reference", "iic-conv2d", "unfold", "gemm", "voxelmorph-cc", "cpp", "triton", "cuda")
    present = [p for p in order if any(r["provider"] == p for r in headline)]
    natives = [p for p in present if p in NATIVE]
    header = ["config", "op (fwd+bwd)"] + [f"{p} ms" for p in present]
    for native in natives:
        header += [f"{native} vs iic-conv2d", f"{native} vs reference", f"{native} extra MiB"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for config, op in OrderedDict.fromkeys((r["config"], r["op"]) for r in headline):
        by_provider = {r["provider"]: r for r in headline if r["config"] == config and r["op"] == op}
        any_row = next(iter(by_provider.values()))
        cells = [f"B={any_row['batch']} K={any_row['clusters']} {any_row['spatial']} r={any_row['radius']}", op]
        cells += [_ms(by_provider[p]["time_median_s"]) if p in by_provider else "—" for p in present]
        for native in natives:
            r = by_provider.get(native)
            cells += ["—", "—", "—"] if r is None else [
                _ratio(r.get("speedup_vs_iic_conv2d")), _ratio(r.get("speedup_vs_reference")),
                _mib(_extra_beyond_grads(r))]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def target_checks(rows) -> list:
    device_type = rows[0]["device_type"] if rows else "cpu"
    lines = ["| issue | requirement | provider | measured | required | met |", "|---|---|---|---|---|---|"]
    found = False
    for issue, device, radius, op, what, bound in TARGETS:
        if device != device_type:
            continue
        candidates = [r for r in rows if r["group"] == "target" and r["radius"] == radius
                      and r["op"] == op and r["mode"] == "forward+backward"
                      and r.get("dtype", "float32") == "float32"
                      and r["provider"] in NATIVE_FOR_DEVICE[device_type]]
        for r in candidates:
            found = True
            requirement = {
                "speedup_vs_iic_conv2d": f"{op} fwd+bwd r={radius}: speedup vs iic-conv2d",
                "speedup_vs_reference": f"{op} fwd+bwd: speedup vs reference",
                "extra_over_inputs": f"{op} fwd+bwd r={radius}: peak extra beyond grads / inputs",
                "extra_mib": f"{op} fwd+bwd r={radius}: peak extra beyond grads",
                "memory_ratio_vs_reference": f"{op} fwd+bwd: peak extra / reference's",
            }[what]
            if not _measured(r):
                lines.append(f"| {issue} | {requirement} | {r['provider']} | not measured: "
                             f"{r.get('skipped_reason')} | | no |")
                continue
            if what.startswith("speedup"):
                value, text, ok = r.get(what), _ratio(r.get(what)), None
                required = f">= {bound:g}x"
                ok = value is not None and value >= bound
            elif what == "extra_over_inputs":
                extra = _extra_beyond_grads(r)
                value = None if extra is None else extra / r["input_bytes"]
                text = "—" if value is None else f"{100 * value:.1f}% ({_mib(extra)} MiB of {_mib(r['input_bytes'])} MiB)"
                required = f"<= {100 * bound:g}%"
                ok = value is not None and value <= bound
            elif what == "extra_mib":
                extra = _extra_beyond_grads(r)
                text = "—" if extra is None else f"{_mib(extra)} MiB"
                required = f"<= {bound:g} MiB"
                ok = extra is not None and extra <= bound * MIB
            else:
                value = r.get(what)
                text = "—" if value is None else f"{value:.2f}"
                required = f"<= {bound:g}"
                ok = value is not None and value <= bound
            lines.append(f"| {issue} | {requirement} | {r['provider']} | {text} | {required} | "
                         f"{'yes' if ok else 'no'} |")
    if not found:
        lines.append(f"| — | no native backend ({', '.join(NATIVE_FOR_DEVICE[device_type])}) was benchmarked on the target "
                     f"configs of this device | | | | |")
    return lines


def write_markdown(rows, path) -> None:
    if not rows:
        Path(path).write_text("# Benchmarks\n\nNo rows.\n")
        return
    first = rows[0]
    gpu = first["device_type"] == "cuda"
    loads = [r["load_avg_1m"] for r in rows if r.get("load_avg_1m") is not None]
    stamps = sorted(r["timestamp"] for r in rows)
    measured = [r for r in rows if _measured(r)]
    out = [f"# BIMI loss benchmarks: {first['device_name']}", ""]
    out += [f"- device: **{first['device_name']}** ({first['device_type']}), "
            f"{first['num_threads']} torch threads",
            f"- torch {first['torch_version']}, triton {first['triton_version']}, "
            f"commit `{first['git_commit']}`, suite `{first['suite']}`",
            f"- run {stamps[0]} to {stamps[-1]}; {len(measured)} measurements, "
            f"{len(rows) - len(measured)} skipped (reasons at the end)"]
    if first.get("command"):
        out.append(f"- command: `{first['command']}`")
    if first.get("native_build"):
        out.append(f"- compiled kernels: {first['native_build']} (the build that ran)")
    if not gpu:
        out.append(f"- the CPU is shared with other jobs: the 1-minute load average during the run "
                   f"went from {min(loads):.2f} to {max(loads):.2f} (per-row in the CSV); timings "
                   f"on a loaded 2-core machine are noisy, compare ratios from the same run")
    out += ["- time: median and 20th–80th percentile over repeats after warm-up "
            + ("(CUDA events, L2 flushed before each call)" if gpu else
               "(`time.perf_counter`, fixed `torch.set_num_threads`)"),
            f"- memory: {next((r['memory_method'] for r in rows if r.get('memory_method')), 'not measured')}; "
            "'beyond grads' subtracts the two gradients (backward modes)",
            "- check: max |out - reference| / max |reference| of the output (forward) or the "
            "gradients (backward modes) against the `reference` provider of the same run",
            "- providers: `reference`, `cpp`, `triton`, `cuda` are this package "
            "(`bimi_kernels.functional`, `backend=...`); `iic-conv2d`, `unfold`, `gemm`, "
            "`voxelmorph-cc` are the hand-written peers (benchmarks/providers.py)"]
    if gpu and first.get("tf32"):
        out.append(f"- torch TF32 defaults kept: {first['tf32']} (TF32 convolutions bound the "
                   "accuracy of the reference's box sums and of the conv peers: see `check`)")
    if gpu:
        out.append("- roofline: the larger of (minimum bytes / peak bandwidth) and "
                   "(flops / FP32 peak), over the median time; peaks in benchmarks/configs.py")
    out += ["", "## Headline: the issue target configs, forward+backward", ""]
    pivot = pivot_table(rows)
    if pivot:
        out += pivot + ["", "'extra MiB': peak extra memory beyond the inputs and the two gradients.",
                        "", "Per provider:", ""]
    out += headline_table(rows)
    out += ["", "## Issue targets", ""]
    out += target_checks(rows)
    groups = OrderedDict()
    for r in rows:
        groups.setdefault((r["group"], r["label"]), []).append(r)
    out += ["", "## All measurements", ""]
    for (group, label), group_rows in groups.items():
        out += [f"### {group}: {label}", ""]
        out += _results_table(group_rows, gpu)
        out.append("")
    skipped = [r for r in rows if not _measured(r)]
    unavailable = OrderedDict()  # backends that do not serve this device: one line each
    for r in skipped:
        if (r.get("skipped_reason") or "").startswith("backend not available"):
            unavailable.setdefault((r["provider"], r["skipped_reason"]), []).append(r)
    skipped = [r for r in skipped if not (r.get("skipped_reason") or "").startswith("backend not available")]
    if unavailable or skipped:
        out += ["## Skipped", ""]
        out += [f"- `{provider}` everywhere ({len(group)} rows): {reason}"
                for (provider, reason), group in unavailable.items()]
    if skipped:
        out += ["", "| config | op | mode | provider | reason |", "|---|---|---|---|---|"]
        for r in skipped:
            reason = (r.get("skipped_reason") or "").replace("|", "/")
            out.append(f"| {r['config']} | {r['op']} | {r['mode']} | {r['provider']} | {reason} |")
    notes = [r for r in measured if r.get("note")]
    if notes:
        out += ["", "## Notes", ""]
        out += [f"- {r['config']} {r['op']} {r['mode']} {r['provider']}: {r['note']}" for r in notes]
    Path(path).write_text("\n".join(out) + "\n")


# ------------------------------------------------------------------------------------------------
# plots
# ------------------------------------------------------------------------------------------------
def _plot_mode(rows):
    modes = {r["mode"] for r in rows}
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
    measured = [r for r in rows if _measured(r)]
    device = rows[0]["device_name"] if rows else ""
    for group, xlabel in SWEEPS.items():
        group_rows = [r for r in measured if r["group"] == group]
        if not group_rows:
            continue
        mode = _plot_mode(group_rows)
        group_rows = [r for r in group_rows if r["mode"] == mode]
        ops = list(OrderedDict.fromkeys(r["op"] for r in group_rows))
        figure, axes = plt.subplots(2, len(ops), figsize=(5.5 * len(ops), 8), squeeze=False)
        for column, op in enumerate(ops):
            op_rows = [r for r in group_rows if r["op"] == op]
            for provider in OrderedDict.fromkeys(r["provider"] for r in op_rows):
                points = sorted((r["sweep_value"], r) for r in op_rows if r["provider"] == provider)
                xs = [x for x, _ in points]
                style = dict(marker="o", linewidth=2.5 if provider in NATIVE else 1.2, label=provider,
                             color=PROVIDER_COLORS.get(provider))
                axes[0][column].plot(xs, [r["time_median_s"] * 1e3 for _, r in points], **style)
                memory = [(x, r["peak_extra_bytes"] / MIB) for x, r in points
                          if r.get("peak_extra_bytes") is not None]
                if memory:
                    axes[1][column].plot([x for x, _ in memory], [max(m, 1e-3) for _, m in memory],
                                         **style)
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
    targets = [r for r in headline_rows(rows)]
    if targets:
        keys = list(OrderedDict.fromkeys((r["config"], r["op"]) for r in targets))
        figure, axes = plt.subplots(len(keys), 1, figsize=(8, 1.0 + 0.45 * len(targets)), squeeze=False)
        for axis, (config, op) in zip(axes[:, 0], keys):
            bars = [r for r in targets if r["config"] == config and r["op"] == op]
            times = [r["time_median_s"] * 1e3 for r in bars]
            axis.barh([r["provider"] for r in bars], times,
                      color=["tab:red" if r["provider"] in NATIVE else "tab:gray" for r in bars])
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


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m benchmarks.report DIR  (with DIR/results.csv)", file=sys.stderr)
        return 2
    folder = Path(argv[0])
    rows = read_csv(folder / "results.csv")
    write_markdown(rows, folder / "summary.md")
    write_plots(rows, folder / "plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
