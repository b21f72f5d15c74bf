"""docs/contract.md §9: every bad input raises ValueError/TypeError naming the argument, before
any kernel runs; value checks run sampled on CPU by default, fully when asked."""
import fractions

import numpy as np
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


def test_offsets_given_as_a_tensor(good):
    """A tensor of offsets is refused by name (iterating a 0-dim tensor fails inside torch)."""
    p1, p2, image = good
    for offsets in (torch.tensor(1), torch.tensor([[0, 1], [1, 0]])):
        with pytest.raises(TypeError, match=r"offsets: .*got a tensor .*offsets.tolist\(\)"):
            loss(p1, p2, image, offsets=offsets)
        with pytest.raises(TypeError, match="offsets: "):
            bimi_kernels.BIMILoss(offsets=offsets)


def test_edge_that_is_not_a_tensor(good):
    p1, _, _ = good
    edge = torch.rand(p1.shape[0], 1, *p1.shape[2:])
    with pytest.raises(TypeError, match="edge: expected a torch.Tensor, got float"):
        bimi_kernels.functional.boundary_cc(p1, 1.0)
    with pytest.raises(ValueError, match="edge: expected shape"):
        bimi_kernels.functional.boundary_cc(p1, edge[:, :, 1:])


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


def test_an_unused_image_is_still_checked(good):
    """With boundary_weight=0 the image is not needed, but a wrong one passed anyway is reported,
    not ignored."""
    p1, p2, image = good
    with pytest.raises(ValueError, match="image: batch size 1 does not match"):
        loss(p1, p2, image[:1], boundary_weight=0)
    with pytest.raises(TypeError, match="image: expected a torch.Tensor"):
        bimi_kernels.BIMILoss(boundary_weight=0)(p1, p2, "not an image")
    assert torch.isfinite(loss(p1, p2, image, boundary_weight=0))


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


# ------------------------------------------------------------------------------ settings' types
@pytest.mark.parametrize(
    "setting,value,error,message",
    [
        ("alpha", torch.tensor(0.5), TypeError, "alpha: expected a Python number, got a torch.Tensor"),
        ("lamda", "1", TypeError, "lamda: expected a Python number"),
        ("symmetric", "no", TypeError, "symmetric: expected True or False"),
        ("symmetric", 0, TypeError, "symmetric: expected True or False"),
        ("pool_offsets", None, TypeError, "pool_offsets: expected True or False"),
        ("lamda", float("inf"), ValueError, "lamda: expected a finite number"),
        ("mi_weight", float("inf"), ValueError, "mi_weight: expected a finite number"),
        ("boundary_weight", float("nan"), ValueError, "boundary_weight: expected a finite number"),
        ("gamma", float("inf"), ValueError, "gamma: expected a finite number"),
        ("alpha", float("nan"), ValueError, "alpha: expected a finite number"),
        ("mi_weight", 10**400, ValueError, "mi_weight: expected a finite number"),
        ("alpha", fractions.Fraction(3, 2), ValueError, r"alpha: expected a number in \[0, 1\], got 1.5"),
        ("dilation", 1.5, TypeError, "dilation: expected a Python int"),
        ("window", 5.0, TypeError, "window: expected an odd int"),
        ("validate", "yes", TypeError, "validate: expected True or False"),
        ("eps_convention", "max", ValueError, "eps_convention: expected one of"),
    ],
)
def test_settings_of_the_wrong_type_or_not_finite(good, setting, value, error, message):
    p1, p2, image = good
    with pytest.raises(error, match=message):
        loss(p1, p2, image, **{setting: value})
    with pytest.raises(error, match=message):
        bimi_kernels.BIMILoss(**{setting: value})


def test_module_settings_are_attributes_and_checked_when_set(good):
    p1, p2, image = good
    loss_fn = bimi_kernels.BIMILoss(offsets=1, alpha=0.25)
    assert loss_fn.alpha == 0.25 and loss_fn.config.alpha == 0.25 and loss_fn.offsets == 1
    loss_fn.alpha = 0.75
    assert loss_fn.config.alpha == 0.75
    torch.testing.assert_close(loss_fn(p1, p2, image), loss(p1, p2, image, offsets=1, alpha=0.75))
    with pytest.raises(ValueError, match="alpha"):
        loss_fn.alpha = 2.0
    assert loss_fn.alpha == 0.75  # a rejected value leaves the config as it was
    with pytest.raises(TypeError, match="symmetric"):
        loss_fn.symmetric = "no"
    assert "alpha=0.75" in repr(loss_fn)


