"""What is benchmarked: the ops, the providers that implement them, and their inputs.

A *provider* is one way of computing an op. Two kinds:

- this package's backends (`reference`, `cpp`, `triton`, `cuda`), called through
  `bimi_kernels.functional` with `backend=<name>`;
- the code people write by hand today (the peers):
  - `iic-conv2d`: the joint counts as the original IIC code computes them (Ji et al. 2019,
    `IID_segmentation_loss`): both maps permuted to (K, B, *S) and the first convolved with the
    second as one whole-image filter, padding = radius; conv3d for volumes;
  - `unfold`: `F.unfold` of the second map (every offset materialised) and one einsum; 2-D only;
  - `gemm`: the authors' zero-offset form, maps reshaped to K x N and multiplied; offset 0 only;
  - `voxelmorph-cc`: the boundary term with five full box convolutions (the usual NCC code of
    VoxelMorph), on the same uncertainty and edge maps as the reference.

  For the MI term the peers' joint counts feed `bimi_kernels.reference.regularized_mi_from_counts`;
  for the whole loss they are combined with `voxelmorph-cc` for the boundary term — the loss as one
  would assemble it by hand.

The ops: `joint_counts` (|O|, K, K), `mi` (SPEC §4), `boundary` (SPEC §5, both maps, edge map
included) and `bimi` (SPEC §6), each timed in three modes: `forward` (inputs without grad),
`backward` (autograd.grad over a graph built once, retain_graph=True) and `forward+backward`.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

from bimi_kernels import reference
from bimi_kernels.offsets import make_offsets

OPS = ("joint_counts", "mi", "boundary", "bimi")
MODES = ("forward", "backward", "forward+backward")
BACKEND_PROVIDERS = ("reference", "cpp", "triton", "cuda")
PEER_PROVIDERS = ("iic-conv2d", "unfold", "gemm", "voxelmorph-cc")
ALL_PROVIDERS = BACKEND_PROVIDERS + PEER_PROVIDERS

# The ops each peer implements (backends implement all four).
PEER_OPS = {
    "iic-conv2d": ("joint_counts", "mi", "bimi"),
    "unfold": ("joint_counts", "mi", "bimi"),
    "gemm": ("joint_counts", "mi", "bimi"),
    "voxelmorph-cc": ("boundary",),
}

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
          "bfloat16": torch.bfloat16}


# ------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------
@dataclass
class Inputs:
    p1: torch.Tensor  # (B, K, *S) softmax maps, no grad
    p2: torch.Tensor
    image: torch.Tensor  # (B, 1, *S)
    radius: int  # offsets = the full window {-r..r}^n (SPEC §2)
    window: int  # box window of the boundary term
    grad_counts: torch.Tensor  # fixed upstream gradient of the joint_counts op, (|O|, K, K)

    @property
    def offsets(self):
        return make_offsets(self.radius, self.p1.dim() - 2)

    def map_bytes(self) -> int:
        return self.p1.numel() * self.p1.element_size()

    def input_bytes(self, op: str) -> int:
        """The bytes of what `op` reads: both maps, and the image for the boundary term."""
        image = self.image.numel() * self.image.element_size() if op in ("boundary", "bimi") else 0
        return 2 * self.map_bytes() + image


def make_inputs(config, device) -> Inputs:
    """Seeded inputs for a config: two softmax maps and an image. Same values for every provider."""
    generator = torch.Generator(device="cpu").manual_seed(1234)
    shape = (config.batch, config.clusters) + tuple(config.spatial)
    dtype = DTYPES[config.dtype]
    p1 = torch.softmax(torch.randn(shape, generator=generator), dim=1)
    p2 = torch.softmax(torch.randn(shape, generator=generator), dim=1)
    image = torch.rand((config.batch, 1) + tuple(config.spatial), generator=generator)
    num_offsets = (2 * config.radius + 1) ** len(config.spatial)
    grad_counts = torch.randn((num_offsets, config.clusters, config.clusters), generator=generator)
    accumulation = torch.float64 if dtype == torch.float64 else torch.float32
    return Inputs(
        p1=p1.to(device=device, dtype=dtype),
        p2=p2.to(device=device, dtype=dtype),
        image=image.to(device=device, dtype=dtype),
        radius=config.radius,
        window=config.window,
        grad_counts=grad_counts.to(device=device, dtype=accumulation),
    )


# ------------------------------------------------------------------------------------------------
# the peers
# ------------------------------------------------------------------------------------------------
def iic_conv2d_joint_counts(p1: torch.Tensor, p2: torch.Tensor, radius: int) -> torch.Tensor:
    """IIC's trick: (K, B, *S) maps, conv(p1, weight=p2, padding=r) gives K x K x (2r+1)^n.

    out[i, j, u] = sum_{b,t} p1[b, i, t + u - r] p2[b, j, t], i.e. offset d = r - u: flipping the
    spatial dims puts the offsets in the lexicographic order of `make_offsets`.
    """
    ndim = p1.dim() - 2
    conv = F.conv2d if ndim == 2 else F.conv3d
    clusters = p1.shape[1]
    first = p1.transpose(0, 1).contiguous()  # IIC: x1_outs.permute(1, 0, 2, 3).contiguous()
    second = p2.transpose(0, 1).contiguous()
    out = conv(first, weight=second, padding=radius)  # (K, K, *(2r+1,)*n)
    spatial_dims = tuple(range(2, 2 + ndim))
    return out.flip(spatial_dims).reshape(clusters, clusters, -1).permute(2, 0, 1)


def unfold_joint_counts(p1: torch.Tensor, p2: torch.Tensor, radius: int) -> torch.Tensor:
    """F.unfold copies p2 once per offset: (B, K*(2r+1)^2, H*W), then one einsum over b and s."""
    batch, clusters, height, width = p1.shape
    side = 2 * radius + 1
    columns = F.unfold(p2, kernel_size=side, padding=radius)  # channel order (K, dy, dx)
    columns = columns.reshape(batch, clusters, side * side, height * width)
    return torch.einsum("bis,bjos->oij", p1.reshape(batch, clusters, height * width), columns)


def gemm_joint_counts(p1: torch.Tensor, p2: torch.Tensor) -> torch.Tensor:
    """The authors' zero-offset form: (K x N) @ (N x K)."""
    clusters = p1.shape[1]
    first = p1.transpose(0, 1).reshape(clusters, -1)
    second = p2.transpose(0, 1).reshape(clusters, -1)
    return (first @ second.t()).unsqueeze(0)


