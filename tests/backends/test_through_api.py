"""Every backend through the public API: the loss against the reference backend, gradcheck,
torch.compile, opcheck of the custom ops, autocast, determinism (docs/contract.md §7, §8)."""
from __future__ import annotations

import warnings

import pytest
import torch

from cases import F32, F64, JOINT_CASES, assert_close, joint_inputs, random_grad_j
from helpers import random_image, random_mask, random_maps

import bimi_kernels
from bimi_kernels import functional, ops, reference
from bimi_kernels.offsets import flatten, make_offsets

LOSS_CASES = {
    "2d-r1-window5": ((2, 4, 9, 11), 1, 5),
    "3d-list-window3": ((1, 3, 4, 5, 6), [(0, 0, 0), (1, 0, -1)], 3),
}


def loss_and_grads(backend_name, device, shape, offsets, window, dtype=F64, **settings):
    image = random_image(shape, dtype=dtype, device=device)
    mask = random_mask(shape, device=device)
    p1, p2 = random_maps(shape, dtype=dtype, device=device, requires_grad=True)
    loss = functional.bimi_loss(p1, p2, image, mask, offsets=offsets, window=window, backend=backend_name, **settings)
    loss.backward()
    return loss.detach(), p1.grad, p2.grad


@pytest.mark.parametrize("case", list(LOSS_CASES))
def test_bimi_loss_matches_reference_backend(backend, case):
    shape, offsets, window = LOSS_CASES[case]
    ours = loss_and_grads(backend.name, backend.device, shape, offsets, window)
    theirs = loss_and_grads("reference", "cpu", shape, offsets, window)
    for what, a, b in zip(("loss", "dL/dp1", "dL/dp2"), ours, theirs):
        assert_close(a, b, what, F64)


def test_edge_map_follows_the_maps_dtype(backend):
    """float64 maps with a float32 image: the edge map (and so the loss) is computed in float64,
    equal to the all-float64 loss to float64 rounding (docs/contract.md §5)."""
    shape = (2, 3, 9, 11)
    p1, p2 = random_maps(shape, dtype=F64, device=backend.device)
    image32 = random_image(shape, dtype=F32, device=backend.device)
    loss_fn = bimi_kernels.BIMILoss(offsets=1, backend=backend.name)
    mixed = loss_fn(p1, p2, image32)
    pure = loss_fn(p1, p2, image32.double())
    assert mixed.dtype == F64
    assert_close(mixed, pure, "loss (float32 image) vs loss (float64 image)", F64)


def freeze_uncertainty_extremes(p):
    """The min-max of U is detached, so a finite difference at the pixel holding a sample's min
    or max of U moves the normaliser, which the analytic gradient ignores: hold those fixed."""
    u = reference.uncertainty_map(p.detach()).flatten(1)
    keep = torch.ones_like(u)
    rows = torch.arange(u.shape[0], device=p.device)
    keep[rows, u.argmin(1)] = 0
    keep[rows, u.argmax(1)] = 0
    keep = keep.reshape(p.shape[0], 1, *p.shape[2:])
    frozen = p.detach() * (1 - keep)
    return lambda x: x * keep + frozen


@pytest.mark.parametrize("shape", [(2, 3, 6, 7), (1, 3, 4, 5, 6)], ids=["2d", "3d"])
def test_gradcheck_bimi_loss(backend, shape):
    p1, p2 = random_maps(shape, device=backend.device, requires_grad=True)
    image, mask = random_image(shape, device=backend.device), random_mask(shape, device=backend.device)
    freeze1, freeze2 = freeze_uncertainty_extremes(p1), freeze_uncertainty_extremes(p2)
    loss_fn = bimi_kernels.BIMILoss(offsets=1, window=3, backend=backend.name)
    # fast mode: Jacobians projected on random vectors (the full ones cost a loss per element)
    assert torch.autograd.gradcheck(lambda a, b: loss_fn(freeze1(a), freeze2(b), image, mask), (p1, p2), fast_mode=True)


