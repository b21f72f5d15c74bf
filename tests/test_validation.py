"""SPEC §9: every bad input raises ValueError/TypeError naming the argument, before any kernel."""
import pytest
import torch

import bimi_kernels
import bimi_kernels.functional as BF

from helpers import random_image, random_maps


@pytest.fixture
def good():
    p1, p2 = random_maps((2, 3, 6, 7), dtype=torch.float32)
    return p1, p2, random_image(p1.shape, dtype=torch.float32)


def loss(p1, p2, image=None, mask=None, **kwargs):
    return BF.bimi_loss(p1, p2, image, mask, **kwargs)


def test_shape_mismatch(good):
    p1, p2, image = good
    with pytest.raises(ValueError, match="p2: shape"):
        loss(p1, p2[:, :, :5], image)


@pytest.mark.parametrize("shape", [(3, 6, 7), (2, 3, 4, 5, 6, 7)])
def test_wrong_number_of_dims(shape):
    p = torch.rand(shape)
    with pytest.raises(ValueError, match="p1: expected shape"):
        loss(p, p, boundary_weight=0)


def test_k_below_two():
    p = torch.ones(2, 1, 5, 5)
    with pytest.raises(ValueError, match="p1: expected K >= 2"):
        loss(p, p, boundary_weight=0)


def test_offset_with_wrong_number_of_components(good):
    p1, p2, image = good
    with pytest.raises(ValueError, match="offsets: offset .* has 3 components"):
        loss(p1, p2, image, offsets=[(0, 0, 1)])


def test_offset_too_large(good):
    p1, p2, image = good
    with pytest.raises(ValueError, match="offsets: offset .* too large"):
        loss(p1, p2, image, offsets=[(6, 0)])
    with pytest.raises(ValueError, match="offsets: offset .* too large"):
        loss(p1, p2, image, offsets=4, dilation=2)


def test_negative_radius_and_bad_dilation(good):
    p1, p2, image = good
    with pytest.raises(ValueError, match="offsets: a window radius"):
        loss(p1, p2, image, offsets=-1)
    with pytest.raises(ValueError, match="dilation"):
        loss(p1, p2, image, offsets=1, dilation=0)


@pytest.mark.parametrize("window", [0, 4, -3])
def test_window_even_or_below_one(good, window):
    p1, p2, image = good
    with pytest.raises(ValueError, match="window: expected an odd int >= 1"):
        loss(p1, p2, image, window=window)
    with pytest.raises(ValueError, match="window"):
        bimi_kernels.BoundaryCCLoss(window=window)


@pytest.mark.parametrize("alpha", [-0.1, 1.5])
def test_alpha_outside_unit_interval(good, alpha):
    p1, p2, image = good
    with pytest.raises(ValueError, match=r"alpha: expected a number in \[0, 1\]"):
        loss(p1, p2, image, alpha=alpha)
    with pytest.raises(ValueError, match="alpha"):
        bimi_kernels.BIMILoss(alpha=alpha)


@pytest.mark.parametrize("lamda", [0.0, -1.0])
def test_lamda_not_positive(good, lamda):
    p1, p2, image = good
    with pytest.raises(ValueError, match="lamda: expected a number > 0"):
        loss(p1, p2, image, lamda=lamda)
    with pytest.raises(ValueError, match="lamda"):
        bimi_kernels.RegularizedMILoss(lamda=lamda)


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.complex64, torch.bool])
def test_integer_or_complex_dtypes(dtype):
    p = torch.ones(2, 3, 5, 5).to(dtype)
    with pytest.raises(TypeError, match="p1: expected a float dtype"):
        loss(p, p, boundary_weight=0)


def test_mixed_dtypes(good):
    p1, p2, image = good
    with pytest.raises(TypeError, match="p2: dtype"):
        loss(p1, p2.double(), image)


def test_not_a_tensor(good):
    p1, p2, image = good
    with pytest.raises(TypeError, match="p2: expected a torch.Tensor"):
        loss(p1, p2.numpy(), image)


def test_tensors_on_different_devices(good):
    p1, p2, image = good
    meta = p2.to("meta")
    with pytest.raises(ValueError, match="p2: on device meta"):
        loss(p1, meta, image)
    with pytest.raises(ValueError, match="image: on device meta"):
        loss(p1, p2, image.to("meta"))


def test_image_batch_mismatch(good):
    p1, p2, image = good
    with pytest.raises(ValueError, match="image: batch size 1 does not match"):
        loss(p1, p2, image[:1])


def test_image_wrong_dims(good):
    p1, p2, image = good
    with pytest.raises(ValueError, match="image: expected 4 dims"):
        loss(p1, p2, image[:, 0])


def test_image_missing_when_boundary_weight_positive(good):
    p1, p2, _ = good
    with pytest.raises(ValueError, match="image: required"):
        loss(p1, p2, None)
    with pytest.raises(ValueError, match="image: required"):
        bimi_kernels.BIMILoss()(p1, p2)


@pytest.mark.parametrize("shape", [(2, 6, 6), (2, 2, 6, 7), (1, 1, 6, 7), (2, 6, 7, 1)])
def test_mask_wrong_shape(good, shape):
    p1, p2, image = good
    with pytest.raises(ValueError, match="mask: expected shape"):
        loss(p1, p2, image, torch.ones(shape))


def test_mask_accepts_both_layouts_and_dtypes(good):
    p1, p2, image = good
    a = loss(p1, p2, image, torch.ones(2, 1, 6, 7, dtype=torch.bool))
    b = loss(p1, p2, image, torch.ones(2, 6, 7))
    torch.testing.assert_close(a, b)


def test_negative_loss_weight(good):
    p1, p2, image = good
    with pytest.raises(ValueError, match="mi_weight"):
        loss(p1, p2, image, mi_weight=-1.0)


def test_gamma_not_positive(good):
    p1, p2, image = good
    with pytest.raises(ValueError, match="gamma"):
        loss(p1, p2, image, gamma=0.0)


# ----------------------------------------------------------------------------------- value checks
def test_value_checks_only_when_asked(good, monkeypatch):
    p1, p2, image = good
    bad = p1.clone()
    bad[0, 0, 0, 0] = float("nan")
    monkeypatch.delenv("BIMI_VALIDATE", raising=False)
    loss(bad, p2, image)  # no sync, no check: the NaN just flows through
    with pytest.raises(ValueError, match=r"p1: contains 1 non-finite"):
        loss(bad, p2, image, validate=True)
    monkeypatch.setenv("BIMI_VALIDATE", "1")
    with pytest.raises(ValueError, match=r"p1: contains 1 non-finite"):
        loss(bad, p2, image)


def test_value_checks_negative_probabilities_and_image(good):
    p1, p2, image = good
    negative = p2.clone()
    negative[1, 2, 3, 4] = -0.5
    with pytest.raises(ValueError, match="p2: contains 1 negative probability"):
        loss(p1, negative, image, validate=True)
    inf_image = image.clone()
    inf_image[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="image: contains 1 non-finite"):
        loss(p1, p2, inf_image, validate=True)
    loss(p1, p2, image, validate=True)  # good inputs pass
