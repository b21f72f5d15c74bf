"""Who computes: one `Provider` per way of computing the ops, in `PROVIDERS`.

This package's backends (`reference`, `cpp`, `triton`, `cuda`), called through
`bimi_kernels.functional` with `backend=<name>`, and the code people write by hand today (the
peers):
- `reference-autograd`: the plain PyTorch math of `bimi_kernels.reference` through autograd (what
  a user gets without this package's kernels or custom ops);
- `iic-conv2d`: the joint counts as the original IIC code computes them (Ji et al. 2019,
  `IID_segmentation_loss`): both maps permuted to (K, B, *S) and the first convolved with the
  second as one whole-image filter, padding = radius; conv3d for volumes;
- `unfold`: `F.unfold` of the second map (every offset materialised) and one einsum; 2-D only;
- `gemm`: the authors' zero-offset form, maps reshaped to K x N and multiplied; offset 0 only;
- `voxelmorph-cc`: the boundary term with five full box convolutions (VoxelMorph's NCC), on the
  same uncertainty and edge maps as the reference;
- `unet-only`: for `train_step` only, the U-Net step with a stand-in loss of negligible cost
  (the step's floor).
For the MI term the peers' joint counts feed `bimi_kernels.reference.regularized_mi_from_counts`;
for the whole loss they are combined with `voxelmorph-cc` for the boundary term, the loss as one
would assemble it by hand.

A provider: its name, how it is called (for the CSV), the ops it implements, `compute(op, maps)`
for one head, why it cannot run a config (`unsupported`), where it is available (`unavailable`),
and its memory model (map-sized buffers, to skip what would not fit). Adding a provider is one
entry here; adding an op is one `Op` in workloads.py (which says how this package and the plain
reference compute it), plus a branch in the compute of each peer that offers it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

from bimi_kernels import reference
from bimi_kernels.backends import AUTO_ORDER, BACKEND_NAMES
from bimi_kernels.numerics import EPS_CC

from .workloads import MAP_OPS, OP_SPECS, Maps


# ------------------------------------------------------------------------------------------------
# the peers' math
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


def unfold_joint_counts(p1: torch.Tensor, p2: torch.Tensor, radius: int, dilation: int = 1) -> torch.Tensor:
    """F.unfold copies p2 once per offset: (B, K*(2r+1)^2, H*W), then one einsum over b and s."""
    batch, clusters, height, width = p1.shape
    side = 2 * radius + 1
    columns = F.unfold(p2, kernel_size=side, dilation=dilation, padding=radius * dilation)
    columns = columns.reshape(batch, clusters, side * side, height * width)  # channels (K, dy, dx)
    return torch.einsum("bis,bjos->oij", p1.reshape(batch, clusters, height * width), columns)


def gemm_joint_counts(p1: torch.Tensor, p2: torch.Tensor) -> torch.Tensor:
    """The authors' zero-offset form: (K x N) @ (N x K)."""
    clusters = p1.shape[1]
    first = p1.transpose(0, 1).reshape(clusters, -1)
    second = p2.transpose(0, 1).reshape(clusters, -1)
    return (first @ second.t()).unsqueeze(0)


def voxelmorph_ncc(u: torch.Tensor, e: torch.Tensor, window: int) -> torch.Tensor:
    """VoxelMorph's NCC loss: five full box convolutions (I, J, I^2, J^2, IJ), with the clamps of
    docs/contract.md §5 in place of VoxelMorph's `+1e-5` so that its value is this package's."""
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
    eps = EPS_CC
    cross = (ij_sum - u_j * i_sum - u_i * j_sum + u_i * u_j * win_size).clamp(min=eps)
    i_var = (i2_sum - 2 * u_i * i_sum + u_i * u_i * win_size).clamp(min=eps)
    j_var = (j2_sum - 2 * u_j * j_sum + u_j * u_j * win_size).clamp(min=eps)
    return -(cross * cross / (i_var * j_var)).mean()


def voxelmorph_boundary_loss(p1, p2, image, window: int, gamma: float = 0.75) -> torch.Tensor:
    edge = reference.edge_map(image, gamma, size=p1.shape[2:])
    u1 = reference.minmax_normalize(reference.uncertainty_map(p1))
    u2 = reference.minmax_normalize(reference.uncertainty_map(p2))
    return (voxelmorph_ncc(u1, edge, window) + voxelmorph_ncc(u2, edge, window)) / 2


# ------------------------------------------------------------------------------------------------
# computes: (op, maps of one head) -> tensor
# ------------------------------------------------------------------------------------------------
def _package_compute(backend: str) -> Callable:
    return lambda op, m: OP_SPECS[op].package(m, backend)


def _autograd_compute(op: str, m: Maps) -> torch.Tensor:
    return OP_SPECS[op].plain(m)


def _peer_compute(joint_counts: Callable) -> Callable:
    """A peer's joint counts, with the reference's MI epilogue and the VoxelMorph boundary term."""
    def compute(op: str, m: Maps) -> torch.Tensor:
        if op == "joint_counts":
            return joint_counts(m)
        if op == "mi":
            return reference.regularized_mi_from_counts(joint_counts(m))
        if op == "bimi":
            return (reference.regularized_mi_from_counts(joint_counts(m))
                    + voxelmorph_boundary_loss(m.p1, m.p2, m.image, m.window))
        raise KeyError(op)
    return compute