def test_compile_fullgraph(backend):
    """The kernels sit behind custom ops with fake implementations: a full graph traces through
    the loss and its backward (aot_eager: the fake kernels, then the real ones, no codegen)."""
    torch._dynamo.reset()
    shape = (2, 4, 8, 9)
    image, mask = random_image(shape, dtype=F32, device=backend.device), random_mask(shape, device=backend.device)
    loss_fn = bimi_kernels.BIMILoss(offsets=1, window=3, backend=backend.name)
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (loss_fn, compiled):
        p1, p2 = random_maps(shape, dtype=F32, device=backend.device, requires_grad=True)
        loss = fn(p1, p2, image, mask)
        loss.backward()
        results.append((loss.detach(), p1.grad, p2.grad))
    for what, traced, eager in zip(("loss", "dL/dp1", "dL/dp2"), *results[::-1]):
        assert_close(traced, eager, what, F32)


def test_compile_with_symbolic_shapes(backend):
    """torch.compile(dynamic=True): the fakes see symbolic batch and spatial sizes (what a smaller
    last batch or another resolution gives a compiled training loop), and one graph serves
    several shapes with the eager results."""
    torch._dynamo.reset()
    loss_fn = bimi_kernels.BIMILoss(offsets=2, window=3, backend=backend.name)
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager", dynamic=True)
    for seed, shape in enumerate([(2, 3, 8, 9), (1, 3, 7, 10)]):
        image = random_image(shape, dtype=F32, device=backend.device, seed=seed)
        p1, p2 = random_maps(shape, dtype=F32, device=backend.device, seed=seed)
        got = loss_and_grads_of(compiled, p1, p2, image)
        want = loss_and_grads_of(loss_fn, p1, p2, image)
        for what, a, b in zip(("loss", "dL/dp1", "dL/dp2"), got, want):
            assert_close(a, b, f"{what} {shape}", F32)


