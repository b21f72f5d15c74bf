"""What is computed: the ops, the modes they are timed in, their seeded inputs, and the zero-argument
function that one timed repeat calls.

Ops (one `Op` each in `OP_SPECS`; a provider says how it computes each one it implements):
- `joint_counts`: the (|O|, K, K) joint counts (docs/contract.md §3);
- `mi`: the regularised mutual information (§4);
- `boundary`: the boundary term of both maps, edge map included (§5);
- `bimi`: the whole loss (§6);
- `train_step`: one training step of the demo's U-Net (bimi_kernels/demo/unet.py) with 3 cluster
  heads and the provider's `bimi` loss averaged over the heads: the U-Net over both views of the
  batch, the loss, backward, AdamW. With the `bimi` row of the same config it gives the loss's
  share of a training step.

Modes: `forward` (inputs without grad), `backward` (autograd.grad over a graph built once,
retain_graph=True) and `forward+backward`. `train_step` is timed as a whole (forward+backward).

Heads: a config with `heads = h` holds h pairs of maps (batch h x B); a map op runs once per head
(as a training loop does) and returns the heads' counts concatenated or their losses' mean.
"""
from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import Callable, List, Optional, Tuple

import torch

import bimi_kernels.functional as functional
from bimi_kernels import reference
from bimi_kernels.numerics import accumulation_dtype
from bimi_kernels.offsets import make_offsets

from . import roofline

MAP_OPS = ("joint_counts", "mi", "boundary", "bimi")
OPS = MAP_OPS + ("train_step",)
MODES = ("forward", "backward", "forward+backward")
ALL_MODES = MODES
FWD_BWD = ("forward+backward",)

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
          "bfloat16": torch.bfloat16}


@dataclass
class Maps:
    """What one head's op call sees."""
    p1: torch.Tensor  # (B, K, *S) softmax maps
    p2: torch.Tensor
    image: torch.Tensor  # (B, 1, *S)
    offsets: object  # a radius or an explicit offset list, as `bimi_kernels.functional` takes it
    dilation: int
    window: int


@dataclass(frozen=True)
class Op:
    """One op: what it is, how it is timed, how this package and the plain reference compute it,
    its size model and its roofline bounds. Adding an op is one entry in `OP_SPECS` (and, for the
    peers that offer it, a branch in their compute in providers.py)."""
    name: str
    what: str  # one line for the report
    modes: Tuple[str, ...]  # the modes it can be timed in
    heads: str  # how per-head results combine: "cat" (the counts) or "mean" (a loss)
    work: Callable  # config -> a size that time scales with (to extrapolate from smaller configs)
    package: Optional[Callable] = None  # (Maps, backend) -> tensor: bimi_kernels.functional
    plain: Optional[Callable] = None  # Maps -> tensor: bimi_kernels.reference through autograd
    bounds: Optional[Callable] = None  # (config, mode) -> (min bytes, min flops), roofline.py


def _counts_work(config) -> float:
    return roofline.valid_pairs(config) * config.clusters ** 2 + roofline.pixels(config) * config.clusters


def _boundary_work(config) -> float:
    return roofline.pixels(config) * (config.clusters + config.window ** len(config.spatial))


def _step_work(config) -> float:
    width, depth = config.unet
    return 2 * config.batch * prod(config.spatial) * width * width * depth + _counts_work(config)


def _offsets(m: Maps):
    return make_offsets(m.offsets, m.p1.dim() - 2, m.dilation)