def _voxelmorph_compute(op: str, m: Maps) -> torch.Tensor:
    return voxelmorph_boundary_loss(m.p1, m.p2, m.image, m.window)


def _stand_in_loss(op: str, m: Maps) -> torch.Tensor:
    """`unet-only`: a loss that touches both maps (so backward runs through the whole network) at
    negligible cost."""
    return m.p1.mean() - m.p2.mean()


# ------------------------------------------------------------------------------------------------
# why a provider cannot run a config
# ------------------------------------------------------------------------------------------------
def _full_window(config) -> Optional[str]:
    if config.radius is None or config.dilation != 1:
        return "computes the full window {-r..r}^n only (no dilation, no explicit offset list)"
    return None


def _unfold_unsupported(config) -> Optional[str]:
    if len(config.spatial) != 2:
        return "F.unfold handles 2-D maps only"
    if config.radius is None:
        return "F.unfold computes a (dilated) window only, not an explicit offset list"
    return None


def _gemm_unsupported(config) -> Optional[str]:
    if config.radius != 0:
        return "gemm is the authors' zero-offset form; it has no neighbour offsets"
    return None


def _unet_unsupported(config) -> Optional[str]:
    return None if len(config.spatial) == 2 else "the demo's U-Net is 2-D"


def _package_unavailable(backend: str) -> Callable:
    def unavailable(device_type: str) -> Optional[str]:
        import bimi_kernels

        reason = bimi_kernels.available_backends(device_type).get(backend)
        if reason is None and backend == "triton" and device_type == "cpu":
            reason = ("on CPU Triton runs only under the interpreter (TRITON_INTERPRET=1), a testing "
                      "path, not a performance one")
        return reason
    return unavailable


# ------------------------------------------------------------------------------------------------
# the registry
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Provider:
    name: str
    kind: str  # "package" (this package's backends) or "peer"
    call: str  # how it is called, for the CSV
    ops: Tuple[str, ...]
    compute: Callable  # (op, Maps) -> tensor, one head
    copies: float  # map-sized buffers it needs forward (doubled backward), for the memory budget
    unsupported: Callable = field(default=lambda config: None)  # config -> why not, or None
    unavailable: Callable = field(default=lambda device_type: None)  # device type -> why not, or None
    copies_per_offset: float = 0.0  # extra map-sized buffers per offset (unfold)
    checked: bool = True  # computes what the reference computes (its results are compared)

    def memory_copies(self, config) -> float:
        from .roofline import offset_set

        return self.copies + self.copies_per_offset * len(offset_set(config))

    def why_not(self, op: str, config) -> Optional[str]:
        """Why it cannot run `op` on this config, or None (the op must be one of `ops`)."""
        if op == "train_step":
            return _unet_unsupported(config) or self.unsupported(config)
        return self.unsupported(config)


def _package(name: str) -> Provider:
    return Provider(name, "package", f"bimi_kernels.functional(..., backend={name!r})",
                    MAP_OPS + ("train_step",), _package_compute(name),
                    copies=8 if name == "reference" else 3, unavailable=_package_unavailable(name))


PEER_OPS = ("joint_counts", "mi", "bimi", "train_step")
PROVIDERS = {p.name: p for p in (
    _package("reference"),
    Provider("reference-autograd", "peer", "bimi_kernels.reference (plain PyTorch, autograd)",
             MAP_OPS + ("train_step",), _autograd_compute, copies=10),
    Provider("iic-conv2d", "peer",
             "conv(p1^T, weight=p2^T, padding=r) as in IIC; + reference RMI / voxelmorph-cc", PEER_OPS,
             _peer_compute(lambda m: iic_conv2d_joint_counts(m.p1, m.p2, m.offsets)), copies=10,
             unsupported=_full_window),
    Provider("unfold", "peer", "F.unfold(p2) + einsum; + reference RMI / voxelmorph-cc", PEER_OPS,
             _peer_compute(lambda m: unfold_joint_counts(m.p1, m.p2, m.offsets, m.dilation)), copies=4,
             copies_per_offset=3, unsupported=_unfold_unsupported),
    Provider("gemm", "peer", "(K x N) @ (N x K), offset 0 only; + reference RMI / voxelmorph-cc", PEER_OPS,
             _peer_compute(lambda m: gemm_joint_counts(m.p1, m.p2)), copies=6, unsupported=_gemm_unsupported),
    Provider("voxelmorph-cc", "peer", "five box convolutions (VoxelMorph NCC) on the reference U and E maps",
             ("boundary",), _voxelmorph_compute, copies=8),
    Provider("unet-only", "peer", "the U-Net step with a stand-in loss (mean p1 - mean p2): the step's floor",
             ("train_step",), _stand_in_loss, copies=0, checked=False),
    *(_package(name) for name in BACKEND_NAMES if name != "reference"),
)}
# The order of the rows and of each round of the interleaved repeats: the reference first (the
# correctness check compares with its outputs).
PROVIDER_ORDER = tuple(PROVIDERS)
PACKAGE_PROVIDERS = tuple(name for name, p in PROVIDERS.items() if p.kind == "package")
NATIVE = tuple(name for name in BACKEND_NAMES if name != "reference")  # the compiled backends
# per device type, the compiled backends in `auto`'s order of preference
NATIVE_FOR_DEVICE = {device: tuple(name for name in order if name != "reference")
                     for device, order in AUTO_ORDER.items()}