def test_opcheck_custom_ops(backend):
    case = JOINT_CASES["2d-K3-r1-mask"]
    p1, p2, mask = joint_inputs(case, F64, backend.device)
    flat = list(flatten(case.offset_set()))
    edge = reference.edge_map(random_image(case.shape, dtype=F64)).to(backend.device)
    a, b = p1.clone().requires_grad_(True), p2.clone().requires_grad_(True)
    ops = torch.ops.bimi
    name = backend.name
    torch.library.opcheck(ops.joint_counts.default, (a, b, flat, mask, name))
    torch.library.opcheck(ops.joint_counts.default, (a, b, flat, None, name))
    torch.library.opcheck(ops.boundary_cc.default, (a, edge, 3, name))
    grad_j = random_grad_j(len(flat) // 2, case.shape[1], F64, backend.device)
    torch.library.opcheck(ops.joint_counts_backward.default, (grad_j, p1, p2, flat, mask, name))
    _, u_range = ops.boundary_cc(p1, edge, 3, name)
    grad_cc = torch.tensor(1.0, dtype=F64, device=backend.device)
    torch.library.opcheck(ops.boundary_cc_backward.default, (grad_cc, p1, edge, u_range, 3, name))
    image = random_image(case.shape, channels=2, dtype=F32, device=backend.device)
    torch.library.opcheck(ops.edge_map.default, (image, 0.75, name))


def _autocast(device: str):
    return torch.autocast(device, dtype=torch.bfloat16 if device == "cpu" else torch.float16)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_autocast_does_not_change_the_loss(backend, compiled):
    """Under autocast every op still computes in its accumulation dtype (docs/contract.md §8):
    the loss and its gradients equal those outside autocast, and each op's real output dtype
    is its fake's."""
    torch._dynamo.reset()
    shape = (2, 6, 12, 10)
    device = backend.device
    image = random_image(shape, dtype=F32, device=device)
    loss_fn = bimi_kernels.BIMILoss(offsets=1, backend=backend.name)
    fn = torch.compile(loss_fn, fullgraph=True, backend="aot_eager") if compiled else loss_fn
    results = []
    for use_autocast in (False, True):
        p1, p2 = random_maps(shape, dtype=F32, device=device, requires_grad=True)
        with _autocast(device) if use_autocast else torch.autocast(device, enabled=False):
            loss = fn(p1, p2, image)
        loss.backward()
        results.append((loss.detach(), p1.grad, p2.grad))
        assert loss.dtype == F32
    for what, plain, cast in zip(("loss", "dL/dp1", "dL/dp2"), *results):
        assert_close(cast, plain, f"{what} under autocast", F32)
    p1, p2 = random_maps(shape, dtype=F32, device=device)
    with _autocast(device):
        counts = torch.ops.bimi.joint_counts(p1, p2, [0, 0], None, backend.name)
        cc, u_range = torch.ops.bimi.boundary_cc(p1, reference.edge_map(image), 5, backend.name)
        edge = torch.ops.bimi.edge_map(image, 0.75, backend.name)
    assert counts.dtype == cc.dtype == u_range.dtype == edge.dtype == F32


def test_reruns_are_bitwise_equal(backend):
    """docs/contract.md §8: the same inputs give bitwise the same loss and gradients."""
    shape = (2, 10, 19, 23)
    runs = [loss_and_grads(backend.name, backend.device, shape, 1, 5, dtype=F32) for _ in range(2)]
    for first, second in zip(*runs):
        assert torch.equal(first, second)


@pytest.mark.parametrize("term", ["both", "mi", "boundary", "none"])
def test_a_channels_last_map_is_copied_once_per_training_step(backend, term):
    """A channels_last model's softmax is a channels_last map: the loss makes each map contiguous
    once, not once per op forward and backward (8 copies of the maps per step, +40-60 % time),
    and not at all when both terms are off; its loss and gradients are those of the contiguous
    maps."""
    shape = (2, 4, 9, 11)
    p1, p2 = random_maps(shape, dtype=F64, device=backend.device)
    image = random_image(shape, dtype=F64, device=backend.device)
    weights = {"both": {}, "mi": {"boundary_weight": 0.0}, "boundary": {"mi_weight": 0.0},
               "none": {"mi_weight": 0.0, "boundary_weight": 0.0}}[term]
    loss_fn = bimi_kernels.BIMILoss(offsets=1, backend=backend.name, **weights)

    def loss_and_grads(a, b):
        a, b = a.detach().requires_grad_(), b.detach().requires_grad_()
        loss = loss_fn(a, b, image)
        return (loss,) + torch.autograd.grad(loss, (a, b))

    expected = loss_and_grads(p1, p2)
    cl1, cl2 = (p.contiguous(memory_format=torch.channels_last) for p in (p1, p2))
    with torch.profiler.profile(record_shapes=True) as profile:
        found = loss_and_grads(cl1, cl2)
    copies = [e for e in profile.events() if e.name == "aten::clone" and e.input_shapes
              and list(e.input_shapes[0]) == list(shape)]
    assert len(copies) == (0 if term == "none" else 2)
    for what, a, b in zip(("loss", "dL/dp1", "dL/dp2"), found, expected):
        assert_close(a, b, what, F64)


@pytest.mark.parametrize("requires_grad", [True, False], ids=["grad", "no-grad"])
def test_eager_route_equals_the_custom_ops(backend, monkeypatch, requires_grad):
    """Eager calls skip the custom ops (a plain autograd.Function, or the kernel itself without
    a gradient: less host overhead, bimi_kernels/ops.py); both routes call the same kernels and
    give bitwise the same loss and gradients."""
    shape = (2, 5, 9, 11)
    image = random_image(shape, dtype=F32, device=backend.device)
    mask = random_mask(shape, device=backend.device)
    custom_op_calls = []
    for name in ("joint_counts", "boundary_cc", "edge_map"):
        op = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *args, _op=op, _name=name: (custom_op_calls.append(_name), _op(*args))[1])
    routes = []
    for eager_route in (True, False):
        monkeypatch.setattr(ops, "EAGER_ROUTE", eager_route)
        custom_op_calls.clear()
        p1, p2 = random_maps(shape, dtype=F32, device=backend.device, requires_grad=requires_grad)
        loss = functional.bimi_loss(p1, p2, image, mask, offsets=1, backend=backend.name)
        counts = functional.joint_counts(p1, p2, offsets=[(0, 0), (2, -1)], backend=backend.name)
        edge = functional.edge_map(image, backend=backend.name)
        results = [loss.detach(), counts.detach(), edge]
        if requires_grad:
            loss.backward()
            results += [p1.grad, p2.grad]
        else:
            assert not loss.requires_grad and not counts.requires_grad
        # the route really taken: no custom op on the eager route, all three on the other
        assert sorted(set(custom_op_calls)) == ([] if eager_route else ["boundary_cc", "edge_map", "joint_counts"])
        routes.append(results)
    for what, a, b in zip(("loss", "counts", "edge map", "dL/dp1", "dL/dp2"), *routes):
        assert torch.equal(a, b), what


