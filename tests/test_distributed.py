"""`sync=True`: the MI of the global batch under torch.distributed (gloo, 2 CPU processes).

One spawn of 2 ranks runs every distributed scenario and saves what each rank saw; the tests
below compare that with one process on the concatenated batch. Ranks get equal slices of a
batch of 4 (2 samples each; one MI case splits it 3 + 1, the 1 being a sample without a valid
pixel), in float64 so that the only difference left is float summation order (tolerances
~1e-10 relative). Where a GPU is present the same runs again on CUDA tensors (both ranks on
the one GPU, gloo), where "auto" is the GPU backend.

What must hold (bimi_kernels/distributed.py):
- the MI term on every rank equals the single-process MI of the whole batch, bitwise the same
  on both ranks;
- each rank's input gradient of the MI term is world_size x the single-process gradient on its
  pixels; for the full loss, (rank gradient) / world_size equals the single-process gradient of
  the full loss on the whole batch (the boundary term is a per-rank mean);
- under DDP, parameter gradients equal those of one process on the whole batch;
- sync=False is the per-rank loss; a process group of one rank is the per-rank loss too.
"""
from __future__ import annotations

import datetime
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import bimi_kernels
import bimi_kernels.functional as BF
from bimi_kernels.distributed import sync_joint_counts

WORLD_SIZE = 2
BATCH = 4  # global batch; each rank gets BATCH // WORLD_SIZE samples
K = 3
BACKENDS = ("reference", "auto")
OFFSETS = 1  # the 3x3 neighbourhood: 9 offsets, borders matter
OFFSETS_3D = [(0, 0, 0), (1, 0, -1), (0, 2, 1)]


def _tolerance(dtype):
    return dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)


class TinySegmenter(torch.nn.Module):
    """Conv features -> 1x1 head -> softmax over K clusters."""

    def __init__(self):
        super().__init__()
        self.features = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.head = torch.nn.Conv2d(4, K, 1)

    def forward(self, x):
        return self.head(torch.tanh(self.features(x))).softmax(1)


def _make_inputs(device):
    gen = torch.Generator().manual_seed(7)
    f64 = torch.float64
    mask = torch.ones(BATCH, 1, 6, 7, dtype=f64)
    mask[1, :, :2] = 0  # rank 0: part of a sample padded
    mask[3] = 0  # rank 1: a whole sample without a valid pixel
    model = TinySegmenter().to(f64)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=gen, dtype=f64))
    inputs = {
        "p1": torch.randn(BATCH, K, 6, 7, generator=gen, dtype=f64).softmax(1),
        "p2": torch.randn(BATCH, K, 6, 7, generator=gen, dtype=f64).softmax(1),
        "mask": mask,
        "image": torch.rand(BATCH, 1, 6, 7, generator=gen, dtype=f64),
        "p1_3d": torch.randn(BATCH, K, 3, 4, 5, generator=gen, dtype=f64).softmax(1),
        "p2_3d": torch.randn(BATCH, K, 3, 4, 5, generator=gen, dtype=f64).softmax(1),
        "x": torch.rand(BATCH, 1, 8, 8, generator=gen, dtype=f64),
        "x_noise": 0.1 * torch.randn(BATCH, 1, 8, 8, generator=gen, dtype=f64),
        "model_state": model.state_dict(),
    }
    inputs["model_state"] = {name: t.to(device) for name, t in inputs["model_state"].items()}
    return {name: t if name == "model_state" else t.to(device) for name, t in inputs.items()}


def _model(inputs):
    """The test model with the inputs' weights, on their device."""
    model = TinySegmenter().to(device=inputs["x"].device, dtype=torch.float64)
    model.load_state_dict(inputs["model_state"])
    return model


def _two_views(model, x, x_noise):
    """Cluster maps of an image and of a noisy copy (aligned pixel to pixel), in one forward."""
    return model(torch.cat([x, x + x_noise])).chunk(2)


def _loss_and_grads(loss_fn, *maps):
    leaves = [m.detach().clone().requires_grad_() for m in maps]
    loss = loss_fn(*leaves)
    grads = torch.autograd.grad(loss, leaves)
    return loss.detach(), [g.detach() for g in grads]


