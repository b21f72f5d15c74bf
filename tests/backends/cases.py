"""The conformance suite's one case table, one tolerance table and one low-precision rule.

Every backend (tests/backends/conftest.py: the `backend` fixture) runs every case here against
`bimi_kernels.reference`. A case marked `interpreter=False` is too slow for Triton's CPU
interpreter (milliseconds per program instance); it runs on every other backend, and on the
Triton backend when it runs compiled on a GPU.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Optional

import torch

from helpers import random_image, random_maps  # noqa: F401

from bimi_kernels import reference
from bimi_kernels.numerics import accumulation_dtype
from bimi_kernels.offsets import flatten, make_offsets

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64

# relative error allowed against the reference, relative to the reference's largest magnitude
# (docs/contract.md §8), per accumulation dtype
RTOL = {F64: 1e-10, F32: 1e-5}
# the edge map is a few operations per pixel, no long sums: tighter
EDGE_RTOL = {F64: 1e-12, F32: 1e-6}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().cpu().double(), expected.detach().cpu().double()
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def assert_relative(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str) -> None:
    error = relative_error(actual, expected)
    assert error <= rtol, f"{what}: relative error {error:.3g} > {rtol:g}"


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, dtype: torch.dtype) -> None:
    """Within RTOL of the accumulation dtype of `dtype` (the maps' dtype)."""
    assert_relative(actual, expected, RTOL[accumulation_dtype(dtype)], what)


def assert_low_precision_rule(
    what: str, ours: torch.Tensor, own: torch.Tensor, truth: torch.Tensor, truncating_cast: bool = False
) -> None:
    """docs/contract.md §8 for float16/bfloat16 maps: the kernel's error against the float64
    result on the same (rounded) input values is at most twice the error of the reference itself
    run in that dtype, plus an absolute floor of the float32 tolerance (1e-5) of the largest true
    magnitude: such maps are computed in float32.

    `truncating_cast`: Triton's CPU interpreter casts float32 to bfloat16 by truncation, not
    rounding (up to 1 ulp where a GPU makes at most half of one): one bfloat16 ulp of the largest
    magnitude is added to the floor for a bfloat16 output computed there."""
    truth = truth.detach().cpu().double()
    floor = RTOL[F32] * truth.abs().max().item()
    if truncating_cast and ours.dtype == BF16:
        floor += torch.finfo(BF16).eps * truth.abs().max().item()
    error = (ours.detach().cpu().double() - truth).abs().max().item()
    reference_error = (own.detach().cpu().double() - truth).abs().max().item()
    assert error <= 2 * reference_error + floor, (
        f"{what}: error {error:.3g} > 2 x the reference's own {reference_error:.3g} + {floor:.3g}"
    )


def case_params(table: dict) -> list:
    """pytest params (name, dtype) for every case of a table and each of its dtypes, with
    readable ids such as "2d-K3-r1-mask-float64"."""
    import pytest

    return [
        pytest.param(name, dtype, id=f"{name}-{str(dtype).replace('torch.', '')}")
        for name, case in table.items()
        for dtype in case.dtypes
    ]


# ------------------------------------------------------------------------------------------------
# joint counts
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class JointCase:
    shape: tuple
    offsets: object  # a window radius or a list of n-tuples
    dilation: int = 1
    mask: str = "none"  # none | binary | weights (fractional) | zeros (everything masked)
    dtypes: tuple = (F64, F32)
    interpreter: bool = True

    def offset_set(self):
        return make_offsets(self.offsets, len(self.shape) - 2, self.dilation)


JOINT_CASES = {
    "2d-K3-r1": JointCase((2, 3, 9, 11), 1),
    "2d-K3-r1-mask": JointCase((2, 3, 9, 11), 1, mask="binary"),
    "2d-K3-r1-weights": JointCase((2, 3, 9, 11), 1, mask="weights"),
    "2d-K3-r1-all-masked": JointCase((2, 3, 6, 7), 1, mask="zeros", dtypes=(F64,)),
    "2d-K2-smaller-than-a-tile": JointCase((1, 2, 3, 4), 1, mask="binary"),
    "2d-K2-one-row": JointCase((2, 2, 1, 7), [(0, 0), (0, 3), (0, -6)]),
    "2d-K10-r3-mask-ragged": JointCase((2, 10, 20, 37), 3, mask="binary"),
    "2d-K10-r2": JointCase((2, 10, 11, 13), 2),
    "2d-K17-r2-dilation2": JointCase((1, 17, 19, 23), 2, 2),
    "2d-K17-r1-dilation2-mask": JointCase((1, 17, 13, 10), 1, 2, mask="binary"),
    "2d-K40-r0-mask": JointCase((1, 40, 12, 21), 0, mask="binary"),
    "2d-K10-list-mask": JointCase((1, 10, 18, 30), [(0, 0), (2, -5), (-7, 3), (0, 29)], mask="binary"),
    "2d-K10-sparse-far-rows": JointCase((1, 10, 40, 12), [(0, 0), (35, 0), (-39, 0), (20, 11)]),
    "2d-K10-r1-dilation8": JointCase((1, 10, 30, 31), 1, 8),
    "2d-K10-whole-rows": JointCase((2, 10, 20, 32), 1),
    # offsets along rows only, rows of whole vectors, no mask: cpp's forward reads p2 in place
    "2d-K40-r0-whole-rows": JointCase((2, 40, 9, 32), 0),
    "2d-K10-rows-only-whole-rows": JointCase((2, 10, 20, 16), [(0, 0), (-3, 0), (5, 0), (19, 0), (-19, 0)]),
    "3d-K3-rows-only-whole-rows": JointCase((1, 3, 4, 10, 16), [(0, 0, 0), (1, 0, 0), (-2, -1, 0), (3, 9, 0)]),
    "2d-K33-r0": JointCase((1, 33, 5, 6), 0),
    "2d-K64-r1-mask": JointCase((1, 64, 6, 7), 1, mask="binary"),
    "2d-K128-r1": JointCase((1, 128, 5, 6), 1),
    "3d-K3-r1-mask": JointCase((2, 3, 5, 6, 7), 1, mask="binary"),
    "3d-K10-r0": JointCase((2, 10, 4, 5, 6), 0),
    "3d-K10-list": JointCase((1, 10, 4, 9, 10), [(0, 0, 0), (1, -2, 3), (-3, 0, -1)]),
    "3d-K2-r1-dilation2-mask": JointCase((1, 2, 6, 11, 9), 1, 2, mask="binary"),
    "3d-K3-whole-rows": JointCase((1, 3, 3, 5, 16), 1),
    "3d-K17-r2": JointCase((1, 17, 5, 6, 7), 2),
    "3d-K33-r1-mask": JointCase((1, 33, 3, 4, 5), 1, mask="weights"),
}


def joint_inputs(case: JointCase, dtype: torch.dtype, device: str, seed: int = 0):
    """p1, p2 and the mask as the kernels take it: (B, *S) in the maps' dtype, or None."""
    p1, p2 = random_maps(case.shape, dtype=dtype, seed=seed, device=device)
    mask = make_mask(case.shape, case.mask, dtype, device, seed + 2)
    return p1, p2, mask


def make_mask(shape, kind: str, dtype: torch.dtype, device: str, seed: int = 2) -> Optional[torch.Tensor]:
    if kind == "none":
        return None
    g = torch.Generator().manual_seed(seed)
    values = torch.rand((shape[0],) + tuple(shape[2:]), generator=g, dtype=F64)
    mask = {
        "binary": (values < 0.7).to(F64),
        "weights": values,
        "zeros": torch.zeros_like(values),
    }[kind]
    return mask.to(device=device, dtype=dtype).contiguous()


def random_grad_j(n_offsets: int, k: int, dtype: torch.dtype, device: str, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n_offsets, k, k), generator=g, dtype=F64).to(device, dtype)