@pytest.mark.parametrize("term", ["both", "mi", "boundary"])
@pytest.mark.parametrize("how", ["backward", "grad-wrt-p1"])
def test_second_derivative_is_refused(backend, monkeypatch, term, how):
    """Neither route has a second derivative: asking for one raises instead of returning a
    wrong one, for each term and also when the second derivative is asked for a map only
    (torch.autograd.grad(..., inputs=p1) visits only the nodes on the way to p1)."""
    shape = (1, 3, 6, 7)
    image = random_image(shape, dtype=F64, device=backend.device)
    weights = {"both": {}, "mi": {"boundary_weight": 0.0}, "boundary": {"mi_weight": 0.0},
               "none": {"mi_weight": 0.0, "boundary_weight": 0.0}}[term]
    for eager_route in (True, False):
        monkeypatch.setattr(ops, "EAGER_ROUTE", eager_route)
        p1, p2 = random_maps(shape, dtype=F64, device=backend.device, requires_grad=True)
        loss = bimi_kernels.BIMILoss(offsets=1, backend=backend.name, **weights)(p1, p2, image)
        (grad,) = torch.autograd.grad(loss, p1, create_graph=True)
        with pytest.raises(RuntimeError, match="no second derivative|no autograd formula"):
            if how == "backward":
                grad.square().sum().backward()
            else:
                torch.autograd.grad(grad.square().sum() + p1.square().sum(), p1)


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_activation_checkpointing(backend, monkeypatch, use_reentrant):
    """torch.utils.checkpoint around the loss on both routes: the same gradients as without it
    (the non-reentrant kind, the default of activation-checkpointing wrappers, allows each saved
    tensor to be read once)."""
    shape = (1, 3, 6, 7)
    image = random_image(shape, dtype=F64, device=backend.device)
    logits = torch.randn(shape, dtype=F64, generator=torch.Generator().manual_seed(0)).to(backend.device)

    def loss_of(x):
        return functional.bimi_loss(x.softmax(1), x.flip(-1).softmax(1), image, offsets=1, backend=backend.name)

    for eager_route in (True, False):
        monkeypatch.setattr(ops, "EAGER_ROUTE", eager_route)
        x = logits.clone().requires_grad_()
        loss_of(x).backward()
        plain, x.grad = x.grad, None
        torch.utils.checkpoint.checkpoint(loss_of, x, use_reentrant=use_reentrant).backward()
        assert torch.equal(x.grad, plain)


def test_forward_mode_ad_is_refused(backend, monkeypatch):
    """The kernels have no forward-mode derivative: a map with a tangent raises on both routes
    (it used to come back without a tangent, silently)."""
    shape = (1, 3, 6, 7)
    image = random_image(shape, dtype=F64, device=backend.device)
    p1, p2 = random_maps(shape, dtype=F64, device=backend.device)
    for eager_route in (True, False):
        monkeypatch.setattr(ops, "EAGER_ROUTE", eager_route)
        for weights in ({"boundary_weight": 0.0}, {"mi_weight": 0.0}):
            with torch.autograd.forward_ad.dual_level():
                dual = torch.autograd.forward_ad.make_dual(p1, torch.ones_like(p1))
                with pytest.raises(RuntimeError, match="forward-mode AD"):
                    functional.bimi_loss(dual, p2, image, offsets=1, backend=backend.name, **weights)


def test_a_mask_that_requires_grad_gets_no_gradient(backend, monkeypatch):
    """A mask that requires grad (made by a differentiable warp, say) is a weight without a
    gradient on both routes: the maps get theirs, the mask none, and no autograd warning."""
    shape = (2, 4, 7, 9)
    results = []
    for eager_route in (True, False):
        monkeypatch.setattr(ops, "EAGER_ROUTE", eager_route)
        p1, p2 = random_maps(shape, dtype=F64, device=backend.device)
        mask = random_mask(shape, device=backend.device).to(F64).requires_grad_()
        with warnings.catch_warnings():  # the autograd fallback warns when its node runs backward
            warnings.filterwarnings("error", message=".*autograd kernel was not registered")
            counts = functional.joint_counts(p1, p2, offsets=1, mask=mask, backend=backend.name)
            assert counts.requires_grad
            counts.sum().backward()
        assert mask.grad is None
        p1, p2 = random_maps(shape, dtype=F64, device=backend.device, requires_grad=True)
        loss = functional.regularized_mi(p1, p2, offsets=1, mask=mask, backend=backend.name)
        loss.backward()
        results.append((loss.detach(), p1.grad, p2.grad, mask.grad))
    for what, a, b in zip(("loss", "dL/dp1", "dL/dp2"), *results):
        assert torch.equal(a, b), what
    assert results[0][3] is None and results[1][3] is None


