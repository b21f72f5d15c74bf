"""The custom ops, functional API and modules (reference backend): agreement with the
reference's autograd, gradcheck in float64, low precision, no in-place changes, dispatch."""
import warnings

import pytest
import torch

import bimi_kernels
import bimi_kernels.functional as BF
from bimi_kernels import reference as R
from bimi_kernels.offsets import make_offsets

from helpers import random_image, random_maps, random_mask


def freeze_uncertainty_extremes(p):
    """gradcheck helper: the min-max normalisation of U is detached, so a finite difference at
    the pixel holding a sample's min or max of U moves the normaliser, which the analytic
    gradient by definition ignores. Hold those pixels fixed; everything else is checked."""
    u = R.uncertainty_map(p.detach()).flatten(1)
    keep = torch.ones_like(u)
    rows = torch.arange(u.shape[0])
    keep[rows, u.argmin(1)] = 0
    keep[rows, u.argmax(1)] = 0
    keep = keep.reshape((p.shape[0], 1) + tuple(p.shape[2:]))
    fixed = p.detach().clone()
    return lambda x: x * keep + fixed * (1 - keep)


# ----------------------------------------------------------------------------------- gradcheck
@pytest.mark.parametrize("shape", [(2, 3, 5, 6), (1, 3, 3, 4, 5)])
def test_gradcheck_joint_counts_with_offsets_and_mask(shape):
    p1, p2 = random_maps(shape, requires_grad=True)
    mask = random_mask(shape)
    f = lambda a, b: BF.joint_counts(a, b, offsets=1, mask=mask, backend="reference")  # noqa: E731
    assert torch.autograd.gradcheck(f, (p1, p2))


def test_gradcheck_joint_counts_explicit_offsets_dilation():
    p1, p2 = random_maps((1, 3, 6, 7), requires_grad=True)
    f = lambda a, b: BF.joint_counts(a, b, offsets=[(0, 0), (2, -3), (-1, 1)], backend="reference")  # noqa: E731
    assert torch.autograd.gradcheck(f, (p1, p2))
    g = lambda a, b: BF.joint_counts(a, b, offsets=1, dilation=2, backend="reference")  # noqa: E731
    assert torch.autograd.gradcheck(g, (p1, p2))


@pytest.mark.parametrize("symmetric", [True, False])
def test_gradcheck_regularized_mi(symmetric):
    p1, p2 = random_maps((1, 4, 5, 6), requires_grad=True)
    mask = random_mask(p1.shape)
    f = lambda a, b: BF.regularized_mi(  # noqa: E731
        a, b, offsets=1, alpha=0.3, lamda=1.5, symmetric=symmetric, mask=mask, backend="reference"
    )
    assert torch.autograd.gradcheck(f, (p1, p2))


@pytest.mark.parametrize("shape,window", [((2, 3, 7, 8), 3), ((1, 3, 4, 5, 6), 3), ((1, 4, 9, 9), 5)])
def test_gradcheck_boundary_loss(shape, window):
    p1, p2 = random_maps(shape, requires_grad=True)
    image = random_image(shape, channels=2)
    freeze1, freeze2 = freeze_uncertainty_extremes(p1), freeze_uncertainty_extremes(p2)
    f = lambda a, b: BF.boundary_cc_loss(freeze1(a), freeze2(b), image, window=window, backend="reference")  # noqa: E731
    # fast mode checks random projections of the Jacobian: the same test at a fraction of the cost
    assert torch.autograd.gradcheck(f, (p1, p2), fast_mode=True)


@pytest.mark.parametrize("shape", [(2, 3, 6, 7), (1, 3, 3, 4, 5)])
def test_gradcheck_full_loss(shape):
    p1, p2 = random_maps(shape, requires_grad=True)
    image, mask = random_image(shape), random_mask(shape)
    freeze1, freeze2 = freeze_uncertainty_extremes(p1), freeze_uncertainty_extremes(p2)
    loss_fn = bimi_kernels.BIMILoss(offsets=1, window=3, backend="reference")
    f = lambda a, b: loss_fn(freeze1(a), freeze2(b), image, mask)  # noqa: E731
    assert torch.autograd.gradcheck(f, (p1, p2), fast_mode=True)