OP_SPECS = {op.name: op for op in (
    Op("joint_counts", "joint counts (|O|, K, K)", MODES, "cat", _counts_work,
       package=lambda m, backend: functional.joint_counts(m.p1, m.p2, offsets=m.offsets, dilation=m.dilation,
                                                          backend=backend),
       plain=lambda m: reference.joint_counts(m.p1, m.p2, _offsets(m)),
       bounds=roofline.counts_bytes_flops),
    Op("mi", "regularised mutual information", MODES, "mean", _counts_work,
       package=lambda m, backend: functional.regularized_mi(m.p1, m.p2, offsets=m.offsets, dilation=m.dilation,
                                                            backend=backend),
       plain=lambda m: reference.regularized_mi(m.p1, m.p2, _offsets(m)),
       bounds=roofline.counts_bytes_flops),
    Op("boundary", "boundary term, both maps, edge map included", MODES, "mean", _boundary_work,
       package=lambda m, backend: functional.boundary_cc_loss(m.p1, m.p2, m.image, window=m.window,
                                                              backend=backend),
       plain=lambda m: reference.boundary_cc_loss(m.p1, m.p2, m.image, m.window),
       bounds=roofline.boundary_bytes_flops),
    Op("bimi", "the whole BIMI loss", MODES, "mean", lambda c: _counts_work(c) + _boundary_work(c),
       package=lambda m, backend: functional.bimi_loss(m.p1, m.p2, m.image, offsets=m.offsets,
                                                       dilation=m.dilation, window=m.window, backend=backend),
       plain=lambda m: reference.bimi_loss(m.p1, m.p2, m.image, offsets=_offsets(m), window=m.window),
       bounds=roofline.bimi_bytes_flops),
    Op("train_step", "U-Net training step: both views, heads, the loss, backward, AdamW",
       FWD_BWD, "mean", _step_work),  # computed by `TrainStep` with the provider's `bimi`
)}


# ------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------
@dataclass
class Inputs:
    config: object
    p1: torch.Tensor  # (heads x B, K, *S), no grad
    p2: torch.Tensor
    image: torch.Tensor  # (B, 1, *S), shared by the heads
    grad_counts: torch.Tensor  # fixed upstream gradient of joint_counts, (heads x |O|, K, K)

    def heads(self, requires_grad: bool) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """p1 and p2 of each head: views of the inputs' storage, leaves of their own when they
        require grad (so that a head's gradient is its own tensor, never a slice of a larger one
        that autograd would have to assemble)."""
        def views(maps):
            chunks = maps.chunk(self.config.heads)
            return [c.detach().requires_grad_(True) for c in chunks] if requires_grad else list(chunks)
        return views(self.p1), views(self.p2)

    def maps(self, p1: torch.Tensor, p2: torch.Tensor, image: torch.Tensor = None) -> Maps:
        c = self.config
        offsets = list(c.offsets) if not isinstance(c.offsets, int) else c.offsets
        return Maps(p1, p2, self.image if image is None else image, offsets, c.dilation, c.window)

    def input_bytes(self, op: str) -> int:
        """The bytes of what `op` reads: both maps, and the image for the boundary term."""
        image = self.image.numel() * self.image.element_size() if op in ("boundary", "bimi", "train_step") else 0
        return 2 * self.p1.numel() * self.p1.element_size() + image

    def grad_bytes(self) -> int:
        """dL/dp1 and dL/dp2 in the maps' dtype."""
        return 2 * self.p1.numel() * self.p1.element_size()


def make_inputs(config, device) -> Inputs:
    """Seeded inputs for a config: softmax maps, an image, an upstream gradient. Same values for
    every provider (and, for one head, the same values as earlier versions of this harness)."""
    generator = torch.Generator(device="cpu").manual_seed(1234)
    shape = (config.heads * config.batch, config.clusters) + tuple(config.spatial)
    dtype = DTYPES[config.dtype]
    p1 = torch.softmax(torch.randn(shape, generator=generator), dim=1)
    p2 = torch.softmax(torch.randn(shape, generator=generator), dim=1)
    image = torch.rand((config.batch, 1) + tuple(config.spatial), generator=generator)
    num_offsets = len(roofline.offset_set(config))
    grad_counts = torch.randn((config.heads * num_offsets, config.clusters, config.clusters),
                              generator=generator)
    accumulation = accumulation_dtype(dtype)
    return Inputs(config, p1.to(device=device, dtype=dtype), p2.to(device=device, dtype=dtype),
                  image.to(device=device, dtype=dtype), grad_counts.to(device=device, dtype=accumulation))


# ------------------------------------------------------------------------------------------------
# the timed functions
# ------------------------------------------------------------------------------------------------
def op_function(provider, op: str, inputs: Inputs, p1s: List[torch.Tensor], p2s: List[torch.Tensor]) -> Callable:
    """A zero-argument function computing `op` with `provider` on every head's (p1, p2)."""
    heads = [inputs.maps(p1, p2) for p1, p2 in zip(p1s, p2s)]
    combine = OP_SPECS[op].heads

    def compute():
        outs = [provider.compute(op, maps) for maps in heads]
        if len(outs) == 1:
            return outs[0]
        return torch.cat(outs) if combine == "cat" else torch.stack(outs).mean()

    return compute


