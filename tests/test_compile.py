"""torch.compile through the loss and torch.library.opcheck on each custom op."""
import pytest
import torch

import bimi_kernels
import bimi_kernels.ops  # noqa: F401  (registers torch.ops.bimi.*)
from bimi_kernels.offsets import flatten, make_offsets

from helpers import random_image, random_maps, random_mask


def cpu_backends():
    """Backends runnable on CPU tensors in this environment (triton only in its interpreter)."""
    return [name for name, reason in bimi_kernels.available_backends("cpu").items() if reason is None]


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


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("with_mask", [False, True])
def test_opcheck_joint_counts(backend, with_mask):
    p1, p2 = random_maps((2, 3, 5, 6), dtype=torch.float32, requires_grad=True)
    mask = random_mask(p1.shape).reshape(2, 5, 6).float() if with_mask else None
    offsets = list(flatten(make_offsets(1, 2)))
    torch.library.opcheck(torch.ops.bimi.joint_counts.default, (p1, p2, offsets, mask, backend))
    grad_j = torch.randn(9, 3, 3)
    torch.library.opcheck(
        torch.ops.bimi.joint_counts_backward.default, (grad_j, p1.detach(), p2.detach(), offsets, mask, backend)
    )


@pytest.mark.parametrize("backend", cpu_backends())
def test_opcheck_boundary_cc(backend):
    p, _ = random_maps((2, 3, 6, 7), dtype=torch.float32, requires_grad=True)
    edge = bimi_kernels.reference.edge_map(random_image(p.shape, dtype=torch.float32))
    torch.library.opcheck(torch.ops.bimi.boundary_cc.default, (p, edge, 3, backend))
    cc, u_range = torch.ops.bimi.boundary_cc(p.detach(), edge, 3, backend)
    torch.library.opcheck(
        torch.ops.bimi.boundary_cc_backward.default, (torch.tensor(1.0), p.detach(), edge, u_range, 3, backend)
    )


@pytest.mark.parametrize("backend", cpu_backends())
def test_opcheck_edge_map(backend):
    image = random_image((2, 3, 6, 7), dtype=torch.float32)
    torch.library.opcheck(torch.ops.bimi.edge_map.default, (image, 0.75, backend))