def _rank_scenarios(rank, inputs):
    """Everything one rank computes on its slice of the batch."""
    part = _part(rank)
    p1, p2, mask, image = (inputs[k][part] for k in ("p1", "p2", "mask", "image"))
    out = {}
    for backend in BACKENDS:
        mi = {}
        for sync in (True, False):
            mi[sync] = _loss_and_grads(
                lambda a, b: BF.regularized_mi(a, b, OFFSETS, mask=mask, backend=backend, sync=sync), p1, p2
            )
        out[backend, "mi_sync"], out[backend, "mi_local"] = mi[True], mi[False]
        out[backend, "mi_float32"] = _loss_and_grads(
            lambda a, b: BF.regularized_mi(a, b, OFFSETS, mask=mask, backend=backend, sync=True),
            p1.float(), p2.float(),
        )
        out[backend, "mi_3d"] = _loss_and_grads(
            lambda a, b: BF.regularized_mi(a, b, OFFSETS_3D, backend=backend, sync=True),
            inputs["p1_3d"][part], inputs["p2_3d"][part],
        )
        uneven = slice(0, 3) if rank == 0 else slice(3, BATCH)  # the MI needs no equal split
        out[backend, "mi_uneven"] = _loss_and_grads(
            lambda a, b: BF.regularized_mi(a, b, OFFSETS, mask=inputs["mask"][uneven], backend=backend, sync=True),
            inputs["p1"][uneven], inputs["p2"][uneven],
        )
        out[backend, "mi_module"] = bimi_kernels.RegularizedMILoss(
            offsets=OFFSETS, backend=backend, sync=True
        )(p1, p2, mask=mask).detach()
        full_loss = lambda a, b: BF.bimi_loss(a, b, image, mask, OFFSETS, backend=backend, sync=True)
        out[backend, "bimi_sync"] = _loss_and_grads(full_loss, p1, p2)
        out[backend, "boundary_local"] = BF.boundary_cc_loss(p1, p2, image, backend=backend).detach()

        for sync in (True, False):
            model = _model(inputs)
            ddp_model = torch.nn.parallel.DistributedDataParallel(model)
            criterion = bimi_kernels.BIMILoss(offsets=OFFSETS, backend=backend, sync=sync)
            x = inputs["x"][part]
            view1, view2 = _two_views(ddp_model, x, inputs["x_noise"][part])
            criterion(view1, view2, image=x).backward()
            out[backend, "ddp_grads", sync] = [prm.grad.detach().clone() for prm in model.parameters()]

    # process_group: an explicit group of both ranks is the default group; a group of one rank
    # sums nothing (and returns J itself)
    both = dist.new_group([0, 1])
    singletons = [dist.new_group([0]), dist.new_group([1])]
    mi = lambda group: lambda a, b: BF.regularized_mi(a, b, OFFSETS, mask=mask, sync=True, process_group=group)
    out["group_both"] = _loss_and_grads(mi(both), p1, p2)
    out["group_self"] = _loss_and_grads(mi(singletons[rank]), p1, p2)
    j = BF.joint_counts(p1, p2, OFFSETS, mask=mask)
    out["group_self_is_identity"] = sync_joint_counts(j, singletons[rank]) is j
    other = singletons[1 - rank]
    try:
        sync_joint_counts(j, other)
        out["not_member_error"] = None
    except RuntimeError as exc:
        out["not_member_error"] = str(exc)
    # under a torch.func transform the all-reduce refuses (before any collective: no hang)
    try:
        torch.func.grad(lambda a: BF.regularized_mi(a, p2, OFFSETS, mask=mask, sync=True))(p1)
        out["torch_func_error"] = None
    except RuntimeError as exc:
        out["torch_func_error"] = str(exc)
    return out


def _worker(rank, port, device, inputs_path, out_dir):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    # a short timeout: a collective that one rank misses fails the test instead of hanging it
    dist.init_process_group(
        "gloo", rank=rank, world_size=WORLD_SIZE, timeout=datetime.timedelta(seconds=60)
    )
    try:
        torch.set_num_threads(1)
        if device == "cuda":  # both ranks share the one GPU (gloo all-reduces CUDA tensors)
            torch.cuda.set_device(0)
        results = _rank_scenarios(rank, torch.load(inputs_path, map_location=device))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # both ranks done before either tears gloo down (else one may abort)
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(
    scope="module",
    params=[
        "cpu",
        pytest.param(
            "cuda",
            marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")],
        ),
    ],
)
def device(request):
    return request.param


