"""What is measured, as data: the benchmark configurations of each suite and device, and the
timing policies.

Suites (`--suite`; `--quick` is `--suite quick`):
- `full`: the targets with every op and mode, the authors' setting and the U-Net training step,
  sparse dilated offset sets, sweeps of size, clusters K, window radius and batch, a 3-D volume.
  CPU sizes are scaled down where the GPU ones would take minutes per call on one core.
- `quick`: the targets, the authors' setting, the training step, the sparse offsets, a few small
  sweeps; forward+backward only. Minutes on one core; what `scripts/gpu_check.sh` runs on a GPU.
- `smoke`: tiny shapes through every code path of the harness (every op and report section;
  of the sweeps, which share one code path, the size sweep only), for the unit tests: seconds.

A config is one `BenchConfig`; the tables below are the whole list, per suite and device. To add a
measurement, add a line here.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Optional, Tuple, Union

from .workloads import ALL_MODES, FWD_BWD, MAP_OPS

Offsets = Union[int, Tuple[Tuple[int, ...], ...]]
GROUPS = ("target", "authors", "training", "sparse", "size", "clusters", "radius", "batch", "volume")


@dataclass(frozen=True)
class BenchConfig:
    group: str  # one of GROUPS
    batch: int
    clusters: int
    spatial: Tuple[int, ...]
    offsets: Offsets = 0  # a window radius r (the set {-r..r}^n times `dilation`) or explicit offsets
    dilation: int = 1
    window: int = 5  # box window of the boundary term
    heads: int = 1  # cluster heads: each op runs once per head on its own maps (the mean / the concatenation)
    dtype: str = "float32"
    ops: Tuple[str, ...] = MAP_OPS
    modes: Tuple[str, ...] = FWD_BWD
    label: str = ""  # what the config stands for, e.g. "CPU target"
    providers: Optional[Tuple[str, ...]] = None  # only these providers (None: every provider)
    unet: Tuple[int, int] = (32, 4)  # the train_step op's U-Net (width, depth): the demo's full model

    @property
    def radius(self) -> Optional[int]:
        """The window radius, or None for an explicit offset list."""
        return self.offsets if isinstance(self.offsets, int) else None

    @property
    def offsets_text(self) -> str:
        """`r1`, `r1d8` (radius 1, dilation 8) or `(0,0);(1000,0)` (an explicit list)."""
        if self.radius is not None:
            return f"r{self.radius}" + (f"d{self.dilation}" if self.dilation != 1 else "")
        return ";".join("(" + ",".join(str(v) for v in d) + ")" for d in self.offsets)

    @property
    def name(self) -> str:
        size = "x".join(str(s) for s in self.spatial)
        offsets = self.offsets_text.replace(";", "")
        heads = f"-h{self.heads}" if self.heads != 1 else ""
        dtype = "" if self.dtype == "float32" else f"-{self.dtype}"
        return f"{self.group}-B{self.batch}-K{self.clusters}-{size}-{offsets}-w{self.window}{heads}{dtype}"

    @property
    def sweep_value(self) -> int:
        """The x value of this config in its sweep's plot."""
        return {"size": self.spatial[-1], "clusters": self.clusters, "radius": self.radius or 0,
                "batch": self.batch}.get(self.group, self.spatial[-1])

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "BenchConfig":
        """Inverse of `to_dict` after a JSON round trip (lists back to tuples)."""
        data = dict(data)
        data["spatial"] = tuple(data["spatial"])
        if not isinstance(data["offsets"], int):
            data["offsets"] = tuple(tuple(d) for d in data["offsets"])
        for key in ("ops", "modes", "unet"):
            data[key] = tuple(data[key])
        if data.get("providers") is not None:
            data["providers"] = tuple(data["providers"])
        return cls(**data)


@dataclass(frozen=True)
class TimingPolicy:
    warmup_calls: int  # untimed calls first (the first one also estimates the time per call)
    min_repeats: int
    max_repeats: int
    min_seconds: float  # a provider's repeats are enough with this much measured time ...
    max_seconds: float  # ... or with this much after 3 repeats (benchmarks/measure.py)
    max_call_seconds: float  # skip a sweep measurement whose predicted time per call exceeds this
    measure_memory: bool = True