# ----------------------------------------------------------------------------------- vs reference
@pytest.mark.parametrize("shape", [(2, 5, 9, 10), (2, 3, 4, 5, 6)])
@pytest.mark.parametrize("offsets,dilation", [(0, 1), (1, 1), (1, 2), ("explicit", 1)])
def test_module_matches_reference_autograd(shape, offsets, dilation):
    ndim = len(shape) - 2
    if offsets == "explicit":
        offsets = [(0,) * ndim, (1,) + (0,) * (ndim - 1), (0,) * (ndim - 1) + (-2,)]
    p1, p2 = random_maps(shape, requires_grad=True)
    image, mask = random_image(shape, channels=3), random_mask(shape)
    kwargs = dict(alpha=0.4, lamda=1.2, mi_weight=0.7, boundary_weight=1.3, window=3, gamma=0.5)
    loss = bimi_kernels.BIMILoss(offsets=offsets, dilation=dilation, backend="reference", **kwargs)(p1, p2, image, mask)
    grads = torch.autograd.grad(loss, (p1, p2))
    expected = R.bimi_loss(p1, p2, image, mask, offsets=make_offsets(offsets, ndim, dilation), **kwargs)
    expected_grads = torch.autograd.grad(expected, (p1, p2))
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)


def test_three_modules_compose():
    p1, p2 = random_maps((2, 4, 8, 8))
    image = random_image(p1.shape)
    mi = bimi_kernels.RegularizedMILoss(offsets=1)(p1, p2)
    cc = bimi_kernels.BoundaryCCLoss()(p1, p2, image)
    full = bimi_kernels.BIMILoss(offsets=1)(p1, p2, image)
    torch.testing.assert_close(full, mi + cc)
    assert cc.item() < 0


def test_regularized_mi_takes_its_mask_by_keyword_and_deprecates_the_positional_one():
    """BIMILoss's third argument is the image, so the MI module's positional mask is ambiguous:
    still the mask for one release, with a FutureWarning (shown by default) at the caller's line."""
    p1, p2 = random_maps((2, 3, 6, 6))
    image = random_image(p1.shape)
    mask = (torch.rand(2, 6, 6) > 0.3).to(p1.dtype)
    by_keyword = bimi_kernels.RegularizedMILoss()(p1, p2, mask=mask)
    torch.testing.assert_close(by_keyword, bimi_kernels.BIMILoss(boundary_weight=0.0)(p1, p2, mask=mask))
    with pytest.warns(FutureWarning, match="pass the mask by keyword") as record:
        by_position = bimi_kernels.RegularizedMILoss()(p1, p2, mask)
    assert record[0].filename == __file__
    assert torch.equal(by_position, by_keyword)
    with pytest.raises(TypeError, match="by keyword"):
        bimi_kernels.RegularizedMILoss()(p1, p2, mask, image)
    with pytest.raises(TypeError, match="by keyword"):
        bimi_kernels.RegularizedMILoss()(p1, p2, image, mask=mask)


def test_a_one_pixel_window_warns_that_the_boundary_term_is_constant():
    p1, p2 = random_maps((1, 3, 6, 6))
    image = random_image(p1.shape)
    with pytest.warns(UserWarning, match="window=1: .*constant -1") as record:
        loss = bimi_kernels.BoundaryCCLoss(window=1)
    assert record[0].filename == __file__  # the user's line, not ours
    assert loss(p1, p2, image).item() == -1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bimi_kernels.BIMILoss(window=1, boundary_weight=0.0)  # the term is off: nothing to say
    # code typed at a prompt (a "<...>" file) is the user's line too
    with pytest.warns(UserWarning, match="window=1") as record:
        exec(compile("bimi_kernels.BoundaryCCLoss(window=1)", "<console>", "exec"),
             {"bimi_kernels": bimi_kernels, "__name__": "__main__"})
    assert record[0].filename == "<console>"
    # and a compiled call traces: the warning is for eager code only
    torch._dynamo.reset()
    compiled = torch.compile(lambda a, b, i: BF.bimi_loss(a, b, i, window=1), fullgraph=True, backend="eager")
    with pytest.warns(UserWarning, match="window=1"):
        expected = bimi_kernels.BIMILoss(window=1)(p1, p2, image)
    assert compiled(p1, p2, image).item() == pytest.approx(expected.item())


