"""The two-view helper: known transforms, seeded reproducibility, image/map alignment, mask."""
import math

import pytest
import torch

from bimi_kernels.views import (
    TwoViewTransform,
    affine_theta,
    colour_jitter,
    compose_theta,
    gamma_correction,
    random_affine_params,
    validity_mask,
    warp,
)


def _theta(rotation=0.0, scale=1.0, tx=0.0, ty=0.0, flip=False, size=(4, 4)):
    return affine_theta(
        torch.tensor([rotation]), torch.tensor([scale]), torch.tensor([[tx, ty]]), torch.tensor([flip]), size
    ).float()


def _blocks(batch=2, size=32, seed=0):
    """Piecewise-constant label maps (B, H, W) with large regions, values 0..3."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, 4, (batch, 1, 4, 4), generator=g).float()
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="nearest")[:, 0].long()


def test_identity_flip_rotation_translation_are_exact():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    assert torch.equal(warp(x, _theta(), mode="nearest"), x)
    assert torch.equal(warp(x, _theta(flip=True), mode="nearest"), torch.flip(x, dims=[-1]))
    # +90 degrees turns the content clockwise as displayed (row 0 at the top)
    assert torch.equal(warp(x, _theta(rotation=math.pi / 2), mode="nearest"), torch.rot90(x, -1, dims=(2, 3)))
    # a quarter of the width to the right: one pixel, zero padding on the left
    shifted = torch.zeros_like(x)
    shifted[..., 1:] = x[..., :-1]
    assert torch.equal(warp(x, _theta(tx=0.25), mode="nearest"), shifted)
    assert torch.equal(warp(x, _theta(tx=0.25), mode="bilinear"), shifted)


def test_rotation_is_rigid_on_non_square_images():
    # a 90-degree turn of a 4x8 image keeps a centred 4x4 square inside unchanged in shape
    x = torch.zeros(1, 1, 4, 8)
    x[..., :, 2:6] = torch.arange(16.0).reshape(4, 4)
    turned = warp(x, _theta(rotation=math.pi / 2, size=(4, 8)), mode="nearest")
    assert torch.equal(turned[..., :, 2:6], torch.rot90(x[..., :, 2:6], -1, dims=(2, 3)))


def test_seeded_views_are_reproducible_and_seed_dependent():
    images = torch.rand(3, 1, 24, 24, generator=torch.Generator().manual_seed(1))
    transform = TwoViewTransform()
    a = transform(images, generator=torch.Generator().manual_seed(7))
    b = transform(images, generator=torch.Generator().manual_seed(7))
    c = transform(images, generator=torch.Generator().manual_seed(8))
    for field in ("original", "transformed", "mask"):
        assert torch.equal(getattr(a, field), getattr(b, field))
    assert torch.equal(a.params.theta, b.params.theta)
    assert not torch.equal(a.params.theta, c.params.theta)
    assert not torch.equal(a.transformed, c.transformed)
    assert a.transformed.shape == images.shape and a.mask.shape == (3, 1, 24, 24)


def test_params_stay_in_their_ranges():
    p = random_affine_params(
        500, (16, 16), max_rotation=10, scale_range=(0.8, 1.2), max_translation=0.05, flip_prob=0.5,
        generator=torch.Generator().manual_seed(0),
    )
    assert p.rotation.abs().max() <= math.radians(10) + 1e-6
    assert 0.8 - 1e-6 <= p.scale.min() and p.scale.max() <= 1.2 + 1e-6
    assert p.translation.abs().max() <= 0.05 + 1e-6
    assert 0.35 < p.flip.float().mean() < 0.65
    assert p.theta.shape == (500, 2, 3)


def test_same_transform_aligns_image_and_map():
    """The image warped bilinear and its label map warped nearest with the same parameters
    still agree: the label map stays the segmentation of the warped image."""
    labels = _blocks()
    image = labels[:, None].float()  # an image whose intensity is its label
    params = random_affine_params(2, (32, 32), max_rotation=30, generator=torch.Generator().manual_seed(3))
    warped_image = warp(image, params.theta, mode="bilinear")[:, 0]
    warped_labels = warp(labels[:, None], params.theta, mode="nearest")[:, 0]
    assert warped_labels.dtype == labels.dtype
    valid = validity_mask(params.theta, (32, 32))[:, 0] > 0
    # away from region borders bilinear and nearest read the same value
    interior = (warped_image - warped_image.round()).abs() < 1e-4
    agree = warped_image.round().long() == warped_labels
    assert agree[valid & interior].all()
    assert agree[valid].float().mean() > 0.9


def test_align_brings_view_one_maps_into_view_two_frame():
    labels = _blocks(batch=3, size=40, seed=5)
    image = labels[:, None].float()
    transform = TwoViewTransform(brightness=0, contrast=0, noise_std=0, max_rotation=25)
    views = transform(image, generator=torch.Generator().manual_seed(11))
    assert torch.equal(views.original, image)  # no jitter asked for
    one_hot = torch.nn.functional.one_hot(labels, 4).permute(0, 3, 1, 2).float()  # maps from view 1
    aligned = views.align(one_hot).argmax(1)
    valid = views.mask[:, 0] > 0
    interior = (views.transformed[:, 0] - views.transformed[:, 0].round()).abs() < 1e-4
    assert (aligned == views.transformed[:, 0].round().long())[valid & interior].all()
    # maps at another resolution get the same transform and a mask of their size
    half = torch.nn.functional.avg_pool2d(one_hot, 2)
    assert views.align(half).shape == (3, 4, 20, 20)
    assert views.mask_like(half).shape == (3, 1, 20, 20)
    assert views.mask_like(half).dtype == views.mask.dtype == image.dtype
    # a float64 run keeps float64 masks at any resolution (the default dtype is float32)
    views64 = transform(image.double(), generator=torch.Generator().manual_seed(11))
    assert views64.mask_like(half.double()).dtype == views64.mask.dtype == torch.float64
    # 3-D maps or another batch: refused, as align refuses them (not a mask of the wrong shape)
    for wrong in (torch.rand(3, 4, 2, 20, 20), torch.rand(2, 4, 20, 20)):
        with pytest.raises(ValueError, match="maps: expected a \\(3, F, H', W'\\) tensor"):
            views.mask_like(wrong)
    with pytest.raises(ValueError, match="size: expected"):
        validity_mask(views.params.theta, (2, 20, 20))


def test_mask_marks_the_padding():
    theta = _theta(tx=0.25, size=(8, 8))
    mask = validity_mask(theta, (8, 8))
    assert torch.equal(mask[0, 0, :, 0], torch.zeros(8)) and torch.equal(mask[0, 0, :, 2:], torch.ones(8, 6))
    params = random_affine_params(4, (32, 32), max_rotation=30, max_translation=0.2, scale_range=(0.7, 1.0),
                                  generator=torch.Generator().manual_seed(2))
    ones = torch.ones(4, 1, 32, 32)
    mask = validity_mask(params.theta, (32, 32))
    bilinear, nearest = warp(ones, params.theta), warp(ones, params.theta, mode="nearest")
    assert torch.allclose(bilinear[mask > 0], torch.ones(())), "a valid pixel read only inside pixels"
    assert (mask[nearest == 0] == 0).all(), "every padded pixel is marked"
    assert 0 < mask.mean() < 1


def test_float64_mask_admits_no_padded_read():
    # seeds 5 and 10 each put one pixel between the float32 grid's limit (+1e-6) and float64's
    for seed in (5, 10):
        params = random_affine_params(8, (64, 64), max_rotation=45, max_translation=0.2, scale_range=(0.7, 1.3),
                                      generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        mask = validity_mask(params.theta, (64, 64), dtype=torch.float64)
        ones = warp(torch.ones(8, 1, 64, 64, dtype=torch.float64), params.theta)
        assert (ones[mask > 0] > 1 - 1e-12).all()


def test_intensity_jitter_touches_the_image_only():
    images = torch.rand(2, 1, 16, 16)
    views = TwoViewTransform(max_rotation=0, scale_range=(1, 1), max_translation=0, flip_prob=0)(
        images, generator=torch.Generator().manual_seed(0)
    )
    assert not torch.equal(views.original, images)  # jittered
    maps = torch.rand(2, 5, 16, 16)
    assert torch.equal(views.align(maps), maps)  # identity warp, no jitter on maps
    assert torch.equal(views.mask, torch.ones(2, 1, 16, 16))


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="x"):
        warp(torch.rand(4, 4), torch.zeros(1, 2, 3))
    with pytest.raises(ValueError, match="theta"):
        warp(torch.rand(2, 1, 4, 4), torch.zeros(1, 2, 3))
    with pytest.raises(ValueError, match="mode"):
        warp(torch.rand(1, 1, 4, 4), _theta(), mode="bicubic")
    with pytest.raises(ValueError, match="image"):
        TwoViewTransform()(torch.rand(1, 4, 4))
    with pytest.raises(ValueError, match="flip_prob"):
        random_affine_params(1, (4, 4), flip_prob=2.0)
    with pytest.raises(TypeError, match="image: expected a floating-point image"):
        TwoViewTransform()(torch.randint(0, 255, (2, 1, 8, 8), dtype=torch.uint8))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_images_are_placed_as_float32_ones(dtype):
    """The transforms and grids of bfloat16/float16 images are float32 (bfloat16's 8 bits cannot
    place a pixel on a 128-pixel image): the views are the float32 views, rounded to the dtype."""
    ramp = torch.arange(128.0).repeat(128, 1)[None, None] / 128  # x coordinate, exact in both dtypes
    ramp = torch.cat([ramp, ramp.transpose(-1, -2)], dim=1).repeat(2, 1, 1, 1)
    transform = TwoViewTransform(brightness=0, contrast=0, noise_std=0, max_rotation=30)
    exact = transform(ramp, generator=torch.Generator().manual_seed(3))
    low = transform(ramp.to(dtype), generator=torch.Generator().manual_seed(3))
    assert low.params.theta.dtype == torch.float32 and low.transformed.dtype == dtype
    assert torch.equal(low.mask, exact.mask.to(dtype))
    assert torch.equal(low.transformed, exact.transformed.to(dtype))


# The authors' setting (VIEW_SETTINGS["authors"]): shared transform, mirror, gamma, colour jitter.


def test_vertical_flip_and_composition_are_exact():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    up_down = affine_theta(torch.zeros(1), torch.ones(1), torch.zeros(1, 2), torch.tensor([False]), (4, 4),
                           flip_vertical=torch.tensor([True])).float()
    assert torch.equal(warp(x, up_down, mode="nearest"), torch.flip(x, dims=[-2]))
    quarter = _theta(rotation=math.pi / 2)
    mirror = _theta(flip=True)
    twice = warp(warp(x, quarter, mode="nearest"), mirror, mode="nearest")
    assert torch.equal(warp(x, compose_theta(quarter, mirror), mode="nearest"), twice)


def test_mirror_prob_mirrors_one_axis_picked_at_random():
    p = random_affine_params(2000, (8, 8), flip_prob=0.0, mirror_prob=0.9, generator=torch.Generator().manual_seed(0))
    either = p.flip ^ p.flip_vertical
    assert not (p.flip & p.flip_vertical).any()  # never both: one axis per draw
    assert 0.87 < either.float().mean() < 0.93
    assert 0.4 < p.flip.float().mean() / either.float().mean() < 0.6
    always = random_affine_params(50, (8, 8), flip_prob=0.0, mirror_prob=1.0, generator=torch.Generator().manual_seed(1))
    assert (always.flip ^ always.flip_vertical).all()


def test_authors_setting_is_seeded_and_has_its_ranges():
    transform = TwoViewTransform.named("authors")
    assert transform.gamma_range == (0.5, 2.0) and transform.mirror_prob == 0.9 and transform.flip_prob == 0.0
    assert transform.max_rotation == 45.0 and transform.scale_range == (0.8, 1.3) and transform.max_translation == 0.1
    assert transform.brightness_factor == (0.5, 1.5) and transform.contrast_factor == (0.5, 1.5)
    assert transform.has_shared and "gamma" in transform.describe()
    images = torch.rand(4, 1, 24, 24, generator=torch.Generator().manual_seed(1))
    a = transform(images, generator=torch.Generator().manual_seed(7))
    b = transform(images, generator=torch.Generator().manual_seed(7))
    c = transform(images, generator=torch.Generator().manual_seed(8))
    for field in ("original", "transformed", "mask"):
        assert torch.equal(getattr(a, field), getattr(b, field))
    assert torch.equal(a.shared.theta, b.shared.theta) and not torch.equal(a.params.theta, c.params.theta)
    assert 0 <= a.original.min() and a.original.max() <= 1 and 0 <= a.transformed.min() and a.transformed.max() <= 1
    with pytest.raises(ValueError, match="name"):
        TwoViewTransform.named("strong")


def test_views_under_a_default_device():
    """The parameters are drawn on the CPU (from a CPU generator) whatever the default device."""
    images = torch.rand(2, 1, 8, 8)
    expected = TwoViewTransform()(images, generator=torch.Generator().manual_seed(0))
    with torch.device("meta"):
        got = TwoViewTransform()(images, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(got.transformed, expected.transformed, rtol=0, atol=0)
    torch.testing.assert_close(got.params.theta, expected.params.theta, rtol=0, atol=0)


def test_mild_setting_is_the_default():
    images = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    a = TwoViewTransform()(images, generator=torch.Generator().manual_seed(3))
    b = TwoViewTransform.named("mild")(images, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.transformed, b.transformed) and torch.equal(a.original, b.original) and a.shared is None


def test_authors_views_align_maps_and_labels():
    """With the authors' geometry (shared rotate / flip / shift, then zoom, rotation and a mirror
    for view 2), view 1's maps warped by `align` land on view 2's content, and `labels_in_view2`
    carries the untransformed label map to the same place."""
    labels = _blocks(batch=4, size=40, seed=6)
    image = labels[:, None].float()
    geometry_only = TwoViewTransform.named("authors", gamma_range=None, brightness_factor=None, contrast_factor=None)
    views = geometry_only(image, generator=torch.Generator().manual_seed(12))
    assert views.params.flip_vertical is not None and views.shared is not None
    view1_labels = views.original[:, 0].round().long()  # view 1 = the shared transform only
    aligned = views.align(torch.nn.functional.one_hot(view1_labels, 4).permute(0, 3, 1, 2).float()).argmax(1)
    view2 = views.transformed[:, 0]
    valid = views.mask[:, 0] > 0
    interior = (view2 - view2.round()).abs() < 1e-4
    assert (aligned == view2.round().long())[valid & interior].all()
    carried = views.labels_in_view2(labels)
    assert (carried == view2.round().long())[valid & interior].float().mean() > 0.97
    # the intensity changes of the full setting touch the images only: same geometry, same mask
    full = TwoViewTransform.named("authors")(image / 3, generator=torch.Generator().manual_seed(12))  # in [0, 1]
    assert torch.equal(full.params.theta, views.params.theta) and torch.equal(full.mask, views.mask)


def test_colour_jitter_and_gamma_stay_in_range_and_keep_order():
    images = torch.rand(5, 1, 12, 12, generator=torch.Generator().manual_seed(4))
    jittered = colour_jitter(images, generator=torch.Generator().manual_seed(0))
    assert 0 <= jittered.min() and jittered.max() <= 1
    corrected = gamma_correction(images, (0.5, 2.0), generator=torch.Generator().manual_seed(0))
    assert 0 <= corrected.min() and corrected.max() <= 1
    # a power with a positive exponent keeps the order of every sample's pixels
    for original, new in zip(images.flatten(1), corrected.flatten(1)):
        assert torch.equal(torch.argsort(original), torch.argsort(new))
    assert torch.equal(gamma_correction(images, (1.0, 1.0)), images)


def test_authors_setting_refuses_images_outside_the_unit_range():
    """Its colour jitter and gamma clamp to [0, 1]: raw or z-scored intensities would be cut in
    silence (44 % of a 0..3000 image set to 1), so they are refused; the mild setting, additive
    only, takes any range."""
    generator = torch.Generator().manual_seed(0)
    authors = TwoViewTransform.named("authors")
    for image in (torch.rand(2, 1, 16, 16) * 3000, torch.randn(2, 1, 16, 16)):
        with pytest.raises(ValueError, match=r"intensities in \[0, 1\]"):
            authors(image, generator=generator)
        TwoViewTransform.named("mild")(image, generator=generator)
    authors(torch.rand(2, 1, 16, 16), generator=generator)
