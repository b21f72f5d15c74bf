"""The reference math against independent formulations, closed forms and hand-made values."""
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import bimi_kernels.functional as BF
from bimi_kernels import reference as R
from bimi_kernels.offsets import make_offsets

from helpers import random_image, random_maps, random_mask


# ----------------------------------------------------------------------------------- joint counts
def iic_conv_joint_counts(p1, p2, radius):
    """The original IIC code's formulation: maps permuted to (K, B, *S), one convolved with the
    other as a whole-image filter with padding = radius. out[i, j, r - d] = J_d[i, j]."""
    ndim = p1.dim() - 2
    conv = F.conv2d if ndim == 2 else F.conv3d
    x1 = p1.transpose(0, 1).contiguous()
    x2 = p2.transpose(0, 1).contiguous()
    out = conv(x1, weight=x2, padding=radius)  # (K, K, 2r+1, ...)
    counts = [out[(slice(None), slice(None)) + tuple(radius - dk for dk in d)] for d in make_offsets(radius, ndim)]
    return torch.stack(counts)


@pytest.mark.parametrize("shape", [(2, 4, 9, 11), (1, 3, 5, 6, 7)])
@pytest.mark.parametrize("radius", [0, 1, 2])
def test_joint_counts_match_iic_conv_trick(shape, radius):
    p1, p2 = random_maps(shape)
    expected = iic_conv_joint_counts(p1, p2, radius)
    got = R.joint_counts(p1, p2, make_offsets(radius, len(shape) - 2))
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_joint_counts_hand_computed():
    # B=1, K=2, a 1x3 image. p1 columns: [1,0], [0.5,0.5], [0,1]; p2 columns: [0,1], [1,0], [0.25,0.75]
    p1 = torch.tensor([[[[1.0, 0.5, 0.0]], [[0.0, 0.5, 1.0]]]], dtype=torch.float64)
    p2 = torch.tensor([[[[0.0, 1.0, 0.25]], [[1.0, 0.0, 0.75]]]], dtype=torch.float64)
    j = R.joint_counts(p1, p2, ((0, 0), (0, 1), (0, -2)))
    # offset (0,0): sum_s p1[:,s] p2[:,s]^T
    j00 = torch.tensor([[0 + 0.5 + 0, 1 + 0 + 0], [0 + 0.5 + 0.25, 0 + 0 + 0.75]], dtype=torch.float64)
    # offset (0,1): pairs (0,1), (1,2): p1[:,0] p2[:,1]^T + p1[:,1] p2[:,2]^T
    j01 = torch.tensor([[1 + 0.125, 0 + 0.375], [0 + 0.125, 0 + 0.375]], dtype=torch.float64)
    # offset (0,-2): the pair (2, 0): p1[:,2] p2[:,0]^T
    j02 = torch.tensor([[0.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(j, torch.stack([j00, j01, j02]))


def test_joint_counts_3d_hand_computed():
    p1, p2 = random_maps((1, 2, 2, 2, 2))
    j = R.joint_counts(p1, p2, ((1, 0, -1),))
    # the only pairs: s = (0, h, 1), s + d = (1, h, 0) for h in {0, 1}
    expected = sum(torch.outer(p1[0, :, 0, h, 1], p2[0, :, 1, h, 0]) for h in range(2))
    torch.testing.assert_close(j[0], expected)


def test_mask_drops_pairs_with_an_invalid_pixel():
    p1, p2 = random_maps((1, 3, 4, 5))
    mask = torch.ones(1, 4, 5, dtype=torch.bool)
    mask[0, 1, 2] = False
    offsets = make_offsets(1, 2)
    got = R.joint_counts(p1, p2, offsets, mask)
    for o, d in enumerate(offsets):
        expected = torch.zeros(3, 3, dtype=torch.float64)
        for y, x in itertools.product(range(4), range(5)):
            t = (y + d[0], x + d[1])
            if 0 <= t[0] < 4 and 0 <= t[1] < 5 and mask[0, y, x] and mask[0, t[0], t[1]]:
                expected += torch.outer(p1[0, :, y, x], p2[0, :, t[0], t[1]])
        torch.testing.assert_close(got[o], expected)


@given(
    ndim=st.sampled_from([2, 3]),
    batch=st.integers(1, 2),
    k=st.integers(2, 6),
    sizes=st.lists(st.integers(1, 7), min_size=3, max_size=3),
    radius=st.integers(0, 2),
    dilation=st.integers(1, 2),
    use_mask=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_joint_counts_properties(ndim, batch, k, sizes, radius, dilation, use_mask, seed):
    spatial = tuple(sizes[:ndim])
    offsets = [d for d in make_offsets(radius, ndim, dilation) if all(abs(v) < s for v, s in zip(d, spatial))]
    shape = (batch, k) + spatial
    p1, p2 = random_maps(shape, seed=seed)
    mask = random_mask(shape, seed=seed + 1) if use_mask else None
    j = BF.joint_counts(p1, p2, offsets, mask=mask, backend="reference")
    assert j.shape == (len(offsets), k, k) and j.dtype == torch.float64
    # probabilities sum to one per pixel, so each offset's total is its number of valid pairs
    m = torch.ones((batch,) + spatial) if mask is None else mask.reshape((batch,) + spatial).double()
    for o, d in enumerate(offsets):
        pairs = R.joint_counts(m.unsqueeze(1), m.unsqueeze(1), (d,))[0, 0, 0]
        torch.testing.assert_close(j[o].sum(), pairs.double())
    # the counts are those of the padded-and-shifted formulation
    pad = [v for r in reversed(spatial) for v in (r, r)]
    big = F.pad(p2 * m.unsqueeze(1), pad)
    for o, d in enumerate(offsets):
        window = tuple(slice(r + dk, r + dk + r) for r, dk in zip(spatial, d))
        shifted = big[(slice(None), slice(None)) + window]
        torch.testing.assert_close(j[o], torch.einsum("bi...,bj...->ij", p1 * m.unsqueeze(1), shifted))


def test_joint_counts_backward_formula_matches_autograd():
    p1, p2 = random_maps((2, 3, 6, 7), requires_grad=True)
    mask = random_mask(p1.shape)
    offsets = make_offsets(1, 2, 2)
    g = torch.randn(len(offsets), 3, 3, dtype=torch.float64)
    (R.joint_counts(p1, p2, offsets, mask) * g).sum().backward()
    grad_p1, grad_p2 = R.joint_counts_backward(g, p1.detach(), p2.detach(), offsets, mask)
    torch.testing.assert_close(grad_p1, p1.grad)
    torch.testing.assert_close(grad_p2, p2.grad)


# ----------------------------------------------------------------------------------- regularised MI
def random_joint(k, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(k, k, generator=g, dtype=torch.float64) + 0.05
    return p / p.sum()


def entropy(p):
    return -(p * p.log()).sum()


def test_rmi_is_minus_mutual_information_at_alpha_0_lamda_1():
    p = random_joint(5)
    r, c = p.sum(1, keepdim=True), p.sum(0, keepdim=True)
    mutual_information = (p * (p / (r * c)).log()).sum()
    got = R.regularized_mi_of_distribution(p, alpha=0.0, lamda=1.0, eps=0.0)
    torch.testing.assert_close(got, -mutual_information)


@pytest.mark.parametrize("alpha,lamda", [(0.5, 1.0), (0.25, 2.0), (1.0, 0.5), (0.0, 1.5)])
def test_rmi_closed_form(alpha, lamda):
    k = 6
    p = random_joint(k, seed=3)
    cross_entropy_uniform_diagonal = -(torch.diagonal(p).log()).sum() / k
    expected = (1 - alpha) * entropy(p) + alpha * cross_entropy_uniform_diagonal - lamda * (
        entropy(p.sum(1)) + entropy(p.sum(0))
    )
    got = R.regularized_mi_of_distribution(p, alpha=alpha, lamda=lamda, eps=0.0)
    torch.testing.assert_close(got, expected)


def test_mi_mean_over_offsets_skips_offsets_without_pairs():
    j = torch.stack([random_joint(4, 0) * 10, torch.zeros(4, 4, dtype=torch.float64), random_joint(4, 1) * 3])
    j.requires_grad_(True)
    loss = R.regularized_mi_from_counts(j)
    per = R.regularized_mi_of_distribution(R.joint_distributions(j)[0])
    torch.testing.assert_close(loss, (per[0] + per[2]) / 2)
    loss.backward()
    assert torch.count_nonzero(j.grad[1]) == 0 and torch.isfinite(j.grad).all()


def test_mi_is_zero_with_zero_gradient_when_everything_is_masked():
    p1, p2 = random_maps((1, 3, 5, 5), requires_grad=True)
    mask = torch.zeros(1, 5, 5)
    loss = BF.regularized_mi(p1, p2, offsets=1, mask=mask, backend="reference")
    assert loss.item() == 0.0
    loss.backward()
    assert torch.count_nonzero(p1.grad) == 0 and torch.count_nonzero(p2.grad) == 0


def test_symmetric_distribution():
    j = random_joint(4).unsqueeze(0)
    p, valid = R.joint_distributions(j, symmetric=True)
    torch.testing.assert_close(p, p.transpose(-1, -2))
    torch.testing.assert_close(p.sum(), torch.tensor(1.0, dtype=torch.float64))
    assert bool(valid.all())


# ----------------------------------------------------------------------------------- boundary term
def naive_local_cc(u, e, window, eps=1e-5):
    """docs/contract.md §5 with explicit loops over window centres (numpy, float64)."""
    u, e = u.numpy()[:, 0], e.numpy()[:, 0]
    half, n = window // 2, float(window ** (u.ndim - 1))  # u.ndim counts the batch dim
    total, count = 0.0, 0
    for b in range(u.shape[0]):
        for centre in itertools.product(*(range(s) for s in u.shape[1:])):
            box = tuple(slice(max(c - half, 0), c + half + 1) for c in centre)
            uu, ee = u[b][box], e[b][box]
            su, se = uu.sum(), ee.sum()
            mu_u, mu_e = su / n, se / n
            cross = max((uu * ee).sum() - mu_e * su - mu_u * se + mu_u * mu_e * n, eps)
            var_u = max((uu * uu).sum() - 2 * mu_u * su + mu_u * mu_u * n, eps)
            var_e = max((ee * ee).sum() - 2 * mu_e * se + mu_e * mu_e * n, eps)
            total += cross * cross / (var_u * var_e)
            count += 1
    return -total / count


@pytest.mark.parametrize("shape,window", [((2, 1, 5, 6), 3), ((1, 1, 4, 5), 5), ((1, 1, 3, 4, 5), 3)])
def test_local_cc_known_values(shape, window):
    g = torch.Generator().manual_seed(0)
    u = torch.rand(shape, generator=g, dtype=torch.float64)
    e = torch.rand(shape, generator=g, dtype=torch.float64)
    got = R.local_cross_correlation(u, e, window)
    assert got.item() == pytest.approx(naive_local_cc(u, e, window), rel=1e-10)


def test_local_cc_is_minus_one_for_proportional_maps():
    g = torch.Generator().manual_seed(1)
    e = torch.rand(2, 1, 12, 12, generator=g, dtype=torch.float64)
    # U = 3 E holds in every window, the zero padding included (3 * 0 = 0): every ratio is 1
    assert R.local_cross_correlation(3 * e, e, window=3).item() == pytest.approx(-1.0, abs=1e-9)
    # an offset breaks proportionality only where a window reaches the zero padding
    shifted = R.local_cross_correlation(3 * e + 0.5, e, window=3).item()
    assert -1.0 < shifted < -0.5


def test_local_cc_clamps_negative_correlation():
    g = torch.Generator().manual_seed(2)
    e = torch.rand(1, 1, 10, 10, generator=g, dtype=torch.float64)
    # U = -E is anti-correlated in every window, the zero padding included
    u = (-e).requires_grad_(True)
    loss = R.local_cross_correlation(u, e, window=3)
    assert abs(loss.item()) < 1e-6  # cross clamped at eps: eps^2 / (var var) is tiny
    loss.backward()
    # only the variance term moves the clamped ratio: the gradient is tiny, not the -1 pull
    assert float(u.grad.abs().max()) < 1e-6


def test_edge_map_properties():
    image = random_image((2, 3, 8, 9), channels=3)
    e = R.edge_map(image, gamma=0.75)
    assert e.shape == (2, 1, 8, 9)
    assert float(e.min()) >= 0 and float(e.max()) <= 1
    assert not e.requires_grad
    # a constant image has no edges; a step has its edge on the step
    step = torch.zeros(1, 1, 6, 6, dtype=torch.float64)
    step[..., 3:] = 1
    e = R.edge_map(step, gamma=1.0)
    assert float(e[0, 0, 2, 3]) == pytest.approx(1.0, abs=1e-5) and float(e[0, 0, 2, 1]) == 0.0
    # resized when the image's size differs
    assert R.edge_map(random_image((1, 1, 16, 18)), size=(8, 9)).shape == (1, 1, 8, 9)


def test_uncertainty_map():
    p = torch.stack([torch.tensor([[1.0, 0.5]]), torch.tensor([[0.0, 0.5]])]).unsqueeze(0).double()
    u = R.uncertainty_map(p)
    torch.testing.assert_close(u[0, 0, 0], torch.tensor([0.0, math.log(2)], dtype=torch.float64))


def test_boundary_backward_formula_matches_autograd():
    p, _ = random_maps((2, 4, 7, 8), requires_grad=True)
    edge = R.edge_map(random_image(p.shape))
    R.boundary_cc(p, edge, 3).backward(torch.tensor(1.7, dtype=torch.float64))
    got = R.boundary_cc_backward(torch.tensor(1.7, dtype=torch.float64), p.detach(), edge, 3)
    torch.testing.assert_close(got, p.grad, rtol=1e-10, atol=1e-12)


def test_boundary_backward_formula_matches_autograd_3d():
    p, _ = random_maps((1, 3, 4, 5, 6), requires_grad=True)
    edge = R.edge_map(random_image(p.shape))
    R.boundary_cc(p, edge, 3).backward()
    got = R.boundary_cc_backward(torch.tensor(1.0, dtype=torch.float64), p.detach(), edge, 3)
    torch.testing.assert_close(got, p.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("offsets", [((1, 0),), ((0, 1, 0),)])
def test_an_offset_needs_one_component_per_spatial_dim(offsets):
    """The reference takes explicit offsets: one of the wrong length is refused, not silently
    truncated or padded by zip (a 2-component offset on a volume once counted as (1, 0, 0))."""
    p = torch.rand(1, 3, 4, 5, 6).softmax(1) if len(offsets[0]) == 2 else torch.rand(1, 3, 5, 6).softmax(1)
    with pytest.raises(ValueError, match="components for"):
        R.joint_counts(p, p, offsets)


def test_the_default_offset_fits_2d_and_3d_maps():
    """bimi_loss's default is offset 0 with one component per spatial dim of the maps."""
    for shape in ((1, 3, 5, 6), (1, 3, 4, 5, 6)):
        p1, p2 = random_maps(shape, dtype=torch.float64)
        zero = ((0,) * (len(shape) - 2),)
        assert R.bimi_loss(p1, p2, boundary_weight=0) == R.bimi_loss(p1, p2, offsets=zero, boundary_weight=0)


def test_an_int_radius_is_the_window_of_offsets():
    """As in BIMILoss(offsets=1): an int is the radius of the window {-r..r}^n, in 2-D and 3-D."""
    for shape in ((1, 3, 5, 6), (1, 3, 4, 5, 6)):
        p1, p2 = random_maps(shape, dtype=torch.float64)
        window = make_offsets(1, len(shape) - 2)
        assert torch.equal(R.joint_counts(p1, p2, 1), R.joint_counts(p1, p2, window))
        assert R.bimi_loss(p1, p2, offsets=1, boundary_weight=0) == R.bimi_loss(p1, p2, offsets=window, boundary_weight=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (cuDNN's TF32 default)")
def test_float32_box_sums_on_a_gpu_ignore_the_tf32_default(monkeypatch):
    """cuDNN convolutions default to TF32 (10 bits); the box sums must stay float32 sums, or the
    variances' cancellation turns the rounding into 1e-3 errors of the boundary term."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    p = torch.rand(2, 6, 64, 64, generator=torch.Generator().manual_seed(0)).softmax(1)
    image = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    exact = R.boundary_cc(p.double(), R.edge_map(image.double()), 5)
    on_gpu = R.boundary_cc(p.cuda(), R.edge_map(image.cuda()), 5).cpu().double()
    torch.testing.assert_close(on_gpu, exact, rtol=1e-5, atol=0)
    x = torch.rand(2, 1, 33, 47, dtype=torch.float64)
    torch.testing.assert_close(R.box_sum(x.float().cuda(), 5).cpu().double(), R.box_sum(x, 5), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape,window", [((2, 1, 9, 11), 5), ((1, 1, 4, 5, 6), 5), ((2, 1, 7, 8), 3), ((1, 1, 3, 3), 7)])
def test_pooled_box_sums_equal_the_convolution(shape, window):
    """The box sums off the CPU (average pools, immune to TF32) are the CPU's convolution with
    ones, maps smaller than the window included."""
    x = torch.rand(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(R.pooled_box_sum(x, window), R.box_sum(x, window), rtol=1e-14, atol=1e-14)


def test_local_cross_correlation_of_several_channels_is_the_mean_of_each():
    """(B, C, *S) maps, as documented: each channel's windows on their own, the mean over all."""
    u = torch.rand(2, 3, 9, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    e = torch.rand(2, 3, 9, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    each = [R.local_cross_correlation(u[:, c:c + 1], e[:, c:c + 1], 3) for c in range(3)]
    torch.testing.assert_close(BF.local_cross_correlation(u, e, 3), sum(each) / 3)
    x = torch.rand(2, 3, 5, 6, 7, dtype=torch.float64)
    torch.testing.assert_close(R.box_sum(x, 3), R.pooled_box_sum(x, 3), rtol=1e-14, atol=1e-14)