def test_pooled_offsets_sum_the_counts_first(backend):
    """pool_offsets=True: one MI of the counts summed over the offsets (IIC's collapsed loss)."""
    shape = (2, 4, 9, 11)
    p1, p2 = random_maps(shape, device=backend.device)
    pooled = functional.regularized_mi(p1, p2, offsets=1, pool_offsets=True, backend=backend.name)
    counts = reference.joint_counts(p1.cpu(), p2.cpu(), make_offsets(1, 2))
    expected = reference.regularized_mi_from_counts(counts.sum(0, keepdim=True))
    assert_close(pooled, expected, "pooled MI", F64)


def _needs_cuda(backend):
    if backend.device != "cuda":
        pytest.skip("CUDA graphs need CUDA tensors")


def _capture_whole_loss(backend):
    """(loss_fn, image, p1, p2, graph, loss): one BIMILoss call at radius 1 and its backward
    captured in a CUDA graph, whose replay reads p1 and p2 (leaves) where they are."""
    from benchmarks.host_overhead import capture_loss_and_backward

    shape = (2, 6, 32, 40)
    image = random_image(shape, dtype=F32, device="cuda")
    loss_fn = bimi_kernels.BIMILoss(offsets=1, backend=backend.name)
    q1, q2 = random_maps(shape, dtype=F32, device="cuda", seed=1)
    p1, p2 = (q.clone().requires_grad_(True) for q in (q1, q2))
    return (loss_fn, image, p1, p2, *capture_loss_and_backward(loss_fn, p1, p2, image))


def _assert_replay_is_eager(loss_fn, image, p1, p2, graph, static_loss):
    """New values into p1 and p2, one replay: the loss and gradients of an eager call, bitwise."""
    new1, new2 = random_maps(tuple(p1.shape), dtype=F32, device="cuda", seed=7)
    with torch.no_grad():
        p1.copy_(new1)
        p2.copy_(new2)
    graph.replay()
    torch.cuda.synchronize()
    expected = loss_and_grads_of(loss_fn, new1, new2, image)
    for what, got, want in zip(("loss", "dL/dp1", "dL/dp2"), (static_loss, p1.grad, p2.grad), expected):
        assert torch.equal(got, want), what


def test_cuda_graph_captures_forward_and_backward(backend):
    """The whole loss, forward and backward, is capturable in one CUDA graph (no host sync, no
    host-to-device copy after the first call), so CUDA graphs remove its host overhead."""
    _needs_cuda(backend)
    _assert_replay_is_eager(*_capture_whole_loss(backend))


def test_a_captured_graph_outlives_the_offset_table_cache(backend, monkeypatch):
    """The Triton backend's offset tables, which a captured graph reads by address, survive its
    cache starting over (here whenever it holds two: the captured call's forward and reverse
    tables) and the memory churn after it."""
    if backend.name != "triton":
        pytest.skip("the Triton backend's cache of offset tables")
    _needs_cuda(backend)
    from bimi_kernels.triton import joint

    monkeypatch.setattr(joint, "PARTNER_TABLES_KEPT", 2)
    captured = _capture_whole_loss(backend)
    loss_fn, image, p1, p2 = captured[:4]
    for radius in (2, 3):  # other offsets: new tables, each starting the cache over
        bimi_kernels.BIMILoss(offsets=radius, backend=backend.name)(p1.detach(), p2.detach(), image)
    churn = [torch.full((1 << 16,), -1, dtype=torch.int64, device="cuda") for _ in range(64)]
    _assert_replay_is_eager(*captured)
    del churn