# the checks, for any object with the backend contract's kernels (bimi_kernels/backends.py)
def cpu(t, dtype=None):
    return None if t is None else t.cpu().to(dtype or t.dtype)


@dataclass(frozen=True)
class Bound:
    """A module's kernel functions with keyword settings bound (a launcher's explicit tile,
    config, ...), for the checks below; `forward_only` and `backward_only` name the settings
    that only one direction's kernels take."""

    module: object
    settings: dict = field(default_factory=dict)
    forward_only: tuple = ()
    backward_only: tuple = ()

    def _bind(self, name: str, backward: bool):
        skip = self.forward_only if backward else self.backward_only
        settings = {k: v for k, v in self.settings.items() if k not in skip}
        return functools.partial(getattr(self.module, name), **settings)

    def __getattr__(self, name: str):
        if name in ("joint_counts", "boundary_cc"):
            return self._bind(name, backward=False)
        if name in ("joint_counts_backward", "boundary_cc_backward"):
            return self._bind(name, backward=True)
        raise AttributeError(name)


def bound(module, forward_only=(), backward_only=(), **settings) -> Bound:
    return Bound(module, settings, tuple(forward_only), tuple(backward_only))


def check_joint(kernels, p1, p2, offsets, mask, truncating_cast: bool = False):
    """J and both gradients from `kernels` against the reference (on CPU): float32/float64 maps
    within RTOL, float16/bfloat16 maps by the low-precision rule (`truncating_cast`: see
    `assert_low_precision_rule`)."""
    dtype, k, flat = p1.dtype, p1.shape[1], flatten(offsets)
    counts = kernels.joint_counts(p1, p2, flat, mask)
    assert counts.shape == (len(offsets), k, k) and counts.dtype == accumulation_dtype(dtype)
    assert counts.device == p1.device
    grad_j = random_grad_j(len(offsets), k, counts.dtype, p1.device)
    grads = kernels.joint_counts_backward(grad_j, p1, p2, flat, mask)
    for got, like in zip(grads, (p1, p2)):
        assert got.shape == like.shape and got.dtype == like.dtype and got.device == like.device

    own = (reference.joint_counts(cpu(p1), cpu(p2), offsets, cpu(mask)),
           *reference.joint_counts_backward(cpu(grad_j), cpu(p1), cpu(p2), offsets, cpu(mask)))
    if dtype in (F64, F32):
        for what, got, want in zip(("J", "dL/dp1", "dL/dp2"), (counts, *grads), own):
            assert_close(got, want, what, dtype)
        return
    exact = [cpu(t, F64) for t in (p1, p2, mask)]
    truth = (reference.joint_counts(*exact[:2], offsets, exact[2]),
             *reference.joint_counts_backward(cpu(grad_j, F64), *exact[:2], offsets, exact[2]))
    assert_low_precision_rule("J", counts, own[0], truth[0])
    for what, got, o, t in zip(("dL/dp1", "dL/dp2"), grads, own[1:], truth[1:]):
        assert_low_precision_rule(what, got, o, t, truncating_cast)