@pytest.fixture(scope="module")
def inputs(device):
    return _make_inputs(device)


@pytest.fixture(scope="module")
def ranks(device, inputs, tmp_path_factory):
    """What each of the 2 ranks computed: [rank0 results, rank1 results]."""
    folder = tmp_path_factory.mktemp("ddp")
    inputs_path = str(folder / "inputs.pt")
    torch.save(inputs, inputs_path)
    mp.spawn(_worker, args=(_free_port(), device, inputs_path, str(folder)), nprocs=WORLD_SIZE, join=True)
    return [torch.load(folder / f"rank{r}.pt") for r in range(WORLD_SIZE)]


def _part(rank):
    return slice(rank * BATCH // WORLD_SIZE, (rank + 1) * BATCH // WORLD_SIZE)


def _assert_close(actual, expected, dtype=torch.float64):
    torch.testing.assert_close(actual, expected, **_tolerance(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_mi_on_every_rank_is_the_global_batch_mi(ranks, inputs, backend):
    one_process, (grad1, grad2) = _loss_and_grads(
        lambda a, b: BF.regularized_mi(a, b, OFFSETS, mask=inputs["mask"], backend=backend),
        inputs["p1"], inputs["p2"],
    )
    # every rank all-reduced the same J: the same loss, bitwise
    assert torch.equal(ranks[0][backend, "mi_sync"][0], ranks[1][backend, "mi_sync"][0])
    for rank, result in enumerate(ranks):
        loss, (rank_grad1, rank_grad2) = result[backend, "mi_sync"]
        _assert_close(loss, one_process)
        _assert_close(result[backend, "mi_module"], one_process)
        # the backward sums dL/dJ over the ranks: world_size x the single-process gradient
        _assert_close(rank_grad1, WORLD_SIZE * grad1[_part(rank)])
        _assert_close(rank_grad2, WORLD_SIZE * grad2[_part(rank)])


@pytest.mark.parametrize("backend", BACKENDS)
def test_mi_sync_with_unequal_rank_batches(ranks, inputs, backend):
    one_process, (grad1, grad2) = _loss_and_grads(
        lambda a, b: BF.regularized_mi(a, b, OFFSETS, mask=inputs["mask"], backend=backend),
        inputs["p1"], inputs["p2"],
    )
    for part, result in zip((slice(0, 3), slice(3, BATCH)), ranks):
        loss, (rank_grad1, rank_grad2) = result[backend, "mi_uneven"]
        _assert_close(loss, one_process)
        _assert_close(rank_grad1, WORLD_SIZE * grad1[part])
        _assert_close(rank_grad2, WORLD_SIZE * grad2[part])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["mi_float32", "mi_3d"])
def test_sync_in_float32_and_3d(ranks, inputs, backend, case):
    if case == "mi_float32":
        maps, dtype = (inputs["p1"].float(), inputs["p2"].float()), torch.float32
        loss_fn = lambda a, b: BF.regularized_mi(a, b, OFFSETS, mask=inputs["mask"], backend=backend)
    else:
        maps, dtype = (inputs["p1_3d"], inputs["p2_3d"]), torch.float64
        loss_fn = lambda a, b: BF.regularized_mi(a, b, OFFSETS_3D, backend=backend)
    one_process, grads = _loss_and_grads(loss_fn, *maps)
    for rank, result in enumerate(ranks):
        loss, rank_grads = result[backend, case]
        assert loss.dtype == dtype and all(g.dtype == dtype for g in rank_grads)
        _assert_close(loss, one_process, dtype)
        for rank_grad, grad in zip(rank_grads, grads):
            _assert_close(rank_grad, WORLD_SIZE * grad[_part(rank)], dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_loss_mi_part_is_global_and_boundary_part_is_per_rank(ranks, inputs, backend):
    p1, p2, image, mask = inputs["p1"], inputs["p2"], inputs["image"], inputs["mask"]
    global_mi = BF.regularized_mi(p1, p2, OFFSETS, mask=mask, backend=backend)
    one_process, (grad1, grad2) = _loss_and_grads(
        lambda a, b: BF.bimi_loss(a, b, image, mask, OFFSETS, backend=backend), p1, p2
    )
    rank_losses = []
    for rank, result in enumerate(ranks):
        loss, (rank_grad1, rank_grad2) = result[backend, "bimi_sync"]
        boundary = result[backend, "boundary_local"]
        part = _part(rank)
        _assert_close(boundary, BF.boundary_cc_loss(p1[part], p2[part], image[part], backend=backend))
        _assert_close(loss - boundary, global_mi)
        rank_losses.append(loss)
        # the rank's gradient over world_size (what DDP's averaging applies to parameter
        # gradients) is the single-process gradient of the full loss
        _assert_close(rank_grad1 / WORLD_SIZE, grad1[part])
        _assert_close(rank_grad2 / WORLD_SIZE, grad2[part])
    # equal slices: the mean of the per-rank boundary terms is the global one
    _assert_close(sum(rank_losses) / WORLD_SIZE, one_process)


def _single_process_param_grads(inputs, backend, batch):
    model = _model(inputs)
    x = inputs["x"][batch]
    view1, view2 = _two_views(model, x, inputs["x_noise"][batch])
    bimi_kernels.BIMILoss(offsets=OFFSETS, backend=backend)(view1, view2, image=x).backward()
    return [prm.grad for prm in model.parameters()]


@pytest.mark.parametrize("backend", BACKENDS)
def test_ddp_parameter_gradients_equal_single_process_on_whole_batch(ranks, inputs, backend):
    expected = _single_process_param_grads(inputs, backend, slice(None))
    for result in ranks:
        for ddp_grad, grad in zip(result[backend, "ddp_grads", True], expected):
            _assert_close(ddp_grad, grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sync_off_is_the_per_rank_loss(ranks, inputs, backend):
    p1, p2, mask = inputs["p1"], inputs["p2"], inputs["mask"]
    for rank, result in enumerate(ranks):
        part = _part(rank)
        expected, (grad1, grad2) = _loss_and_grads(
            lambda a, b: BF.regularized_mi(a, b, OFFSETS, mask=mask[part], backend=backend), p1[part], p2[part]
        )
        loss, (rank_grad1, rank_grad2) = result[backend, "mi_local"]
        _assert_close(loss, expected)
        _assert_close(rank_grad1, grad1)
        _assert_close(rank_grad2, grad2)
        assert not torch.allclose(loss, result[backend, "mi_sync"][0])
    # under DDP, sync off averages the gradients of the per-rank losses
    per_rank = [_single_process_param_grads(inputs, backend, _part(r)) for r in range(WORLD_SIZE)]
    for result in ranks:
        for ddp_grad, *rank_grads in zip(result[backend, "ddp_grads", False], *per_rank):
            _assert_close(ddp_grad, sum(rank_grads) / WORLD_SIZE)


def test_process_group_argument(ranks):
    for rank, result in enumerate(ranks):
        # a group of both ranks: the global MI, as with the default group
        _assert_close(result["group_both"][0], result["reference", "mi_sync"][0])
        for got, want in zip(result["group_both"][1], result["reference", "mi_sync"][1]):
            _assert_close(got, want)
        # a group of this rank alone: nothing to sum, the per-rank MI
        assert result["group_self_is_identity"]
        _assert_close(result["group_self"][0], result["reference", "mi_local"][0])
        assert "not a member" in result["not_member_error"]


def test_sync_under_torch_func_raises(ranks):
    for result in ranks:
        assert "sync=True under a torch.func transform" in (result["torch_func_error"] or "")


def test_sync_without_process_group_raises():
    assert not dist.is_initialized()
    p1 = torch.rand(2, K, 5, 5).softmax(1)
    p2 = torch.rand(2, K, 5, 5).softmax(1)
    image = torch.rand(2, 1, 5, 5)
    calls = [
        lambda: sync_joint_counts(BF.joint_counts(p1, p2)),
        lambda: BF.regularized_mi(p1, p2, sync=True),
        lambda: BF.bimi_loss(p1, p2, image, sync=True),
        lambda: bimi_kernels.RegularizedMILoss(sync=True)(p1, p2),
        lambda: bimi_kernels.BIMILoss(sync=True)(p1, p2, image),
    ]
    for call in calls:
        with pytest.raises(RuntimeError, match=r"sync=True.*not initialised.*init_process_group"):
            call()
    # sync off needs no process group
    assert torch.isfinite(bimi_kernels.BIMILoss()(p1, p2, image))