def test_compile_reduce_overhead(backend):
    """torch.compile(mode="reduce-overhead") (CUDA graphs via Inductor) gives the eager results."""
    _needs_cuda(backend)
    torch._dynamo.reset()
    shape = (2, 6, 32, 40)
    image = random_image(shape, dtype=F32, device="cuda")
    loss_fn = bimi_kernels.BIMILoss(offsets=1, backend=backend.name)
    compiled = torch.compile(loss_fn, mode="reduce-overhead", fullgraph=True)
    for seed in range(3):  # the first calls record, later ones replay
        p1, p2 = random_maps(shape, dtype=F32, device="cuda", seed=seed)
        got = loss_and_grads_of(compiled, p1, p2, image)
        want = loss_and_grads_of(loss_fn, p1, p2, image)
        for what, a, b in zip(("loss", "dL/dp1", "dL/dp2"), got, want):
            assert_close(a, b, what, F32)


def test_compile_reduce_overhead_records_again_for_a_new_shape(backend, monkeypatch):
    """A second shape after replays have begun (a smaller last batch, another resolution) makes
    Inductor record another CUDA graph, first taking back its memory pool, which frees whatever
    it does not track there: the kernels' cached device tables must not live in it. Inductor's
    own pool checks are on; the replays of both shapes give the eager results."""
    _needs_cuda(backend)
    import torch._inductor.config

    monkeypatch.setattr(torch._inductor.config.triton, "slow_path_cudagraph_asserts", True)
    torch._dynamo.reset()
    loss_fn = bimi_kernels.BIMILoss(offsets=2, backend=backend.name)
    compiled = torch.compile(loss_fn, mode="reduce-overhead", fullgraph=True)
    shapes = [(2, 6, 32, 40)] * 3 + [(1, 6, 32, 40)] * 3 + [(2, 6, 32, 40)] * 2
    for seed, shape in enumerate(shapes):
        image = random_image(shape, dtype=F32, device="cuda", seed=seed)
        p1, p2 = random_maps(shape, dtype=F32, device="cuda", seed=seed)
        churn = torch.full((1 << 20,), -1, dtype=torch.int64, device="cuda")  # reuse freed memory
        got = loss_and_grads_of(compiled, p1, p2, image)
        want = loss_and_grads_of(loss_fn, p1, p2, image)
        del churn
        for what, a, b in zip(("loss", "dL/dp1", "dL/dp2"), got, want):
            assert_close(a, b, f"{what} (call {seed}, shape {shape})", F32)


def loss_and_grads_of(fn, p1, p2, image):
    a, b = p1.detach().clone().requires_grad_(True), p2.detach().clone().requires_grad_(True)
    loss = fn(a, b, image)
    loss.backward()
    return loss.detach().clone(), a.grad.clone(), b.grad.clone()


# ------------------------------------------------------------------------------------------------
# torch.func transforms (docs/contract.md §7)
# ------------------------------------------------------------------------------------------------
FUNC_SHAPE = (2, 3, 6, 7)


def test_torch_func_grad_and_vjp_equal_backward(backend):
    """torch.func.grad and vjp (functional training loops) give loss.backward()'s gradients."""
    image = random_image(FUNC_SHAPE, device=backend.device)
    mask = random_mask(FUNC_SHAPE, device=backend.device)
    loss_fn = bimi_kernels.BIMILoss(offsets=1, window=3, backend=backend.name)
    p1, p2 = random_maps(FUNC_SHAPE, device=backend.device, requires_grad=True)
    loss_fn(p1, p2, image, mask).backward()
    a, b = p1.detach(), p2.detach()
    grads = torch.func.grad(lambda x, y: loss_fn(x, y, image, mask), argnums=(0, 1))(a, b)
    loss, vjp_fn = torch.func.vjp(lambda x: loss_fn(x, b, image, mask), a)
    (vjp_grad,) = vjp_fn(torch.ones_like(loss))  # runs after vjp's transform has exited
    for what, ours, expected in (("grad dL/dp1", grads[0], p1.grad), ("grad dL/dp2", grads[1], p2.grad),
                                 ("vjp dL/dp1", vjp_grad, p1.grad)):
        assert_close(ours, expected, what, F64)