def joint_maps(shape, dtype: torch.dtype, masked: bool, device: str, seed: int = 0):
    """p1, p2 and a binary mask (or None) for a shape, without a case."""
    return joint_inputs(JointCase(tuple(shape), 0, mask="binary" if masked else "none"), dtype, device, seed)


# ------------------------------------------------------------------------------------------------
# boundary term
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BoundaryCase:
    shape: tuple
    window: int
    dtypes: tuple = (F64, F32)
    interpreter: bool = True
    one_hot_extremes: bool = False  # put a sample's min of U last and its max first
    # Logits' scale. Near-uniform maps of many clusters have U within a few percent of log K
    # everywhere; the min-max then magnifies float32 rounding of U ~50x in any implementation
    # (reference included), so a large-K float32 case needs peaked maps to test the kernel.
    logit_scale: float = 1.0


BOUNDARY_CASES = {
    "2d-K3-w3": BoundaryCase((2, 3, 9, 11), 3),
    "2d-K3-w5": BoundaryCase((2, 3, 9, 11), 5),
    "2d-K10-w5-several-row-regions": BoundaryCase((2, 10, 37, 41), 5),
    "2d-K10-w3": BoundaryCase((2, 10, 13, 17), 3),
    "2d-K4-w7-larger-than-the-map": BoundaryCase((1, 4, 6, 5), 7),
    "2d-K4-w1-every-variance-clamped": BoundaryCase((2, 4, 8, 9), 1),
    "2d-K2-one-pixel": BoundaryCase((1, 2, 1, 1), 3, dtypes=(F64,)),
    "2d-K3-w5-several-chunks": BoundaryCase((2, 3, 70, 65), 5),
    "2d-K3-w5-extremes-in-other-chunks": BoundaryCase((2, 3, 70, 65), 5, one_hot_extremes=True),
    "2d-K3-w5-extremes-small": BoundaryCase((2, 3, 12, 13), 5, one_hot_extremes=True),
    "2d-K3-w11-more-than-7-rows": BoundaryCase((1, 3, 20, 24), 11),
    "2d-K128-w3": BoundaryCase((1, 128, 6, 7), 3, logit_scale=3.0),
    # near-uniform maps (early training at the authors' K = 40): U's range is ~150x narrower
    # than U, and the min-max magnifies U's float32 error by as much
    "2d-K40-w5-near-uniform": BoundaryCase((2, 40, 32, 32), 5, dtypes=(F32,),
                                           logit_scale=0.1),
    "3d-K3-w3": BoundaryCase((2, 3, 5, 6, 7), 3),
    "3d-K17-w3": BoundaryCase((2, 17, 5, 6, 7), 3),
    "3d-K2-w5-window-deeper-than-the-map": BoundaryCase((1, 2, 4, 5, 6), 5),
    "3d-K10-w5-several-plane-regions": BoundaryCase((1, 10, 9, 18, 10), 5),
    "3d-K2-w3-several-chunks": BoundaryCase((1, 2, 9, 30, 20), 3),
}