def voxelmorph_ncc(u: torch.Tensor, e: torch.Tensor, window: int) -> torch.Tensor:
    """VoxelMorph's NCC loss: five full box convolutions (I, J, I^2, J^2, IJ), with the SPEC §5
    clamps in place of VoxelMorph's `+1e-5` so that its value is the one of this package."""
    ndim = u.dim() - 2
    conv = F.conv2d if ndim == 2 else F.conv3d
    sum_filter = torch.ones((1, 1) + (window,) * ndim, dtype=u.dtype, device=u.device)
    padding = window // 2
    i_sum = conv(u, sum_filter, padding=padding)
    j_sum = conv(e, sum_filter, padding=padding)
    i2_sum = conv(u * u, sum_filter, padding=padding)
    j2_sum = conv(e * e, sum_filter, padding=padding)
    ij_sum = conv(u * e, sum_filter, padding=padding)
    win_size = float(window**ndim)
    u_i, u_j = i_sum / win_size, j_sum / win_size
    eps = reference.EPS_CC
    cross = (ij_sum - u_j * i_sum - u_i * j_sum + u_i * u_j * win_size).clamp(min=eps)
    i_var = (i2_sum - 2 * u_i * i_sum + u_i * u_i * win_size).clamp(min=eps)
    j_var = (j2_sum - 2 * u_j * j_sum + u_j * u_j * win_size).clamp(min=eps)
    return -(cross * cross / (i_var * j_var)).mean()


def voxelmorph_boundary_loss(p1, p2, image, window: int, gamma: float = 0.75) -> torch.Tensor:
    edge = reference.edge_map(image, gamma, size=p1.shape[2:])
    u1 = reference.minmax_normalize(reference.uncertainty_map(p1))
    u2 = reference.minmax_normalize(reference.uncertainty_map(p2))
    return (voxelmorph_ncc(u1, edge, window) + voxelmorph_ncc(u2, edge, window)) / 2


def _peer_joint_counts(provider: str) -> Callable:
    if provider == "iic-conv2d":
        return lambda p1, p2, radius: iic_conv2d_joint_counts(p1, p2, radius)
    if provider == "unfold":
        return lambda p1, p2, radius: unfold_joint_counts(p1, p2, radius)
    if provider == "gemm":
        return lambda p1, p2, radius: gemm_joint_counts(p1, p2)
    raise KeyError(provider)


# ------------------------------------------------------------------------------------------------
# this package
# ------------------------------------------------------------------------------------------------
def _functional():
    """`bimi_kernels.functional`, or None while it is not importable (the reference module is then
    called directly for the `reference` provider)."""
    try:
        return importlib.import_module("bimi_kernels.functional")
    except ImportError:
        return None


