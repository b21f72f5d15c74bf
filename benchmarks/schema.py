"""The one row schema: a `Row` per (config, op, mode, provider), measured or skipped with a reason,
and its CSV form (one column per field, in field order; empty cell = None).

Fields fall in groups: the run (same on every row), the config, what was timed, the time, the
memory, the roofline, the ratios to the peers of the same run, and the check. The roofline and
ratio fields are derived from the others (`report.add_derived`), so a CSV can be re-rendered
with a newer model without touching what was measured.
"""
from __future__ import annotations

import csv
import dataclasses
import re
import typing
from dataclasses import dataclass, fields
from typing import Optional

from .configs import BenchConfig


@dataclass
class RunInfo:
    """What is the same on every row of one run: the first columns of every `Row`."""
    git_commit: str
    device_type: str  # cpu | cuda
    device_name: str
    torch_version: str
    triton_version: str
    num_threads: int  # torch.set_num_threads for the whole run
    suite: str
    command: str
    native_build: str  # the compiled extensions that ran and when they were built
    tf32: str  # torch's TF32 switches on a GPU (they bound the conv peers' accuracy)


@dataclass
class Row(RunInfo):
    # the run: RunInfo's fields, then when the row was measured
    timestamp: str
    # the config
    config: str
    group: str
    label: str
    ndim: int
    batch: int
    heads: int
    clusters: int
    spatial: str  # "128x128"
    offsets: str  # "r1", "r1d8" (radius 1, dilation 8) or "(0,0);(1000,0)"
    num_offsets: int
    window: int
    dtype: str
    sweep_value: int
    # what was timed
    provider: str
    provider_call: str
    op: str
    mode: str
    # time (seconds) and the machine's load around it
    repeats: Optional[int] = None
    time_median_s: Optional[float] = None
    time_p20_s: Optional[float] = None
    time_p80_s: Optional[float] = None
    first_call_s: Optional[float] = None
    load_avg_1m_start: Optional[float] = None  # 1-minute load average when the group's timing began
    load_avg_1m_end: Optional[float] = None  # ... and when it ended
    # memory (bytes)
    input_bytes: Optional[int] = None
    grad_bytes: Optional[int] = None
    peak_extra_bytes: Optional[int] = None
    peak_extra_minus_grads_bytes: Optional[int] = None
    memory_method: Optional[str] = None
    # roofline (derived: benchmarks/roofline.py)
    min_bytes: Optional[int] = None
    min_flops: Optional[int] = None
    achieved_bytes_per_s: Optional[float] = None  # min_bytes / median time
    achieved_flops_per_s: Optional[float] = None  # min_flops / median time
    roofline_bound_s: Optional[float] = None  # against bandwidth and the FP32 rate
    roofline_fraction: Optional[float] = None
    roofline_bound_tensor_s: Optional[float] = None  # against bandwidth and the tensor-core rate
    roofline_fraction_tensor: Optional[float] = None
    # ratios to the same config, op and mode in the same run (derived)
    speedup_vs_reference: Optional[float] = None
    speedup_vs_unfold: Optional[float] = None
    speedup_vs_iic_conv2d: Optional[float] = None
    memory_ratio_vs_reference: Optional[float] = None
    share_of_train_step: Optional[float] = None  # `bimi` rows of the training group: loss / step
    # the check and what went wrong
    check_max_rel_diff: Optional[float] = None  # against the reference provider of the same run
    note: Optional[str] = None
    skipped_reason: Optional[str] = None

    @property
    def measured(self) -> bool:
        return not self.skipped_reason and self.time_median_s is not None

    @property
    def radius(self) -> Optional[int]:
        match = re.fullmatch(r"r(\d+)(?:d\d+)?", self.offsets)
        return int(match.group(1)) if match else None

    def add_note(self, text: str) -> None:
        self.note = f"{self.note} {text}" if self.note else text

    def bench_config(self) -> BenchConfig:
        """The config's shape and offsets, enough for the roofline (not the op list or label)."""
        return BenchConfig(self.group, self.batch, self.clusters,
                           tuple(int(s) for s in self.spatial.split("x")),
                           parse_offsets(self.offsets)[0], parse_offsets(self.offsets)[1],
                           window=self.window, heads=self.heads, dtype=self.dtype)


def parse_offsets(text: str):
    """Inverse of `BenchConfig.offsets_text`: (offsets, dilation)."""
    match = re.fullmatch(r"r(\d+)(?:d(\d+))?", text)
    if match:
        return int(match.group(1)), int(match.group(2) or 1)
    return tuple(tuple(int(v) for v in d.strip("()").split(",")) for d in text.split(";")), 1


def new_row(run: RunInfo, timestamp: str, config: BenchConfig, provider, op: str, mode: str,
            num_offsets: int) -> Row:
    return Row(timestamp=timestamp, **dataclasses.asdict(run),
               config=config.name, group=config.group, label=config.label, ndim=len(config.spatial),
               batch=config.batch, heads=config.heads, clusters=config.clusters,
               spatial="x".join(map(str, config.spatial)), offsets=config.offsets_text,
               num_offsets=num_offsets, window=config.window, dtype=config.dtype,
               sweep_value=config.sweep_value, provider=provider.name, provider_call=provider.call,
               op=op, mode=mode)


# ------------------------------------------------------------------------------------------------
# CSV
# ------------------------------------------------------------------------------------------------
COLUMNS = tuple(f.name for f in fields(Row))
_TYPES = typing.get_type_hints(Row)


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _parse(name: str, text: str):
    if text == "":
        return None
    kind = _TYPES[name]
    base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
    if base is int:
        return int(float(text))
    if base is float:
        return float(text)
    return text


def write_csv(rows, path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        for row in rows:
            writer.writerow([_cell(getattr(row, name)) for name in COLUMNS])


def read_csv(path) -> list:
    """The rows of a results CSV of this schema, whatever the order of its columns."""
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        if sorted(reader.fieldnames or ()) != sorted(COLUMNS):
            missing = set(COLUMNS) - set(reader.fieldnames or ())
            extra = set(reader.fieldnames or ()) - set(COLUMNS)
            raise ValueError(f"{path}: not a results CSV of this schema (missing {sorted(missing)}, "
                             f"unknown {sorted(extra)})")
        return [Row(**{name: _parse(name, raw[name]) for name in COLUMNS}) for raw in reader]