def boundary_inputs(case: BoundaryCase, dtype: torch.dtype, device: str, seed: int = 4):
    """p (in `dtype`) and an edge map (B, 1, *S) in its accumulation dtype."""
    g = torch.Generator().manual_seed(seed)
    p = (case.logit_scale * torch.randn(case.shape, generator=g, dtype=F64)).softmax(1)
    if case.one_hot_extremes:
        k = case.shape[1]
        corner_last = (slice(None), slice(None)) + (-1,) * (len(case.shape) - 2)
        corner_first = (slice(None), slice(None)) + (0,) * (len(case.shape) - 2)
        p[corner_last] = torch.nn.functional.one_hot(torch.tensor(0), k).to(F64)
        p[corner_first] = 1.0 / k
    image = random_image(case.shape, channels=2, dtype=F64, seed=seed + 1)
    edge = reference.edge_map(image).to(device, accumulation_dtype(dtype)).contiguous()
    return p.to(device, dtype), edge


# the check, for any object with the backend contract's kernels
def reference_cc_and_gradient(p, edge, window, grad_cc):
    """CC and grad_cc * dCC/dp by autograd through the reference forward (on CPU), independent of
    any written-out backward."""
    x = p.detach().cpu().requires_grad_(True)
    cc = reference.boundary_cc(x, edge.cpu(), window)
    (grad,) = torch.autograd.grad(cc, x, grad_cc.cpu().to(cc.dtype))
    return cc.detach(), grad


def run_kernels(kernels, p, edge, window, grad_scale):
    cc, u_range = kernels.boundary_cc(p, edge, window)
    grad_cc = torch.tensor(grad_scale, dtype=cc.dtype, device=p.device)
    grad = kernels.boundary_cc_backward(grad_cc, p, edge, u_range, window)
    return cc, u_range, grad_cc, grad


def check_boundary(kernels, p, edge, window, truncating_cast: bool = False):
    """CC, the uncertainty range and dCC/dp from `kernels` against the reference (on CPU):
    float64 within RTOL; float32 within twice the reference's own float32 error (the box sums
    cancel); float16/bfloat16 by the low-precision rule."""
    cc, u_range, grad_cc, grad = run_kernels(kernels, p, edge, window, 1.7)
    acc = accumulation_dtype(p.dtype)
    assert cc.dim() == 0 and cc.dtype == acc and cc.device == p.device
    assert u_range.shape == (p.shape[0], 2) and u_range.dtype == acc
    assert grad.shape == p.shape and grad.dtype == p.dtype and grad.device == p.device
    u = reference.uncertainty_map(cpu(p, acc)).flatten(1)
    assert_close(u_range, torch.stack([u.amin(1), u.amax(1)], 1), "u_range", p.dtype)
    expected_cc, expected_grad = reference_cc_and_gradient(p, edge, window, grad_cc)
    if p.dtype in (F16, BF16):
        exact_cc, exact_grad = reference_cc_and_gradient(p.double(), edge.double(), window, grad_cc.double())
        assert_low_precision_rule("CC", cc, expected_cc, exact_cc)
        assert_low_precision_rule("dL/dp", grad, expected_grad, exact_grad, truncating_cast)
        return
    if p.dtype == F64:
        assert_close(cc, expected_cc, "CC", p.dtype)
        if torch.count_nonzero(expected_grad) == 0:  # every window clamped: no gradient anywhere
            assert torch.count_nonzero(grad) == 0
        else:
            assert_close(grad, expected_grad, "dL/dp", p.dtype)
        return
    # float32: the box sums cancel (S(U^2) - S(U)^2 / n), so the reference's own float32 result
    # can be off by more than 1e-5; within twice its error against float64, or 1e-5
    cc64, grad64 = reference_cc_and_gradient(p.double(), edge.double(), window, grad_cc.double())
    for what, got, own, exact in (("CC", cc, expected_cc, cc64), ("dL/dp", grad, expected_grad, grad64)):
        assert_relative(got, exact, max(2 * relative_error(own, exact), RTOL[F32]), what)


# ------------------------------------------------------------------------------------------------
# edge map
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EdgeCase:
    shape: tuple  # of the image (B, C, *S)
    dtype: torch.dtype
    gamma: float


EDGE_CASES = {
    "2d-C1-f32": EdgeCase((4, 1, 32, 40), F32, 0.75),
    "2d-C3-f64-mean-over-channels": EdgeCase((2, 3, 9, 17), F64, 0.75),
    "3d-C2-f32-gamma1.5": EdgeCase((2, 2, 5, 9, 11), F32, 1.5),
    "2d-one-row": EdgeCase((1, 1, 1, 7), F32, 0.75),
    "2d-f16-image": EdgeCase((2, 1, 16, 33), F16, 0.3),
    # a gamma that float32 cannot hold: a kernel that takes it as float32 is off by ~1e-8 (on a
    # GPU; Triton's interpreter keeps a Python float argument in float64 anyway)
    "2d-f64-gamma0.7": EdgeCase((2, 1, 12, 19), F64, 0.7),
}


def edge_image(case: EdgeCase, device: str) -> torch.Tensor:
    return random_image(case.shape, channels=case.shape[1], dtype=case.dtype, seed=3, device=device)