def test_other_number_types_are_stored_as_python_numbers(good):
    """A Fraction or a numpy scalar passes the checks and is kept as a float (an int for the int
    settings): a Fraction used to fail inside forward (Fraction * Tensor)."""
    p1, p2, image = good
    loss_fn = bimi_kernels.BIMILoss(offsets=1, mi_weight=fractions.Fraction(1, 3), lamda=fractions.Fraction(3, 2),
                                    alpha=np.float32(0.25), window=np.int64(3))
    config = loss_fn.config
    assert (type(config.mi_weight), type(config.lamda), type(config.alpha), type(config.window)) == (float, float, float, int)
    assert "alpha=0.25" in repr(loss_fn)
    expected = loss(p1, p2, image, offsets=1, mi_weight=1 / 3, lamda=1.5, alpha=0.25, window=3)
    torch.testing.assert_close(loss_fn(p1, p2, image), expected)
    # numpy's bool as a bool setting, stored as Python's
    flags = bimi_kernels.BIMILoss(symmetric=np.bool_(False), validate=np.bool_(True)).config
    assert (flags.symmetric, flags.validate) == (False, True) and type(flags.symmetric) is type(flags.validate) is bool


@pytest.mark.parametrize("module,setting", [(bimi_kernels.BoundaryCCLoss, "boundary_weight"),
                                            (bimi_kernels.BoundaryCCLoss, "alpha"),
                                            (bimi_kernels.RegularizedMILoss, "window"),
                                            (bimi_kernels.RegularizedMILoss, "mi_weight")])
def test_a_setting_the_module_does_not_take_is_refused(module, setting):
    """Reading or writing a loss setting the module does not take raises instead of being
    silently ignored (it would change nothing)."""
    loss_fn = module()
    with pytest.raises(AttributeError, match=f"has no setting '{setting}'"):
        setattr(loss_fn, setting, 0.0)
    with pytest.raises(AttributeError, match=f"has no setting '{setting}'"):
        getattr(loss_fn, setting)


@pytest.mark.parametrize("call,error,message", [
    (lambda img: BF.edge_map(img, size=8), TypeError, r"size: expected a sequence of 2 ints"),
    (lambda img: BF.edge_map(img, size=(0, 0)), ValueError, r"size: expected 2 ints >= 1"),
    (lambda img: BF.edge_map(img, size=(4, 4, 4)), ValueError, r"size: expected 2 ints >= 1"),
    (lambda img: BF.local_cross_correlation(img, img, 4), ValueError, r"window: expected an odd int"),
    (lambda img: BF.local_cross_correlation(img, img[..., 1:], 3), ValueError, r"u, e: expected two tensors of one shape"),
    (lambda img: BF.local_cross_correlation(img, img, 3, eps=0.0), ValueError, r"eps: expected a number > 0"),
    (lambda img: BF.local_cross_correlation(img, img, 3, eps=float("nan")), ValueError, r"eps: expected a finite"),
    (lambda img: BF.local_cross_correlation(img.long(), img.long(), 3), TypeError, r"u: expected a float dtype"),
    (lambda img: BF.boundary_cc(torch.full((1, 2, 8, 8), 0.5), (img * 10).long()), TypeError, r"edge: expected a float dtype"),
    (lambda img: BF.boundary_cc(torch.full((1, 2, 8, 8), 0.5), img > 0.5), TypeError, r"edge: expected a float dtype"),
    (lambda img: BF.boundary_cc(torch.full((1, 2, 8, 8), 0.5), img.cfloat()), TypeError, r"edge: expected a float dtype"),
    (lambda img: bimi_kernels.BIMILoss(process_group="gloo"), TypeError, r"process_group: expected None or a torch.distributed"),
    (lambda img: bimi_kernels.available_backends("tpu"), ValueError, r"device: 'tpu' is not a torch device"),
    (lambda img: BF.uncertainty_map(img[0, 0, 0]), ValueError, r"p: expected shape \(B, K, H, W\)"),
    (lambda img: BF.uncertainty_map(img[0]), ValueError, r"p: expected shape \(B, K, H, W\)"),
    (lambda img: BF.uncertainty_map(img.long()), TypeError, r"p: expected a float dtype"),
    (lambda img: BF.joint_distributions(img[0, 0]), ValueError, r"j: expected joint counts of shape"),
    (lambda img: BF.joint_distributions(img[0, :, :2]), ValueError, r"j: expected joint counts of shape"),
    (lambda img: BF.joint_distributions(img[0, :, :1, :1], symmetric=1), TypeError, r"symmetric: expected True"),
])
def test_helper_arguments_are_checked_by_name(call, error, message):
    """The functional helpers and the settings outside the loss's tensors name a bad argument
    (they used to fail inside torch, or accept an even window)."""
    with pytest.raises(error, match=message):
        call(torch.rand(1, 1, 8, 8))


