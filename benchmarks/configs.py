"""The benchmark configurations, the timing policies and the GPU peak numbers of the roofline.

Suites (`--suite`, `--quick` = `quick`):
- `full`: the issue targets with every op and mode, the authors' setting, 2-D sweeps of size,
  clusters K, window radius and batch, and a 3-D volume. CPU sizes are scaled down where the GPU
  ones would take minutes per call on two cores.
- `quick`: the targets and a few small sweeps, forward+backward only: a few minutes on 2 cores.
- `smoke`: tiny shapes, for the unit test of the harness itself.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Tuple

from .providers import MODES, OPS

ALL_MODES = MODES
FWD_BWD = ("forward+backward",)


@dataclass(frozen=True)
class BenchConfig:
    group: str  # target | authors | size | clusters | radius | batch | volume
    batch: int
    clusters: int
    spatial: Tuple[int, ...]
    radius: int  # joint-count offsets: the full window {-r..r}^n
    window: int = 5  # box window of the boundary term
    dtype: str = "float32"
    ops: Tuple[str, ...] = OPS
    modes: Tuple[str, ...] = FWD_BWD
    label: str = ""  # what the config stands for, e.g. "issue 4 target"

    @property
    def name(self) -> str:
        size = "x".join(str(s) for s in self.spatial)
        dtype = "" if self.dtype == "float32" else f"-{self.dtype}"
        return (f"{self.group}-B{self.batch}-K{self.clusters}-{size}-r{self.radius}"
                f"-w{self.window}{dtype}")

    @property
    def sweep_value(self) -> int:
        """The x value of this config in its sweep's plot."""
        return {"size": self.spatial[-1], "clusters": self.clusters, "radius": self.radius,
                "batch": self.batch}.get(self.group, self.spatial[-1])


@dataclass(frozen=True)
class TimingPolicy:
    warmup_calls: int  # untimed calls first (also: the first one estimates the time per call)
    min_repeats: int
    max_repeats: int
    min_seconds: float  # repeat until this much time was measured (and min_repeats reached)
    max_seconds: float  # stop repeating after this much (once 3 repeats are in)
    max_call_seconds: float  # skip a measurement whose predicted time per call exceeds this
    measure_memory: bool = True


TIMING = {
    ("cpu", "full"): TimingPolicy(1, 5, 30, 0.5, 3.0, 8.0),
    ("cpu", "quick"): TimingPolicy(1, 3, 10, 0.25, 1.5, 2.0),
    ("cpu", "smoke"): TimingPolicy(1, 2, 2, 0.0, 1.0, 2.0),
    ("cuda", "full"): TimingPolicy(3, 10, 200, 0.2, 2.0, 5.0),
    ("cuda", "quick"): TimingPolicy(3, 10, 100, 0.1, 1.0, 2.0),
    ("cuda", "smoke"): TimingPolicy(1, 2, 2, 0.0, 1.0, 2.0),
}

# Peak HBM bandwidth (bytes/s) and FP32 non-tensor-core throughput (flop/s) of the data-centre
# GPUs this project may be lent, from NVIDIA's H100 / H200 datasheets (dense, no sparsity). FP32
# because the benchmarks run float32 maps and SPEC §8 asks for ~1e-5 relative error, which rules
# out TF32 tensor cores. Matched by substring of torch.cuda.get_device_name(), first match wins.
GPU_PEAKS = (
    ("H200", {"bandwidth": 4.8e12, "flops": 66.9e12, "source": "H200 SXM: 4.8 TB/s, 67 TFLOP/s FP32"}),
    ("H100 NVL", {"bandwidth": 3.9e12, "flops": 60.0e12, "source": "H100 NVL: 3.9 TB/s, 60 TFLOP/s FP32"}),
    ("H100 PCIe", {"bandwidth": 2.0e12, "flops": 51.2e12, "source": "H100 PCIe: 2.0 TB/s, 51 TFLOP/s FP32"}),
    ("H100", {"bandwidth": 3.35e12, "flops": 66.9e12, "source": "H100 SXM5: 3.35 TB/s, 67 TFLOP/s FP32"}),
)


def gpu_peaks(device_name: str) -> Optional[dict]:
    for key, peaks in GPU_PEAKS:
        if key.lower() in device_name.lower():
            return peaks
    return None