def test_torch_func_vmap_equals_a_loop(backend):
    """vmap over a stack of whole calls (maps, images and masks) gives each call's loss, and
    vmap(grad) each call's gradient (per-call gradients); jacrev of the joint counts gives the
    rows of their Jacobian that backward gives."""
    calls = 2
    maps = [random_maps(FUNC_SHAPE, seed=seed, device=backend.device) for seed in range(calls)]
    images = [random_image(FUNC_SHAPE, seed=seed, device=backend.device) for seed in range(calls)]
    masks = [random_mask(FUNC_SHAPE, seed=seed, device=backend.device) for seed in range(calls)]
    loss_fn = bimi_kernels.BIMILoss(offsets=1, window=3, backend=backend.name)
    stack = [torch.stack(t) for t in ([m[0] for m in maps], [m[1] for m in maps], images, masks)]
    # the stacked dimension anywhere (in_dims=1): slices are whole calls
    moved = [t.movedim(0, 1) for t in stack]
    losses = torch.func.vmap(loss_fn, in_dims=1)(*moved)
    per_call_grads = torch.func.vmap(torch.func.grad(loss_fn))(*stack)
    for i in range(calls):
        p1 = maps[i][0].clone().requires_grad_()
        loss = loss_fn(p1, maps[i][1], images[i], masks[i])
        loss.backward()
        assert_close(losses[i], loss.detach(), f"vmapped loss {i}", F64)
        assert_close(per_call_grads[i], p1.grad, f"vmap(grad) dL/dp1 {i}", F64)

    p1, p2 = maps[0]
    jacobian = torch.func.jacrev(lambda x: functional.joint_counts(x, p2, offsets=1, backend=backend.name)[2, 1])(p1)
    x = p1.clone().requires_grad_()
    functional.joint_counts(x, p2, offsets=1, backend=backend.name)[2, 1].sum().backward()
    assert jacobian.shape == (FUNC_SHAPE[1],) + FUNC_SHAPE
    assert_close(jacobian.sum(0), x.grad, "jacrev rows of J[2, 1, :]", F64)


@pytest.mark.parametrize("validate", [None, True], ids=["sampled", "full"])
def test_value_checks_read_vmapped_maps(backend, validate):
    """The value checks read values, which a vmapped tensor refuses: they read the values beneath
    (every vmapped call's), so logits in any one call are still caught by name."""
    p1, p2 = random_maps(FUNC_SHAPE, device=backend.device)
    image = random_image(FUNC_SHAPE, device=backend.device)
    logits = torch.stack([p1, torch.randn_like(p1)])
    loss_fn = bimi_kernels.BIMILoss(offsets=1, window=3, backend=backend.name, validate=validate)
    with pytest.raises(ValueError, match="p1: .*logits"):
        torch.func.vmap(loss_fn, in_dims=(0, None, None))(logits, p2, image)


def test_torch_func_second_and_forward_derivatives_are_refused(backend):
    """As on the other routes: no second derivative (grad of grad), no forward mode (jvp,
    hessian = jacfwd(jacrev)); each raises instead of returning a wrong derivative."""
    p1, p2 = random_maps(FUNC_SHAPE, device=backend.device)
    image = random_image(FUNC_SHAPE, device=backend.device)
    for weights in ({"boundary_weight": 0.0}, {"mi_weight": 0.0}):
        loss_fn = bimi_kernels.BIMILoss(offsets=1, window=3, backend=backend.name, **weights)

        def loss_of(x):
            return loss_fn(x, p2, image)

        with pytest.raises(RuntimeError, match="no second derivative"):
            torch.func.grad(lambda x: torch.func.grad(loss_of)(x).square().sum())(p1)
        with pytest.raises(RuntimeError, match="forward-mode AD"):
            torch.func.jvp(loss_of, (p1,), (torch.ones_like(p1),))
        with pytest.raises(RuntimeError, match="forward-mode AD"):
            torch.func.hessian(loss_of)(p1)


def test_torch_func_under_a_default_device_and_functionalize(backend):
    """A default device (`with torch.device(...)`, torch.set_default_device) does not stop
    torch.func.grad, and torch.func.functionalize takes the custom ops: both give the eager
    results."""
    p1, p2 = random_maps(FUNC_SHAPE, device=backend.device)
    image = random_image(FUNC_SHAPE, device=backend.device)
    loss_fn = bimi_kernels.BIMILoss(offsets=1, window=3, backend=backend.name)
    x = p1.clone().requires_grad_()
    loss = loss_fn(x, p2, image)
    loss.backward()
    with torch.device(backend.device):
        grad = torch.func.grad(lambda a: loss_fn(a, p2, image))(p1)
        eager_loss = loss_fn(p1, p2, image)
    assert_close(grad, x.grad, "grad under a default device", F64)
    assert torch.equal(eager_loss, loss.detach())
    assert torch.equal(torch.func.functionalize(loss_fn)(p1, p2, image), loss.detach())