# ----------------------------------------------------------------------------------- value checks
def test_sampled_check_reads_every_vmapped_call():
    """Under vmap the default check samples each call as it would alone: logits in one call of
    two hundred are caught (a fixed sample spread over the whole stack missed them)."""
    calls = 200
    p1, p2 = random_maps((calls, 3, 8, 8))
    p1[1] = torch.randn(3, 8, 8)
    loss_fn = bimi_kernels.BIMILoss(offsets=1, boundary_weight=0.0)
    with pytest.raises(ValueError, match="p1: .*logits"):
        loss_fn(p1[1:2], p2[1:2])
    with pytest.raises(ValueError, match="p1: .*logits"):
        torch.func.vmap(loss_fn)(p1[:, None], p2[:, None])


def test_sampled_check_reads_tensor_subclasses():
    """A tensor subclass (MONAI's MetaTensor, say) holding logits is caught as a plain tensor is;
    only fake and meta tensors, which have no values, are skipped."""

    class Tagged(torch.Tensor):
        pass

    p1, p2 = random_maps((2, 3, 8, 8))
    logits = torch.randn(2, 3, 8, 8, dtype=p2.dtype).as_subclass(Tagged)
    with pytest.raises(ValueError, match="p1: .*logits"):
        bimi_kernels.BIMILoss(offsets=1, boundary_weight=0.0)(logits, p2)


def test_logits_on_cpu_are_caught_by_default(good, monkeypatch):
    """The common mistake (logits for probabilities) is caught on CPU tensors without asking."""
    monkeypatch.delenv("BIMI_VALIDATE", raising=False)
    p1, p2, image = good
    logits = torch.randn_like(p1)
    with pytest.raises(ValueError, match=r"p1: .*negative .*softmax over dim 1"):
        loss(logits, p2, image)
    with pytest.raises(ValueError, match=r"p2: .*do not sum to 1"):
        loss(p1, p2 * 3, image)  # scores >= 0 that are not normalised
    with pytest.raises(ValueError, match=r"p1: .*negative"):
        bimi_kernels.RegularizedMILoss()(logits, p2)
    with pytest.raises(ValueError, match=r"p1: .*negative"):
        BF.joint_counts(logits, p2)
    edge = BF.edge_map(image)
    with pytest.raises(ValueError, match=r"p: .*negative"):
        BF.boundary_cc(logits, edge)
    BF.boundary_cc(logits, edge, validate=False)  # asked not to check: no error
    loss(logits, p2, image, validate=False)
    masked = p1.clone()
    masked[:, :, :3] = 0  # pixels zeroed by multiplying with a mask are accepted
    loss(masked, p2, image)