def _target_configs(device_type: str, modes) -> list:
    """The issue performance targets: issue 4 on CPU (B=4, K=10, 128x128), issue 3 on GPU
    (B=16, K=10, 256x256), radius 1 (3x3 offsets) and 3 (7x7)."""
    if device_type == "cpu":
        batch, size, label = 4, 128, "issue 4 target"
    else:
        batch, size, label = 16, 256, "issue 3 target"
    return [BenchConfig("target", batch, 10, (size, size), radius, modes=modes, label=label)
            for radius in (1, 3)]


def _authors_config(device_type: str, modes) -> BenchConfig:
    """K=40, offset 0, 224x224, B=16 on GPU; B=2 on CPU (8x less work)."""
    batch = 16 if device_type == "cuda" else 2
    label = "authors' setting" + ("" if device_type == "cuda" else " (B scaled 16 -> 2 on CPU)")
    return BenchConfig("authors", batch, 40, (224, 224), 0, modes=modes, label=label)


def full_configs(device_type: str) -> list:
    gpu = device_type == "cuda"
    configs = _target_configs(device_type, ALL_MODES)
    # radius 3: the boundary term does not depend on the offsets (it is in the radius-1 config);
    # the ops built on the joint counts in every mode, the composite ones forward+backward
    radius3 = configs.pop()
    configs.append(replace(radius3, ops=("joint_counts",)))
    configs.append(replace(radius3, ops=("mi", "bimi"), modes=FWD_BWD))
    configs.append(_authors_config(device_type, ALL_MODES if gpu else FWD_BWD))
    sweep_batch = 16 if gpu else 2
    sweep_size = 256 if gpu else 128
    counts_ops = ("joint_counts",)
    configs += [BenchConfig("size", sweep_batch, 10, (s, s), 1, ops=("joint_counts", "boundary"),
                            label="size sweep") for s in (64, 128, 256, 512)]
    configs += [BenchConfig("clusters", sweep_batch, k, (sweep_size, sweep_size), 1, ops=counts_ops,
                            label="K sweep") for k in (4, 16, 32, 64)]
    configs += [BenchConfig("radius", sweep_batch, 10, (sweep_size, sweep_size), r, ops=counts_ops,
                            label="radius sweep") for r in (0, 1, 2, 3)]
    batches = (1, 4, 16, 32) if gpu else (1, 2, 4, 8)
    configs += [BenchConfig("batch", b, 10, (sweep_size, sweep_size), 1, ops=counts_ops,
                            label="batch sweep") for b in batches]
    # 3-D: 3x3x3 offsets and a 3x3x3 box window. 64^3 with B=2 on GPU; B=1, 48^3 on CPU.
    if gpu:
        configs.append(BenchConfig("volume", 2, 10, (64, 64, 64), 1, window=3, label="3-D volume"))
        configs.append(replace(configs[0], dtype="bfloat16", label="issue 3 target, bfloat16"))
    else:
        configs.append(BenchConfig("volume", 1, 10, (48, 48, 48), 1, window=3,
                                   label="3-D volume (scaled 2x64^3 -> 1x48^3 on CPU)"))
    return configs


def quick_configs(device_type: str) -> list:
    configs = _target_configs(device_type, FWD_BWD)
    configs[0] = replace(configs[0], ops=OPS)
    configs[1] = replace(configs[1], ops=("joint_counts",))
    sweep_batch = 16 if device_type == "cuda" else 2
    configs += [BenchConfig("size", sweep_batch, 10, (s, s), 1, ops=("joint_counts", "boundary"),
                            label="size sweep") for s in (64, 128)]
    authors = _authors_config(device_type, FWD_BWD)
    if device_type == "cpu":
        authors = replace(authors, spatial=(112, 112), label="authors' setting (B=2, 112x112 on CPU)")
    configs.append(authors)
    configs.append(BenchConfig("volume", 1, 10, (24, 24, 24), 1, window=3,
                               ops=("joint_counts", "boundary"), label="3-D volume (small)"))
    return configs


def smoke_configs(device_type: str) -> list:
    """Tiny shapes that go through every code path of the harness (sweep plot, target tables, 3-D)."""
    return [
        BenchConfig("size", 1, 4, (12, 12), 1, ops=("joint_counts", "boundary"), label="smoke sweep"),
        BenchConfig("target", 1, 4, (16, 16), 1, ops=OPS, modes=ALL_MODES, label="smoke target"),
        BenchConfig("volume", 1, 3, (6, 6, 6), 0, window=3, ops=("joint_counts",), label="smoke 3-D"),
    ]


SUITES = {"full": full_configs, "quick": quick_configs, "smoke": smoke_configs}


def configs_for(suite: str, device_type: str) -> list:
    return SUITES[suite](device_type)