def test_boundary_weight_zero_needs_no_image():
    p1, p2 = random_maps((1, 3, 6, 6))
    loss = bimi_kernels.BIMILoss(boundary_weight=0.0)(p1, p2)
    torch.testing.assert_close(loss, bimi_kernels.RegularizedMILoss()(p1, p2))


def test_both_weights_zero_gives_a_zero_that_backward_accepts():
    """Both terms off (an ablation): an exact 0 in the graph of the maps, so that loss.backward()
    works and gives zero gradients, even where a map holds a nan."""
    p1, p2 = random_maps((1, 3, 6, 6), requires_grad=True)
    loss = bimi_kernels.BIMILoss(mi_weight=0.0, boundary_weight=0.0, validate=False)(p1, p2)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(p1.grad, torch.zeros_like(p1)) and torch.equal(p2.grad, torch.zeros_like(p2))
    with torch.no_grad():
        p1[0, 0, 0, 0] = float("nan")
    assert bimi_kernels.BIMILoss(mi_weight=0.0, boundary_weight=0.0, validate=False)(p1, p2).item() == 0.0


def test_image_is_resized_to_the_maps():
    p1, p2 = random_maps((1, 3, 8, 8))
    big = random_image((1, 3, 16, 16), channels=1)
    loss = BF.boundary_cc_loss(p1, p2, big)
    small = torch.nn.functional.interpolate(big, size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(loss, BF.boundary_cc_loss(p1, p2, small))


# ----------------------------------------------------------------------------------- numerics
def test_output_dtypes():
    for dtype, loss_dtype in [(torch.float64, torch.float64), (torch.float32, torch.float32),
                              (torch.float16, torch.float32), (torch.bfloat16, torch.float32)]:
        p1, p2 = random_maps((1, 3, 6, 6), dtype=dtype, requires_grad=True)
        loss = bimi_kernels.BIMILoss(offsets=1)(p1, p2, random_image(p1.shape))
        assert loss.dtype == loss_dtype and loss.shape == ()
        loss.backward()
        assert p1.grad.dtype == dtype and p2.grad.dtype == dtype
        assert BF.joint_counts(p1, p2).dtype == loss_dtype


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_close_to_float64(dtype):
    p1, p2 = random_maps((2, 6, 16, 16))
    image = random_image(p1.shape)
    exact = bimi_kernels.BIMILoss(offsets=1)(p1, p2, image)
    low = bimi_kernels.BIMILoss(offsets=1)(p1.to(dtype), p2.to(dtype), image.to(dtype))
    assert low.dtype == torch.float32
    tolerance = 2e-2 if dtype == torch.bfloat16 else 3e-3
    assert abs(low.item() - exact.item()) <= tolerance * max(1.0, abs(exact.item()))


def test_deterministic():
    p1, p2 = random_maps((2, 4, 9, 9), dtype=torch.float32, requires_grad=True)
    image = random_image(p1.shape, dtype=torch.float32)
    runs = []
    for _ in range(2):
        loss = bimi_kernels.BIMILoss(offsets=1)(p1, p2, image)
        runs.append((loss.detach(),) + torch.autograd.grad(loss, (p1, p2)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_inputs_are_not_modified():
    p1, p2 = random_maps((2, 4, 7, 8), requires_grad=True)
    image, mask = random_image(p1.shape), random_mask(p1.shape)
    before = [t.detach().clone() for t in (p1, p2, image, mask)]
    loss = bimi_kernels.BIMILoss(offsets=1)(p1, p2, image, mask)
    loss.backward()
    for t, b in zip((p1, p2, image, mask), before):
        assert torch.equal(t.detach(), b)


def test_non_contiguous_inputs():
    p1, p2 = random_maps((2, 4, 8, 9))
    t1 = p1.transpose(2, 3).contiguous().transpose(2, 3)  # same values, column-major strides
    t2 = torch.stack([p2, p2], dim=-1).flatten(-2)[..., ::2]  # same values, stride 2 in W
    assert not t1.is_contiguous() and not t2.is_contiguous()
    torch.testing.assert_close(BF.joint_counts(t1, t2, offsets=1), BF.joint_counts(p1, p2, offsets=1))


# ----------------------------------------------------------------------------------- dispatch
def test_available_backends_reports_reasons():
    status = bimi_kernels.available_backends("cpu")
    assert set(status) == {"reference", "cpp", "triton", "cuda"}
    assert status["reference"] is None
    assert isinstance(status["cuda"], str) and status["cuda"]


def test_explicit_unavailable_backend_raises():
    p1, p2 = random_maps((1, 3, 5, 5))
    with pytest.raises(RuntimeError, match="backend 'cuda'"):
        BF.joint_counts(p1, p2, backend="cuda")


def test_unknown_backend_name_raises():
    with pytest.raises(ValueError, match="backend"):
        bimi_kernels.BIMILoss(backend="fast")


def test_environment_variable_overrides_auto(monkeypatch):
    p1, p2 = random_maps((1, 3, 5, 5))
    monkeypatch.setenv("BIMI_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="backend 'cuda'"):
        BF.joint_counts(p1, p2)
    monkeypatch.setenv("BIMI_BACKEND", "reference")
    torch.testing.assert_close(BF.joint_counts(p1, p2), R.joint_counts(p1, p2, ((0, 0),)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_every_functional_building_block_ignores_autocast(dtype):
    """Each public function computes in its accumulation dtype under autocast, as the loss does
    (docs/contract.md §8): a cross-correlation computed in bfloat16 once came out at -3.4."""
    p1, p2 = random_maps((2, 6, 24, 20), dtype=torch.float32)
    image = random_image(p1.shape, dtype=torch.float32)
    calls = {
        "joint_counts": lambda: BF.joint_counts(p1, p2, offsets=1),
        "joint_distributions": lambda: BF.joint_distributions(BF.joint_counts(p1, p2, offsets=1))[0],
        "regularized_mi": lambda: BF.regularized_mi(p1, p2, offsets=1),
        "uncertainty_map": lambda: BF.uncertainty_map(p1),
        "edge_map": lambda: BF.edge_map(image),
        "local_cross_correlation": lambda: BF.local_cross_correlation(BF.uncertainty_map(p1), BF.edge_map(image)),
        "boundary_cc": lambda: BF.boundary_cc(p1, BF.edge_map(image)),
        "boundary_cc_loss": lambda: BF.boundary_cc_loss(p1, p2, image),
        "bimi_loss": lambda: BF.bimi_loss(p1, p2, image, offsets=1),
    }
    assert set(calls) == {name for name in BF.__all__ if not name.endswith("_from_config")}
    for name, call in calls.items():
        plain = call()
        with torch.autocast("cpu", dtype=dtype):
            cast = call()
        assert cast.dtype == plain.dtype == torch.float32, name
        torch.testing.assert_close(cast, plain, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_building_blocks_compute_low_precision_inputs_in_float32(dtype):
    """docs/contract.md §8: half-precision inputs are computed in float32 by every building block,
    as by the ops (the cross-correlation once ran in the inputs' dtype and returned it)."""
    p1, p2 = random_maps((2, 6, 24, 20), dtype=torch.float32)
    u, e = BF.uncertainty_map(p1), BF.edge_map(random_image(p1.shape, dtype=torch.float32))
    j = BF.joint_counts(p1, p2, offsets=1)
    low = {"u": u.to(dtype), "e": e.to(dtype), "j": j.to(dtype)}
    calls = {
        "local_cross_correlation": lambda t: BF.local_cross_correlation(t["u"], t["e"]),
        "local_cross_correlation (mixed dtypes)": lambda t: BF.local_cross_correlation(t["u"], e),
        "joint_distributions": lambda t: BF.joint_distributions(t["j"])[0],
    }
    upcast = {name: t.float() for name, t in low.items()}
    for name, call in calls.items():
        found = call(low)
        assert found.dtype == torch.float32, name
        torch.testing.assert_close(found, call(upcast), rtol=1e-6, atol=1e-7, msg=name)


def test_eps_takes_any_real_number():
    """eps accepts what every number setting accepts (a Fraction, a numpy float), converted to a
    float before torch sees it: torch refuses a Fraction, after the kernels ran."""
    from fractions import Fraction

    import numpy as np

    p1, p2 = random_maps((1, 3, 8, 8))
    u, e = torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8)
    for eps in (Fraction(1, 100000), np.float32(1e-5)):
        torch.testing.assert_close(BF.regularized_mi(p1, p2, eps=eps), BF.regularized_mi(p1, p2, eps=float(eps)))
        torch.testing.assert_close(BF.local_cross_correlation(u, e, eps=eps),
                                   BF.local_cross_correlation(u, e, eps=float(eps)))


def test_every_public_signature_agrees_with_the_one_config():
    """A setting is defined once, in LossConfig: every signature that takes it has its default,
    and the functional API takes exactly the settings of its module (a new setting that misses a
    signature, or a default changed in one place only, fails here)."""
    import dataclasses
    import inspect

    defaults = {f.name: f.default for f in dataclasses.fields(bimi_kernels.LossConfig)}
    pairs = [(bimi_kernels.BIMILoss, BF.bimi_loss), (bimi_kernels.RegularizedMILoss, BF.regularized_mi),
             (bimi_kernels.BoundaryCCLoss, BF.boundary_cc_loss)]
    for module, function in pairs:
        taken = [name for name in inspect.signature(function).parameters if name in defaults]
        assert sorted(taken) == sorted(module.SETTINGS), (module.__name__, function.__name__)
    signatures = [module.__init__ for module, _ in pairs] + [function for _, function in pairs] + [
        R.bimi_loss, R.regularized_mi, R.regularized_mi_from_counts, R.regularized_mi_of_distribution,
        R.boundary_cc_loss, R.edge_map, R.boundary_cc]
    for function in signatures:
        for name, parameter in inspect.signature(function).parameters.items():
            if name in defaults and parameter.default is not inspect.Parameter.empty and name != "offsets":
                assert parameter.default == defaults[name], f"{function.__qualname__}: {name}={parameter.default!r}"


def test_a_users_subclass_keeps_the_settings_of_its_base():
    """A subclass with a constructor of its own (extra arguments, fewer settings) still exposes
    its base's settings; only the package's modules derive theirs from their constructors."""

    class Scaled(bimi_kernels.BIMILoss):
        def __init__(self, scale=2.0, **settings):
            super().__init__(**settings)
            self.scale = scale

    class Radius1(bimi_kernels.RegularizedMILoss):
        def __init__(self):
            super().__init__(offsets=1)

    assert Scaled.SETTINGS == bimi_kernels.BIMILoss.SETTINGS
    loss_fn = Scaled(alpha=0.3)
    assert loss_fn.scale == 2.0 and loss_fn.alpha == 0.3
    assert Radius1().alpha == 0.5 and Radius1.SETTINGS == bimi_kernels.RegularizedMILoss.SETTINGS


def test_modules_copy_pickle_and_share_their_process_group():
    """A model holding the loss can be deep-copied (an EMA or teacher copy): the config is
    immutable and shared, its process group too (a group cannot be copied); pickling works
    without a group and says what to do with one; a half-made module's settings are an
    AttributeError (getattr with a default), not a KeyError."""
    import copy
    import pickle

    import torch.distributed as dist

    loss_fn = bimi_kernels.BIMILoss(offsets=[(0, 1), (1, 0)], alpha=0.3)
    for copied in (copy.copy(loss_fn), copy.deepcopy(loss_fn), pickle.loads(pickle.dumps(loss_fn))):
        assert copied.config == loss_fn.config and copied.alpha == 0.3
    assert getattr(bimi_kernels.BIMILoss.__new__(bimi_kernels.BIMILoss), "alpha", None) is None

    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no process group yet")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        group = dist.new_group([0])
        model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1))
        model.loss_fn = bimi_kernels.BIMILoss(sync=True, process_group=group)
        assert copy.deepcopy(model).loss_fn.process_group is group
        with pytest.raises(TypeError, match="cannot be pickled.*process_group=None"):
            pickle.dumps(model.loss_fn)
    finally:
        dist.destroy_process_group()