TIMING = {
    ("cpu", "full"): TimingPolicy(1, 5, 30, 0.5, 3.0, 8.0),
    ("cpu", "quick"): TimingPolicy(1, 3, 10, 0.25, 1.5, 2.0),
    ("cpu", "smoke"): TimingPolicy(1, 2, 2, 0.0, 1.0, 2.0),
    ("cuda", "full"): TimingPolicy(3, 10, 200, 0.2, 2.0, 5.0),
    ("cuda", "quick"): TimingPolicy(3, 10, 100, 0.1, 1.0, 2.0),
    ("cuda", "smoke"): TimingPolicy(1, 2, 2, 0.0, 1.0, 2.0),
}

# Groups measured whatever the cost model predicts: they hold the headline ratios.
ALWAYS_MEASURED = ("target", "authors", "training", "sparse")

# ------------------------------------------------------------------------------------------------
# the configurations
# ------------------------------------------------------------------------------------------------
JOINT = ("joint_counts",)
JOINT_BOUNDARY = ("joint_counts", "boundary")
# The loss's share of a U-Net training step: the 3-head loss alone and the whole step, each
# provider through the same seeded model (benchmarks/workloads.py, `train_step`). No
# `iic-conv2d` at offset 0: there its filter is the whole image, a convolution orders of
# magnitude slower than every other provider even on a GPU, and the authors' own zero-offset form
# is `gemm`; it is timed on the target configs.
TRAINING_OPS = ("bimi", "train_step")
TRAINING_PROVIDERS = ("reference", "reference-autograd", "cpp", "triton", "cuda", "unfold", "gemm",
                      "unet-only")
# Sparse dilated offsets: cost must follow pixels x offsets x K^2, not the offsets' spread (the
# last set far along x, where only a few columns of each row have a partner).
SPARSE_SETS = (((0, 0), (1000, 0)), ((-1000, 0), (1000, 0)), ((0, 0), (0, 500)))
SPARSE_PROVIDERS = ("reference", "reference-autograd", "cpp", "triton", "cuda", "unfold")


def sweep(field: str, values, base: BenchConfig, **changes) -> list:
    """One config per value of `field`, the rest from `base`."""
    return [replace(base, **{field: value}, **changes) for value in values]


def target(device: str, radius: int, **changes) -> BenchConfig:
    """The performance targets: CPU B=4 K=10 128x128, GPU B=16 K=10 256x256."""
    if device == "cpu":
        base = BenchConfig("target", 4, 10, (128, 128), radius, label="CPU target")
    else:
        base = BenchConfig("target", 16, 10, (256, 256), radius, label="GPU target")
    return replace(base, **changes)


def authors(batch: int, size: int, label: str, **changes) -> BenchConfig:
    """The authors' setting: offset 0, K=40, window 5, 3 heads (B=8, 224x224 on a GPU)."""
    return replace(BenchConfig("authors", batch, 40, (size, size), 0, window=5, heads=3,
                               label=label, providers=TRAINING_PROVIDERS), **changes)


def training(batch: int, size: int, label: str, unet=(32, 4)) -> BenchConfig:
    return BenchConfig("training", batch, 40, (size, size), 0, window=5, heads=3, ops=TRAINING_OPS,
                       label=label, providers=TRAINING_PROVIDERS, unet=unet)


def sparse(shape, modes=FWD_BWD) -> list:
    batch, clusters, *spatial = shape
    base = BenchConfig("sparse", batch, clusters, tuple(spatial), ops=JOINT, modes=modes,
                       providers=SPARSE_PROVIDERS)
    sets = [replace(base, offsets=s, label="sparse offsets " + ", ".join(map(str, s)))
            for s in SPARSE_SETS]
    return sets + [replace(base, offsets=1, dilation=8, label="dilated window r=1, dilation 8")]


def _cpu_full() -> list:
    sweep_base = BenchConfig("size", 2, 10, (128, 128), 1, ops=JOINT)
    return [
        target("cpu", 1, ops=MAP_OPS, modes=ALL_MODES),
        target("cpu", 3, ops=JOINT, modes=ALL_MODES),
        target("cpu", 3, ops=("mi", "bimi")),
        authors(2, 224, "authors' setting (B scaled 8 -> 2 on CPU)"),
        training(2, 112, "training step, demo's full U-Net (B=2, 112x112 on CPU)"),
        *sparse((1, 10, 1024, 512), modes=ALL_MODES),
        *sweep("spatial", [(s, s) for s in (64, 128, 256, 512)], sweep_base, ops=JOINT_BOUNDARY,
               label="size sweep"),
        *sweep("clusters", (4, 16, 32, 64), sweep_base, group="clusters", label="K sweep"),
        *sweep("offsets", (0, 1, 2, 3), sweep_base, group="radius", label="radius sweep"),
        *sweep("batch", (1, 2, 4, 8), sweep_base, group="batch", label="batch sweep"),
        BenchConfig("volume", 1, 10, (48, 48, 48), 1, window=3,
                    label="3-D volume (scaled 2x64^3 -> 1x48^3 on CPU)"),
    ]