def test_sampled_check_reads_any_layout_and_catches_nan(good, monkeypatch):
    """The default check samples by logical index (any strides) and a NaN at a sampled pixel
    fails it (the comparisons are written so that NaN cannot pass)."""
    monkeypatch.delenv("BIMI_VALIDATE", raising=False)
    p1, p2, image = good
    bad = p2.clone()
    bad[0, 0, 0, 0] = float("nan")  # pixel 0 is always sampled
    with pytest.raises(ValueError, match=r"p2: contains 1 non-finite .*in a sample of pixels"):
        loss(p1, bad, image)
    logits = torch.randn_like(p1).contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match=r"p1: .*negative"):
        loss(logits, p2, image)
    loss(p1.contiguous(memory_format=torch.channels_last), p2, image)  # good values in any layout


def test_mask_weights_on_cpu_are_sampled_by_default(good, monkeypatch):
    """A float mask of intensities, or of -1/2 weights, is caught without asking (the full check
    counts every weight only with validate=True); bool masks have no range to check."""
    monkeypatch.delenv("BIMI_VALIDATE", raising=False)
    p1, p2, image = good
    mask = torch.ones(p1.shape[0], *p1.shape[2:])
    for bad in (mask * 2, -mask, mask * float("nan"), image[:, 0] * 300):
        with pytest.raises(ValueError, match=r"mask: contains .*outside \[0, 1\] \(in a sample"):
            loss(p1, p2, image, bad)
        with pytest.raises(ValueError, match=r"mask: contains .*outside \[0, 1\] \(in a sample"):
            bimi_kernels.RegularizedMILoss()(p1, p2, mask=bad)
        loss(p1, p2, image, bad, validate=False)  # asked not to check
    wide = mask.clone()[:, None].expand(-1, 1, -1, -1).contiguous(memory_format=torch.channels_last)
    loss(p1, p2, image, wide * 0.5)  # fractional weights, (B, 1, *S), any layout
    loss(p1, p2, image, mask > 0)


def test_sampled_checks_read_every_pixel_of_small_tensors(monkeypatch):
    """Below SAMPLED_PIXELS elements every one is read, the last rows too, for each vmapped call."""
    monkeypatch.delenv("BIMI_VALIDATE", raising=False)
    p1, p2 = random_maps((1, 3, 6, 6), dtype=torch.float32)
    mask = torch.ones(1, 6, 6)
    mask[:, 4:] = 7
    with pytest.raises(ValueError, match="mask: contains"):
        loss(p1, p2, None, mask, boundary_weight=0.0)
    tail = p1.clone()
    tail[:, :, 4:] = -tail[:, :, 4:]
    with pytest.raises(ValueError, match="p1: .*negative"):
        loss(tail, p2, None, boundary_weight=0.0)
    masks = torch.ones(4, 1, 6, 6)
    masks[3] = 2  # the last vmapped call's mask
    with pytest.raises(ValueError, match="mask: contains"):
        torch.func.vmap(lambda m: loss(p1, p2, None, m, boundary_weight=0.0))(masks)


def test_masks_of_every_integer_dtype_pass_the_sampled_check(good, monkeypatch):
    """torch.take has no uint16/32/64 kernel on the CPU: the check reads such masks another way."""
    monkeypatch.delenv("BIMI_VALIDATE", raising=False)
    p1, p2, image = good
    ones = torch.ones(p1.shape[0], *p1.shape[2:])
    expected = loss(p1, p2, image, ones)
    for dtype in (torch.uint8, torch.int16, torch.uint16, torch.uint32, torch.uint64, torch.int64):
        torch.testing.assert_close(loss(p1, p2, image, ones.to(dtype)), expected)
    with pytest.raises(ValueError, match="mask: contains"):
        loss(p1, p2, image, (2 * ones).to(torch.uint16))


def test_sampled_check_is_not_traced_by_compile(good, monkeypatch):
    monkeypatch.delenv("BIMI_VALIDATE", raising=False)
    p1, p2, image = good
    torch._dynamo.reset()
    compiled = torch.compile(bimi_kernels.BIMILoss(backend="reference"), fullgraph=True, backend="aot_eager")
    compiled(p1, p2, image)  # no graph break from the data-dependent check