class TrainStep:
    """One training step of the demo's U-Net with `provider`'s loss (the module docstring). The
    model is built from a fixed seed, so every provider's first step starts from the same weights
    and its loss is checked against the reference's. No warp between the views and no mask (the
    demo's nearest-neighbour warp is data preparation, not the loss)."""

    def __init__(self, provider, inputs: Inputs):
        from bimi_kernels.demo.unet import ClusterHeads, UNet

        config = inputs.config
        width, depth = config.unet
        device = inputs.image.device
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if device.type == "cuda" else []):
            torch.manual_seed(0)
            self.unet = UNet(1, width, depth).to(device)
            self.heads = ClusterHeads(width, config.clusters, config.heads).to(device)
        parameters = list(self.unet.parameters()) + list(self.heads.parameters())
        self.optimizer = torch.optim.AdamW(parameters, lr=1e-3)
        view2 = inputs.image.flip(-1)  # the second view: any image of the same size costs the same
        self.images = torch.cat([inputs.image, view2]).float()
        self.view2, self.provider, self.inputs = view2, provider, inputs

    def __call__(self) -> Tuple[torch.Tensor]:
        features = self.unet.features(self.images)
        f1, f2 = features.chunk(2)
        losses = [self.provider.compute("bimi", self.inputs.maps(p1, p2, self.view2))
                  for p1, p2 in zip(self.heads(f1), self.heads(f2))]
        loss = torch.stack(losses).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return (loss.detach(),)


def mode_callable(provider, op: str, mode: str, inputs: Inputs) -> Callable[[], Tuple]:
    """The zero-argument function that one timed repeat calls. It returns what it computed (the
    output for `forward`, the gradients of every head's p1 and p2 otherwise, the loss for
    `train_step`) so that the
    caller can check it against the reference and drop it.

    `backward` runs the forward once here and then only autograd.grad(retain_graph=True).
    """
    if mode not in OP_SPECS[op].modes:
        raise ValueError(f"mode: {op} is timed in {OP_SPECS[op].modes}, not {mode!r}")
    if op == "train_step":
        return TrainStep(provider, inputs)
    if mode == "forward":
        fn = op_function(provider, op, inputs, *inputs.heads(requires_grad=False))
        return lambda: (fn(),)
    p1s, p2s = inputs.heads(requires_grad=True)  # same storage, no copy
    leaves = tuple(p1s + p2s)
    fn = op_function(provider, op, inputs, p1s, p2s)
    grad_output = inputs.grad_counts if op == "joint_counts" else None
    if mode == "backward":
        out = fn()
        upstream = None if grad_output is None else grad_output.to(out.dtype)
        return lambda: torch.autograd.grad(out, leaves, upstream, retain_graph=True)

    def forward_backward():
        out = fn()
        upstream = None if grad_output is None else grad_output.to(out.dtype)
        return torch.autograd.grad(out, leaves, upstream)

    return forward_backward


def estimate_peak_bytes(provider, op: str, mode: str, config) -> int:
    """A generous estimate of a provider's extra memory (in map-sized buffers), only to skip what
    would not fit; the measured peak is what the results report."""
    map_bytes = max(roofline.map_bytes(config), roofline.pixels(config) * 4)
    factor = provider.memory_copies(config) * (2 if mode != "forward" else 1)
    if op in ("boundary", "bimi") and provider.kind != "package":
        factor += 6  # the (B, K, *S) temporaries of the uncertainty map, twice
    if op == "train_step":
        width, depth = config.unet
        factor += 4 * width * depth * 2 / max(config.clusters * config.heads, 1)  # activations
    return int(factor * map_bytes)


def max_rel_diff(result, expected) -> float:
    """max |result - expected| / max |expected| over the outputs (the `check` column)."""
    worst = 0.0
    for got, want in zip(result, expected):
        want = want.detach().double()
        scale = max(float(want.abs().max()), 1e-30)
        worst = max(worst, float((got.detach().double() - want).abs().max()) / scale)
    return worst