def _cuda_full() -> list:
    sweep_base = BenchConfig("size", 16, 10, (256, 256), 1, ops=JOINT)
    return [
        target("cuda", 1, ops=MAP_OPS, modes=ALL_MODES),
        target("cuda", 3, ops=JOINT, modes=ALL_MODES),
        target("cuda", 3, ops=("mi", "bimi")),
        target("cuda", 1, clusters=40, ops=JOINT, label="GPU target, K=40"),
        authors(8, 224, "authors' setting", modes=ALL_MODES),
        training(8, 224, "training step, demo's full U-Net"),
        *sparse((1, 10, 1024, 512), modes=ALL_MODES),
        *sweep("spatial", [(s, s) for s in (64, 128, 256, 512)], sweep_base, ops=JOINT_BOUNDARY,
               label="size sweep"),
        *sweep("clusters", (4, 16, 32, 64), sweep_base, group="clusters", label="K sweep"),
        *sweep("offsets", (0, 1, 2, 3), sweep_base, group="radius", label="radius sweep"),
        *sweep("batch", (1, 4, 16, 32), sweep_base, group="batch", label="batch sweep"),
        BenchConfig("volume", 2, 10, (64, 64, 64), 1, window=3, label="3-D volume"),
        target("cuda", 1, dtype="bfloat16", label="GPU target, bfloat16"),
    ]


def _quick(device: str) -> list:
    gpu = device == "cuda"
    sizes = BenchConfig("size", 16 if gpu else 2, 10, (64, 64), 1, ops=JOINT_BOUNDARY, label="size sweep")
    configs = [target(device, 1, ops=MAP_OPS), target(device, 3, ops=JOINT)]
    if gpu:
        configs += [target("cuda", 1, clusters=40, ops=JOINT, label="GPU target, K=40"),
                    authors(8, 224, "authors' setting"),
                    training(8, 224, "training step, demo's full U-Net")]
    else:
        configs += [authors(2, 112, "authors' setting (B=2, 112x112 on CPU)"),
                    training(2, 64, "training step, demo's full U-Net (B=2, 64x64 on CPU)")]
    configs += sparse((1, 10, 1024, 512))
    configs += sweep("spatial", [(64, 64), (128, 128)], sizes)
    configs.append(BenchConfig("volume", 1, 10, (24, 24, 24), 1, window=3, ops=JOINT_BOUNDARY,
                               label="3-D volume (small)"))
    return configs


def _smoke(device: str) -> list:
    """Every op and report section on tiny shapes (of the sweeps, the size sweep only: they share one path)."""
    return [
        BenchConfig("size", 1, 4, (12, 12), 1, ops=JOINT_BOUNDARY, label="smoke sweep"),
        target(device, 1, batch=1, clusters=4, spatial=(16, 16), modes=ALL_MODES, label="smoke target"),
        authors(1, 16, "smoke authors' setting", clusters=6),
        training(1, 16, "smoke training step", unet=(4, 2)),
        BenchConfig("sparse", 1, 3, (40, 12), ((0, 0), (30, 0)), ops=JOINT,
                    providers=SPARSE_PROVIDERS, label="smoke sparse offsets"),
        BenchConfig("sparse", 1, 3, (40, 12), 1, dilation=8, ops=JOINT, providers=SPARSE_PROVIDERS,
                    label="smoke dilated window"),
        BenchConfig("volume", 1, 3, (6, 6, 6), 0, window=3, ops=JOINT, label="smoke 3-D"),
    ]


SUITES = {
    "full": {"cpu": _cpu_full, "cuda": _cuda_full},
    "quick": {"cpu": lambda: _quick("cpu"), "cuda": lambda: _quick("cuda")},
    "smoke": {"cpu": lambda: _smoke("cpu"), "cuda": lambda: _smoke("cuda")},
}


def configs_for(suite: str, device_type: str) -> list:
    return SUITES[suite][device_type]()
