"""The `bimi_kernels` arguments that reproduce each peer loss users come from (README, "Coming
from IIC or the authors' code"), checked against re-implementations in tests/peers.py."""
import pytest
import torch

import peers
from helpers import random_image

import bimi_kernels


def softmax_maps(shape, seed, dtype=torch.float64):
    """Two maps of logits; `loss_and_grads` takes their softmax, as a network's head does."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=dtype) for _ in range(2))


def assert_agree(peer, ours, rtol):
    """Relative to the largest magnitude, as every tolerance in this package."""
    error = ((ours - peer).abs().max() / peer.abs().max()).item()
    assert error <= rtol, f"relative difference {error:.3g} > {rtol:g}"


def loss_and_grads(fn, logits1, logits2, *args):
    """The loss of the two softmax maps and its gradients with respect to the logits (the
    authors normalise J by the pixel count, this package by its sum: equal for probability maps,
    and so are the gradients that reach the logits)."""
    a, b = logits1.clone().requires_grad_(True), logits2.clone().requires_grad_(True)
    loss = fn(a.softmax(1), b.softmax(1), *args)
    loss.backward()
    return loss.detach(), a.grad, b.grad


@pytest.mark.parametrize("half_window", [0, 1, 2])
def test_iic_collapsed(half_window):
    p1, p2 = softmax_maps((2, 6, 13, 15), half_window)
    ours = bimi_kernels.RegularizedMILoss(offsets=half_window, alpha=0.0, pool_offsets=True, eps_convention="clamp",
                                          backend="cpp")
    for a, b in zip(loss_and_grads(peers.iic_collapsed, p1, p2, half_window), loss_and_grads(ours, p1, p2)):
        assert_agree(a, b, 1e-10)


@pytest.mark.parametrize("half_window,lamb", [(1, 1.0), (2, 1.5)])
def test_iic_uncollapsed(half_window, lamb):
    p1, p2 = softmax_maps((2, 6, 13, 15), 7)
    ours = bimi_kernels.RegularizedMILoss(offsets=half_window, alpha=0.0, lamda=lamb, eps_convention="clamp")
    for a, b in zip(loss_and_grads(lambda x, y: peers.iic_uncollapsed(x, y, half_window, lamb), p1, p2),
                    loss_and_grads(ours, p1, p2)):
        assert_agree(a, b, 1e-10)


def test_default_eps_differs_from_iic_by_the_documented_shift():
    """eps added inside the logs (the default) moves the loss by about (K^2 - 2K) * 1e-5 when
    every entry of P is well above 1e-5 (docs/contract.md §4)."""
    k = 6
    p1, p2 = (x.softmax(1) for x in softmax_maps((4, k, 30, 30), 3))
    iic = peers.iic_collapsed(p1, p2, 1)
    ours = bimi_kernels.RegularizedMILoss(offsets=1, alpha=0.0, pool_offsets=True)(p1, p2)
    assert abs((ours - iic).item()) < 2 * (k * k - 2 * k) * 1e-5
    assert abs((ours - iic).item()) > 0.25 * (k * k - 2 * k) * 1e-5


@pytest.mark.parametrize("alpha,lamda", [(0.5, 1.0), (0.0, 2.0), (1.0, 1.0)])
def test_authors_redundancy_reduction(alpha, lamda):
    p1, p2 = softmax_maps((2, 10, 12, 11), 11)
    ours = bimi_kernels.RegularizedMILoss(offsets=0, alpha=alpha, lamda=lamda)
    for a, b in zip(loss_and_grads(lambda x, y: peers.authors_rr(x, y, alpha, lamda), p1, p2), loss_and_grads(ours, p1, p2)):
        assert_agree(a, b, 1e-10)


@pytest.mark.parametrize("window,power", [(5, 0.75), (3, 1.0)])
def test_authors_cross_correlation(window, power):
    p1, p2 = softmax_maps((2, 10, 16, 18), 5)
    image = random_image((2, 1, 24, 27), dtype=torch.float64)  # resized to the maps, as theirs is
    ours = bimi_kernels.BoundaryCCLoss(window=window, gamma=power)
    for a, b in zip(loss_and_grads(lambda x, y: peers.authors_cc(x, y, image, window, power), p1, p2),
                    loss_and_grads(lambda x, y: ours(x, y, image), p1, p2)):
        assert_agree(a, b, 1e-10)