def package_backend_reasons(device_type: str) -> dict:
    """{backend: None or why it is not benchmarked} for this package's backends on a device."""
    try:
        available = importlib.import_module("bimi_kernels").available_backends(device_type)
    except AttributeError:  # the package __init__ has not landed: ask the backend registry
        from bimi_kernels.backends import available_backends

        available = available_backends(device_type)
    reasons = dict(available)
    functional = _functional()
    for name in BACKEND_PROVIDERS:
        if functional is None and name != "reference":
            reasons[name] = "bimi_kernels.functional is not importable in this checkout"
    if device_type == "cpu" and reasons.get("triton") is None:
        reasons["triton"] = ("on CPU Triton runs only under the interpreter (TRITON_INTERPRET=1), "
                             "a testing path, not a performance one")
    return reasons


def describe(provider: str) -> str:
    """How a provider is called, for the CSV."""
    if provider in BACKEND_PROVIDERS:
        if _functional() is None:
            return "bimi_kernels.reference (plain autograd; functional not importable yet)"
        return f"bimi_kernels.functional(..., backend={provider!r})"
    return {
        "iic-conv2d": "conv(p1^T, weight=p2^T, padding=r) as in IIC; + reference RMI / voxelmorph-cc",
        "unfold": "F.unfold(p2) + einsum; + reference RMI / voxelmorph-cc",
        "gemm": "(K x N) @ (N x K), offset 0 only; + reference RMI / voxelmorph-cc",
        "voxelmorph-cc": "five box convolutions (VoxelMorph NCC) on the reference U and E maps",
    }[provider]


def applicable(provider: str, op: str) -> bool:
    """Whether a provider implements an op at all (no row is written when it does not)."""
    if provider in BACKEND_PROVIDERS:
        return True
    return op in PEER_OPS[provider]


def skip_reason(provider: str, op: str, config, backend_reasons: dict) -> Optional[str]:
    """Why an applicable provider cannot run this config (a row is written with the reason)."""
    if provider in BACKEND_PROVIDERS:
        reason = backend_reasons.get(provider)
        return None if reason is None else f"backend not available: {reason}"
    ndim = len(config.spatial)
    if provider == "gemm" and op != "boundary" and config.radius != 0:
        return "gemm is the authors' zero-offset form; it has no neighbour offsets (radius > 0)"
    if provider == "unfold" and op != "boundary" and ndim != 2:
        return "F.unfold handles 2-D maps only"
    return None


def build_op(provider: str, op: str, inputs: Inputs, p1: torch.Tensor, p2: torch.Tensor) -> Callable:
    """A zero-argument function computing `op` with `provider` on (p1, p2) (which may require grad)."""
    radius, window, image = inputs.radius, inputs.window, inputs.image
    if provider in BACKEND_PROVIDERS:
        functional = _functional()
        if functional is None:  # only `reference` gets here (see package_backend_reasons)
            offsets = make_offsets(radius, p1.dim() - 2)
            return {
                "joint_counts": lambda: reference.joint_counts(p1, p2, offsets),
                "mi": lambda: reference.regularized_mi(p1, p2, offsets),
                "boundary": lambda: reference.boundary_cc_loss(p1, p2, image, window),
                "bimi": lambda: reference.bimi_loss(p1, p2, image, offsets=offsets, window=window),
            }[op]
        return {
            "joint_counts": lambda: functional.joint_counts(p1, p2, offsets=radius, backend=provider),
            "mi": lambda: functional.regularized_mi(p1, p2, offsets=radius, backend=provider),
            "boundary": lambda: functional.boundary_cc_loss(p1, p2, image, window=window,
                                                            backend=provider),
            "bimi": lambda: functional.bimi_loss(p1, p2, image, offsets=radius, window=window,
                                                 backend=provider),
        }[op]
    if provider == "voxelmorph-cc":
        return lambda: voxelmorph_boundary_loss(p1, p2, image, window)
    counts = _peer_joint_counts(provider)
    if op == "joint_counts":
        return lambda: counts(p1, p2, radius)
    if op == "mi":
        return lambda: reference.regularized_mi_from_counts(counts(p1, p2, radius))
    if op == "bimi":
        return lambda: (reference.regularized_mi_from_counts(counts(p1, p2, radius))
                        + voxelmorph_boundary_loss(p1, p2, image, window))
    raise KeyError((provider, op))


