"""torch.compile through the loss with Inductor (code generation) and for the MI term in 3-D;
opcheck and aot_eager compilation of every backend are in tests/backends/test_through_api.py."""
import pytest
import torch

import bimi_kernels

from helpers import random_image, random_maps, random_mask


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compile_fullgraph_forward_and_backward(compiler):
    torch._dynamo.reset()
    loss_fn = bimi_kernels.BIMILoss(offsets=1, window=3)
    compiled = torch.compile(loss_fn, fullgraph=True, backend=compiler)
    p1, p2 = random_maps((2, 4, 8, 9), dtype=torch.float32, requires_grad=True)
    image, mask = random_image(p1.shape, dtype=torch.float32), random_mask(p1.shape)
    got = compiled(p1, p2, image, mask)
    got_grads = torch.autograd.grad(got, (p1, p2))
    expected = loss_fn(p1, p2, image, mask)
    expected_grads = torch.autograd.grad(expected, (p1, p2))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)


def test_compile_3d_and_regularized_mi():
    torch._dynamo.reset()
    loss_fn = bimi_kernels.RegularizedMILoss(offsets=[(0, 0, 0), (1, 0, -1)], alpha=0.2)
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    p1, p2 = random_maps((1, 3, 4, 5, 6), requires_grad=True)
    got = compiled(p1, p2)
    torch.testing.assert_close(got, loss_fn(p1, p2))
    got.backward()
    assert p1.grad is not None and torch.isfinite(p1.grad).all()


def test_compiled_functional_loss_with_a_float_setting_that_changes():
    """A float setting that changes between calls becomes a symbolic float when Dynamo
    recompiles; the settings' checks must still trace (math.isfinite does not)."""
    torch._dynamo.reset()
    compiled = torch.compile(bimi_kernels.functional.bimi_loss, fullgraph=True, backend="aot_eager")
    p1, p2 = random_maps((1, 3, 6, 7), dtype=torch.float32)
    image = random_image(p1.shape, dtype=torch.float32)
    for weight in (1.0, 0.5, 0.25):
        expected = bimi_kernels.functional.bimi_loss(p1, p2, image, boundary_weight=weight)
        torch.testing.assert_close(compiled(p1, p2, image, boundary_weight=weight), expected)


def test_compiled_loss_takes_a_mask_after_the_sizes_became_symbolic():
    """A call without a mask at a second size makes Dynamo trace symbolic sizes; the mask's shape
    test must still accept a right mask (a tuple `in` test on symbolic sizes did not)."""
    torch._dynamo.reset()
    loss_fn = bimi_kernels.BIMILoss(offsets=1, window=3, backend="reference")
    compiled = torch.compile(loss_fn, fullgraph=True, backend="eager")
    small, large = random_maps((2, 3, 8, 8)), random_maps((2, 3, 10, 12))
    compiled(*small, random_image((2, 3, 8, 8)))
    compiled(*large, random_image((2, 3, 10, 12)))
    image, mask = random_image((2, 3, 8, 8)), random_mask((2, 3, 8, 8))
    torch.testing.assert_close(compiled(*small, image, mask), loss_fn(*small, image, mask))


def test_full_value_checks_are_asserts_in_a_compiled_graph(monkeypatch):
    """validate=True under torch.compile(fullgraph=True): the checks trace (as asserts in the
    graph) and a bad value raises with the argument's name, not a graph break or a TypeError."""
    monkeypatch.delenv("BIMI_VALIDATE", raising=False)
    torch._dynamo.reset()
    loss_fn = bimi_kernels.BIMILoss(offsets=1, window=3, backend="reference", validate=True)
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    p1, p2 = random_maps((2, 3, 8, 8))
    image, mask = random_image(p1.shape), random_mask(p1.shape)
    torch.testing.assert_close(compiled(p1, p2, image, mask), loss_fn(p1, p2, image, mask))
    with pytest.raises(RuntimeError, match=r"p1: contains negative probability value.*not logits"):
        compiled(torch.randn(p1.shape, dtype=p1.dtype), p2, image, mask)
    with pytest.raises(RuntimeError, match=r"p2: holds vectors that do not sum to 1"):
        compiled(p1, p2 * 0.5, image, mask)
    with pytest.raises(RuntimeError, match=r"image: contains non-finite"):
        compiled(p1, p2, torch.full_like(image, float("nan")), mask)
    with pytest.raises(RuntimeError, match=r"mask: contains value\(s\) outside \[0, 1\]"):
        compiled(p1, p2, image, mask * 3)


@pytest.mark.parametrize("tracing_mode", ["real", "fake", "symbolic"])
def test_make_fx_traces_the_loss_with_its_default_checks(tracing_mode):
    from torch.fx.experimental.proxy_tensor import make_fx

    p1, p2 = random_maps((2, 3, 6, 6))
    image = random_image(p1.shape)
    loss = lambda a, b, i: bimi_kernels.functional.bimi_loss(a, b, i, offsets=1, backend="reference")  # noqa: E731
    graph = make_fx(loss, tracing_mode=tracing_mode)(p1, p2, image)
    torch.testing.assert_close(graph(p1, p2, image), loss(p1, p2, image))
