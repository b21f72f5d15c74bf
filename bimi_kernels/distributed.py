"""Joint counts over the global batch: a differentiable all-reduce of J across ranks.

Under DistributedDataParallel each rank sees a slice of the global batch. The mutual
information is not a mean of per-pixel terms: computed from one rank's slice it is a different
(noisier) quantity than the MI of the whole batch. The joint counts J (docs/contract.md §3) are a plain sum
over pixels, so the global J is the sum of the ranks' J, and the MI of the global batch is the
MI of that sum. `sync_joint_counts` does this sum (an all-reduce of the small (|O|, K, K)
tensor), the same way SyncBatchNorm all-reduces its batch statistics.

Gradients. Forward: J_global = sum_r J_r; every rank then computes the same loss L(J_global).
Backward: the gradient w.r.t. J_r is the all-reduce SUM of dL/dJ_global over the ranks. This is
the exact gradient of the sum over ranks of the ranks' losses, sum_q L_q: J_r feeds every
rank's L_q. Since all ranks compute the same L, it is world_size * dL/dJ_global, so

    input gradient on rank r = world_size * (single-process gradient of L on the concatenated
                                             batch, restricted to rank r's pixels).

DDP averages parameter gradients over ranks (divides by world_size), which cancels that
factor: the parameter gradients of the MI term equal those of one process on the whole batch,
whatever the per-rank batch sizes. The boundary term stays per rank (a mean over the rank's
pixels); with equal per-rank batch sizes the DDP average of the per-rank means is the mean
over the global batch, so the parameter gradients of the full loss equal the single-process
ones as well (with unequal sizes DDP weights each rank's boundary mean equally). The SUM in the
backward is the gradient of the sum of the ranks' losses in general, so it stays right if
ranks weight the MI term differently.

The all-reduce is a plain `torch.distributed.all_reduce` inside an autograd.Function, which
torch.compile(fullgraph=True) traces as a functional collective.

Every rank of the group must call the loss with the same K and offsets, and must run the
backward of it: the forward and the backward are collectives, and a rank that skips one makes
the others wait.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def _check_ready(process_group) -> int:
    """World size of `process_group` (None: the default group); a clear error when there is none."""
    if not dist.is_available():
        raise RuntimeError(
            "sync=True all-reduces the joint counts across the ranks of a process group, but this "
            "PyTorch build has no torch.distributed support; use sync=False"
        )
    if not dist.is_initialized():
        raise RuntimeError(
            "sync=True all-reduces the joint counts across the ranks of a process group, but "
            "torch.distributed is not initialised: call torch.distributed.init_process_group(...) "
            "in every process first (as for DistributedDataParallel), or use sync=False"
        )
    if dist.get_rank(process_group) < 0:
        raise RuntimeError(
            "sync=True: this process is not a member of the given process_group; every rank that "
            "computes the loss must belong to the group it syncs over"
        )
    return dist.get_world_size(process_group)


class _AllReduceSum(torch.autograd.Function):
    """Forward: sum over the ranks. Backward: sum of the ranks' incoming gradients.

    Written out here rather than taken from torch.distributed.nn.functional.all_reduce (deprecated,
    and its backward semantics are the library's to change) so that the gradient relation the
    module docstring states is fixed by this package.
    """

    @staticmethod
    def forward(ctx, counts: torch.Tensor, process_group) -> torch.Tensor:
        ctx.process_group = process_group
        total = counts.detach().clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=process_group)
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        grad = grad_total.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.process_group)
        return grad, None


def sync_joint_counts(j: torch.Tensor, process_group=None) -> torch.Tensor:
    """The joint counts of the global batch: the sum of every rank's J, differentiably.

    j : (|O|, K, K) joint counts of this rank's slice of the batch (any backend's output).
    process_group : the group to sum over; None is the default (world) group.

    Returns the all-reduced J, the same on every rank. Its backward all-reduces (SUM) the
    gradient, so each rank's input gradients are world_size times the single-process ones of
    the concatenated batch, which DDP's gradient averaging brings back to exactly the
    single-process parameter gradients (see the module docstring). With a group of one rank,
    `j` is returned unchanged. Raises RuntimeError when torch.distributed is not initialised.
    """
    world_size = _check_ready(process_group)
    if world_size == 1:
        return j
    if torch._C._functorch.peek_interpreter_stack() is not None:
        raise RuntimeError(
            "bimi: sync=True under a torch.func transform is not supported (the all-reduce of the "
            "joint counts has no torch.func rule); sync the loss outside the transform"
        )
    return _AllReduceSum.apply(j, process_group)