# the shape checks still warn (shapes are constants of a trace, which is what jit.trace means),
# and torch 2.13 deprecates torch.jit.trace itself
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.filterwarnings(r"ignore:`torch\.jit\.trace.*is deprecated:DeprecationWarning")
def test_sampled_check_is_not_frozen_into_a_jit_trace(good, monkeypatch):
    """torch.jit.trace would record the sampled check's values as constants: it is skipped while
    tracing, and the traced loss gives the eager one."""
    from bimi_kernels import checks

    monkeypatch.delenv("BIMI_VALIDATE", raising=False)
    p1, p2, image = good
    loss_fn = bimi_kernels.BIMILoss(offsets=1)

    def refuse(*args, **kwargs):
        raise AssertionError("the sampled check ran while torch.jit.trace traced")

    monkeypatch.setattr(checks, "_sample_index", refuse)
    traced = torch.jit.trace(loss_fn, (p1, p2, image), check_trace=False)
    monkeypatch.undo()
    torch.testing.assert_close(traced(p1, p2, image), loss_fn(p1, p2, image))


def test_sampled_check_under_a_default_device(good, monkeypatch):
    """The sampled check's index lives on the CPU whatever the default device: with a meta default
    device it read garbage and refused good maps (and the bad index stayed cached)."""
    monkeypatch.delenv("BIMI_VALIDATE", raising=False)
    p1, p2, image = good
    p1, p2 = p1[:, :, :5], p2[:, :, :5]  # a shape no other test uses: a fresh cache entry
    image = image[:, :, :5]
    expected = loss(p1, p2, image, validate=False)
    with torch.device("meta"):
        torch.testing.assert_close(loss(p1, p2, image), expected)
        with pytest.raises(ValueError, match=r"p1: .*negative"):
            loss(p1 - 1, p2, image)
    torch.testing.assert_close(loss(p1, p2, image), expected)


def test_value_checks_only_when_asked(good, monkeypatch):
    p1, p2, image = good
    bad = p1.clone()
    bad[0, 0, 0, 0] = float("nan")
    monkeypatch.delenv("BIMI_VALIDATE", raising=False)
    loss(bad, p2, image, validate=False)  # no check at all: the NaN just flows through
    with pytest.raises(ValueError, match=r"p1: contains 1 non-finite"):
        loss(bad, p2, image, validate=True)
    monkeypatch.setenv("BIMI_VALIDATE", "1")
    with pytest.raises(ValueError, match=r"p1: contains 1 non-finite"):
        loss(bad, p2, image)


@pytest.mark.parametrize("value", ["0", "false", "FALSE", "no", "off", "Off", ""])
def test_bimi_validate_off_values(good, monkeypatch, value):
    """BIMI_VALIDATE is parsed as a boolean: these turn the full checks off (an earlier version
    treated 'no', 'off' and 'FALSE' as on)."""
    p1, p2, image = good
    bad = p1.clone()
    bad[0, 0, 1, 1] = float("nan")  # outside the sampled pixels of this shape
    monkeypatch.setenv("BIMI_VALIDATE", value)
    loss(bad, p2, image)


@pytest.mark.parametrize("value", ["1", "true", "TRUE", "yes", "on"])
def test_bimi_validate_on_values(good, monkeypatch, value):
    p1, p2, image = good
    bad = p1.clone()
    bad[0, 0, 1, 1] = float("nan")
    monkeypatch.setenv("BIMI_VALIDATE", value)
    with pytest.raises(ValueError, match="p1: contains 1 non-finite"):
        loss(bad, p2, image)


def test_bimi_validate_unknown_value_is_an_error(good, monkeypatch):
    p1, p2, image = good
    monkeypatch.setenv("BIMI_VALIDATE", "maybe")
    with pytest.raises(ValueError, match="BIMI_VALIDATE: expected one of"):
        loss(p1, p2, image)


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


def test_mask_weights_outside_the_unit_interval_fail_validation(good):
    """Mask values are weights in [0, 1] (docs/contract.md §2): fractional weights are used as
    given, values outside [0, 1] fail validate=True."""
    p1, p2, image = good
    weights = torch.rand(2, 1, 6, 7)
    loss(p1, p2, image, weights, validate=True)
    with pytest.raises(ValueError, match=r"mask: contains 1 value\(s\) outside \[0, 1\]"):
        bad = weights.clone()
        bad[0, 0, 0, 0] = 2.0
        loss(p1, p2, image, bad, validate=True)