def mode_callable(provider: str, op: str, mode: str, inputs: Inputs) -> Callable[[], Tuple]:
    """The zero-argument function that one timed repeat calls. It returns what it computed (the
    output for `forward`, the two gradients otherwise) so the caller can check and then drop it.

    `backward` runs the forward once here and then only autograd.grad(retain_graph=True).
    """
    if mode == "forward":
        fn = build_op(provider, op, inputs, inputs.p1, inputs.p2)
        return lambda: (fn(),)
    p1 = inputs.p1.detach().requires_grad_(True)  # same storage, no copy
    p2 = inputs.p2.detach().requires_grad_(True)
    fn = build_op(provider, op, inputs, p1, p2)
    grad_output = inputs.grad_counts if op == "joint_counts" else None
    if mode == "backward":
        out = fn()
        if grad_output is not None:
            grad_output = grad_output.to(out.dtype)
        return lambda: torch.autograd.grad(out, (p1, p2), grad_output, retain_graph=True)
    if mode == "forward+backward":
        def forward_backward():
            out = fn()
            upstream = None if grad_output is None else grad_output.to(out.dtype)
            return torch.autograd.grad(out, (p1, p2), upstream)
        return forward_backward
    raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")


# ------------------------------------------------------------------------------------------------
# size models: work (for the time budget), peak-memory estimates (for the memory budget) and the
# minimum bytes / flops of each op (for the GPU roofline)
# ------------------------------------------------------------------------------------------------
def _pixels(config) -> int:
    n = config.batch
    for size in config.spatial:
        n *= size
    return n


def num_offsets(config) -> int:
    return (2 * config.radius + 1) ** len(config.spatial)


def work_units(op: str, config) -> float:
    """A size measure that time scales with (roughly): pixels x (K^2 |O| for counts, K + w^n for
    the boundary term). Used to extrapolate a provider's time from its smaller configs."""
    pixels, k = _pixels(config), config.clusters
    counts = pixels * k * (k * num_offsets(config) + 1)
    boundary = pixels * (k + config.window ** len(config.spatial))
    return {"joint_counts": counts, "mi": counts, "boundary": boundary, "bimi": counts + boundary}[op]


def estimate_peak_bytes(provider: str, op: str, mode: str, config) -> int:
    """A generous estimate of the extra memory a provider needs (in map-sized buffers), only to
    skip what would not fit; the measured peak is what the results report."""
    map_bytes = _pixels(config) * config.clusters * torch.tensor([], dtype=DTYPES[config.dtype]).element_size()
    map_bytes = max(map_bytes, _pixels(config) * 4)  # accumulation is at least float32
    backward = mode != "forward"
    copies = {"reference": 8, "iic-conv2d": 10, "gemm": 6, "voxelmorph-cc": 8,
              "cpp": 3, "triton": 3, "cuda": 3}
    if provider == "unfold":
        factor = num_offsets(config) * (3 if backward else 2) + 4
    else:
        factor = copies.get(provider, 8) * (2 if backward else 1)
    if op in ("boundary", "bimi") and provider in ("reference", "voxelmorph-cc", "iic-conv2d",
                                                    "unfold", "gemm"):
        factor += 6  # the (B, K, *S) temporaries of the uncertainty map, twice
    return int(factor * map_bytes)


def roofline_bytes_flops(op: str, mode: str, config) -> Tuple[float, float]:
    """Lower bounds on memory traffic and flops: every input read once, every output written once,
    no recomputation. Joint counts: 2 B N K^2 |O| flops forward, twice that backward (two grads).
    Boundary term: per pixel and map ~3K for U, ~10 n for five separable box sums, ~20 for the NCC;
    doubled backward. Both maps count (the loss uses two)."""
    element = torch.tensor([], dtype=DTYPES[config.dtype]).element_size()
    pixels, k, ndim = _pixels(config), config.clusters, len(config.spatial)
    map_bytes = pixels * k * element
    image_bytes = pixels * element
    maps_moved = {"forward": 2, "backward": 4, "forward+backward": 6}[mode]  # read p1, p2 (+ grads)
    bytes_moved = maps_moved * map_bytes
    if op in ("boundary", "bimi"):
        bytes_moved += image_bytes
    flop_passes = {"forward": 1, "backward": 2, "forward+backward": 3}[mode]
    counts_flops = 2 * pixels * k * k * num_offsets(config) * flop_passes
    boundary_flops = 2 * pixels * (3 * k + 10 * ndim + 20) * flop_passes
    flops = {"joint_counts": counts_flops, "mi": counts_flops, "boundary": boundary_flops,
             "bimi": counts_flops + boundary_flops}[op]
    return float(bytes_moved), float(flops)
