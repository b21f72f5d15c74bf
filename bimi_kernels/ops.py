"""The one dispatch point: torch.library custom ops with fake implementations and autograd, and
their eager route.

Two ops touch every pixel and are therefore kernels: the joint counts (docs/contract.md §3) and
the boundary cross-correlation of one cluster map with an edge map (§5). Each takes the
requested backend name ("auto" or a name); the op resolves it for the tensors' device
(`backends.resolve`: cached, honours BIMI_BACKEND, never falls back silently) and calls that
backend's kernel. Resolving inside the op keeps torch.compile graphs free of host-side logic.
Backward passes are their own ops and call the same backend's backward kernels. A third op, the
edge map of the image (no gradient), runs a backend's fused kernel where it has one.

Every kernel runs with autocast off: an op computes in its accumulation dtype whatever autocast
region the caller is in (§8), so its real output dtype is always its fake's.

Two routes to the same kernels. The `apply_*` functions, which `functional` calls, take the
custom op whenever something may trace the call (torch.compile, torch.jit.trace, export, fake
or other tensor subclasses, a dispatch or function mode), and otherwise a plain
torch.autograd.Function (or, without a gradient, the implementation itself): in eager mode
torch.library's custom-op machinery costs more Python per op, and again per backward op, than
the whole host cost the Function adds (docs/architecture.md, "The layers"). Under torch.func
transforms the Functions are taken too (custom ops have no torch.func support; the Functions have
setup_context and a vmap rule). Both routes call the one implementation of each op below
(`_joint_counts_impl`, ...) and give bitwise the same results.
"""
from __future__ import annotations

import contextlib
from typing import List, Optional, Tuple

import torch
from torch import Tensor
from torch.autograd import forward_ad
from torch.utils._device import DeviceContext

from . import backends, reference
from .numerics import accumulation_dtype


def _kernels(backend: str, device_type: str) -> backends.Backend:
    return backends.get(backends.resolve(backend, device_type))


def autocast_off(device_type: str):
    """A context without autocast for `device_type` (the kernels' own dtype rules apply)."""
    if device_type != "meta" and torch.is_autocast_enabled(device_type):  # meta: no autocast
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


# ------------------------------------------------------------------------------------------------
# joint counts
# ------------------------------------------------------------------------------------------------
@torch.library.custom_op("bimi::joint_counts", mutates_args=())
def joint_counts(p1: Tensor, p2: Tensor, offsets: List[int], mask: Optional[Tensor], backend: str) -> Tensor:
    """J (|O|, K, K) in the accumulation dtype. `offsets` is flat: offset o is offsets[o*n:(o+1)*n]."""
    return _joint_counts_impl(p1, p2, offsets, mask, backend)


def _joint_counts_impl(p1, p2, offsets, mask, backend):
    kernels = _kernels(backend, p1.device.type)
    mask = None if mask is None else mask.contiguous()
    with autocast_off(p1.device.type):
        return kernels.joint_counts(p1.contiguous(), p2.contiguous(), tuple(offsets), mask)


@joint_counts.register_fake
def _joint_counts_fake(p1, p2, offsets, mask, backend):
    k = p1.shape[1]
    return p1.new_empty((len(offsets) // (p1.dim() - 2), k, k), dtype=accumulation_dtype(p1.dtype))


@torch.library.custom_op("bimi::joint_counts_backward", mutates_args=())
def joint_counts_backward(
    grad_j: Tensor, p1: Tensor, p2: Tensor, offsets: List[int], mask: Optional[Tensor], backend: str
) -> Tuple[Tensor, Tensor]:
    """(dL/dp1, dL/dp2) from G = dL/dJ, in the dtypes of p1 and p2."""
    return _joint_counts_backward_impl(grad_j, p1, p2, offsets, mask, backend)


def _joint_counts_backward_impl(grad_j, p1, p2, offsets, mask, backend):
    kernels = _kernels(backend, p1.device.type)
    mask = None if mask is None else mask.contiguous()
    with autocast_off(p1.device.type):
        return kernels.joint_counts_backward(
            grad_j.contiguous(), p1.contiguous(), p2.contiguous(), tuple(offsets), mask
        )


@joint_counts_backward.register_fake
def _joint_counts_backward_fake(grad_j, p1, p2, offsets, mask, backend):
    return torch.empty_like(p1, memory_format=torch.contiguous_format), torch.empty_like(
        p2, memory_format=torch.contiguous_format
    )


def _joint_counts_setup_context(ctx, inputs, output):
    p1, p2, offsets, mask, backend = inputs
    ctx.save_for_backward(p1, p2, mask)
    ctx.offsets, ctx.backend = offsets, backend


def _joint_counts_grads(ctx, saved, grad_j, backward):
    """The inputs' gradients from dL/dJ with `backward` (the backward op, or on the eager route
    its implementation): one definition for both routes. `saved` is ctx.saved_tensors, read once
    by the caller (non-reentrant activation checkpointing allows one read)."""
    p1, p2, mask = saved
    if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
        return None, None, None, None, None
    grad_p1, grad_p2 = backward(grad_j, p1, p2, ctx.offsets, mask, ctx.backend)
    return (
        grad_p1 if ctx.needs_input_grad[0] else None,
        grad_p2 if ctx.needs_input_grad[1] else None,
        None,
        None,
        None,
    )


def _joint_counts_autograd(ctx, grad_j):
    return _joint_counts_grads(ctx, ctx.saved_tensors, grad_j, joint_counts_backward)


joint_counts.register_autograd(_joint_counts_autograd, setup_context=_joint_counts_setup_context)


# ------------------------------------------------------------------------------------------------
# boundary cross-correlation of one cluster map
# ------------------------------------------------------------------------------------------------
@torch.library.custom_op("bimi::boundary_cc", mutates_args=())
def boundary_cc(p: Tensor, edge: Tensor, window: int, backend: str) -> Tuple[Tensor, Tensor]:
    """(CC(U(p), edge), u_range): the 0-dim CC in the accumulation dtype and the per-sample
    [min, max] of the raw uncertainty (B, 2), which the backward reuses."""
    return _boundary_cc_impl(p, edge, window, backend)


def _boundary_cc_impl(p, edge, window, backend):
    kernels = _kernels(backend, p.device.type)
    with autocast_off(p.device.type):
        return kernels.boundary_cc(p.contiguous(), edge.contiguous(), window)


@boundary_cc.register_fake
def _boundary_cc_fake(p, edge, window, backend):
    acc = accumulation_dtype(p.dtype)
    return p.new_empty((), dtype=acc), p.new_empty((p.shape[0], 2), dtype=acc)


@torch.library.custom_op("bimi::boundary_cc_backward", mutates_args=())
def boundary_cc_backward(
    grad_cc: Tensor, p: Tensor, edge: Tensor, u_range: Tensor, window: int, backend: str
) -> Tensor:
    """dL/dp in the dtype of p, from the 0-dim dL/dCC."""
    return _boundary_cc_backward_impl(grad_cc, p, edge, u_range, window, backend)


def _boundary_cc_backward_impl(grad_cc, p, edge, u_range, window, backend):
    kernels = _kernels(backend, p.device.type)
    with autocast_off(p.device.type):
        return kernels.boundary_cc_backward(
            grad_cc.contiguous(), p.contiguous(), edge.contiguous(), u_range.contiguous(), window
        )


@boundary_cc_backward.register_fake
def _boundary_cc_backward_fake(grad_cc, p, edge, u_range, window, backend):
    return torch.empty_like(p, memory_format=torch.contiguous_format)


def _boundary_cc_setup_context(ctx, inputs, output):
    p, edge, window, backend = inputs
    ctx.save_for_backward(p, edge, output[1])
    ctx.mark_non_differentiable(output[1])  # u_range: the backward's input, not a result
    ctx.window, ctx.backend = window, backend


def _boundary_cc_grads(ctx, saved, grad_cc, backward):
    p, edge, u_range = saved
    if not ctx.needs_input_grad[0]:
        return None, None, None, None
    return backward(grad_cc, p, edge, u_range, ctx.window, ctx.backend), None, None, None


def _boundary_cc_autograd(ctx, grad_cc, _grad_u_range):
    return _boundary_cc_grads(ctx, ctx.saved_tensors, grad_cc, boundary_cc_backward)


boundary_cc.register_autograd(_boundary_cc_autograd, setup_context=_boundary_cc_setup_context)


# ------------------------------------------------------------------------------------------------
# edge map of the image (no gradient)
# ------------------------------------------------------------------------------------------------
@torch.library.custom_op("bimi::edge_map", mutates_args=())
def edge_map(image: Tensor, gamma: float, backend: str) -> Tensor:
    """E (B, 1, *S) in the accumulation dtype of an image (B, C, *S) already at the maps' size:
    the backend's fused kernel where it has one, else the torch definition (reference.edge_map)."""
    return _edge_map_impl(image, gamma, backend)


def _edge_map_impl(image, gamma, backend):
    kernels = _kernels(backend, image.device.type)
    with autocast_off(image.device.type):
        if kernels.edge_map is None:
            return reference.edge_map(image, gamma)
        return kernels.edge_map(image.contiguous(), gamma)


@edge_map.register_fake
def _edge_map_fake(image, gamma, backend):
    return image.new_empty((image.shape[0], 1) + tuple(image.shape[2:]), dtype=accumulation_dtype(image.dtype))


# ------------------------------------------------------------------------------------------------
# the eager route
# ------------------------------------------------------------------------------------------------
# False sends every call through the custom ops (a switch for tests and for debugging).
EAGER_ROUTE = True

_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def _tracing_modes_active() -> bool:
    """Whether a torch dispatch mode (make_fx, FakeTensorMode, ...) or a function mode other than
    a default device (`with torch.device(...)`, torch.set_default_device: it only places new
    tensors, which the kernels create on their inputs' device) is active: then the custom op
    must be called. True when this torch cannot tell."""
    try:
        return torch._C._len_torch_dispatch_stack() > 0 or (
            torch._C._len_torch_function_stack() > 0
            and not all(isinstance(mode, DeviceContext) for mode in torch.overrides._get_current_function_mode_stack()))
    except AttributeError:  # pragma: no cover - private API gone in some later torch
        return True


def _modes_active() -> bool:
    """Whether a tracing mode (`_tracing_modes_active`) or a torch.func transform is active: then
    the plain eager route must not be taken (`_transform_route` chooses between the Functions
    and the custom op)."""
    try:
        return _tracing_modes_active() or torch._C._functorch.peek_interpreter_stack() is not None
    except AttributeError:  # pragma: no cover - private API gone in some later torch
        return True


def eager(*tensors: Optional[Tensor]) -> bool:
    """Whether a call on `tensors` may skip the custom op: nothing traces it (torch.compile,
    torch.jit.trace, a mode or transform) and every tensor is a plain tensor (not fake, meta,
    functional or another subclass)."""
    if not EAGER_ROUTE or torch.compiler.is_compiling() or torch.jit.is_tracing() or _modes_active():
        return False
    return all(t is None or (type(t) in _PLAIN_TENSOR_TYPES and not t.is_meta) for t in tensors)


def _no_second_derivative(op_name: str) -> RuntimeError:
    return RuntimeError(
        f"bimi::{op_name}: no second derivative (its backward kernels have no derivative of "
        "their own); differentiate the loss once, without create_graph=True"
    )


def _no_forward_derivative() -> RuntimeError:
    return RuntimeError(
        "bimi: forward-mode AD (torch.autograd.forward_ad, torch.func.jvp, jacfwd, hessian) is not "
        "supported: the kernels have no forward derivative; use reverse mode (loss.backward(), "
        "torch.autograd.grad, torch.func.grad, vjp, jacrev)"
    )


class _NoSecondDerivative(torch.autograd.Function):
    """The gradients `compute()` returns, in a node whose own backward refuses: differentiating
    them raises, as on the custom-op route (whose backward ops have no autograd formula). The
    node's inputs are the tensors the gradients were computed from (dL/d(output) and the saved
    inputs), so it lies on every path from a second derivative to the maps. (once_differentiable
    attaches its error to detached copies instead: torch.autograd.grad(..., inputs=p) skips it
    and returns a second derivative without the kernels' part.)"""

    @staticmethod
    def forward(ctx, op_name, compute, *tensors):
        ctx.op_name = op_name
        return compute()

    @staticmethod
    def backward(ctx, *grads):
        raise _no_second_derivative(ctx.op_name)


def _gradients_without_a_derivative(op_name, compute, *tensors):
    """`compute()` (the eager route's gradients) as they are when no graph of the backward is being
    built; under create_graph=True, through _NoSecondDerivative."""
    if not torch.is_grad_enabled():
        return compute()
    return _NoSecondDerivative.apply(op_name, compute, *[t for t in tensors if t is not None])


class _JointCountsFunction(torch.autograd.Function):
    """The eager route of `joint_counts`: what is saved and how the gradients are formed are the
    custom op's (`_joint_counts_setup_context`, `_joint_counts_grads`). (The old style, forward
    with ctx: a Function with setup_context costs an inspect.signature per call, a visible share
    of a small loss call's host time.)"""

    @staticmethod
    def forward(ctx, p1, p2, offsets, mask, backend):
        counts = _joint_counts_impl(p1, p2, offsets, mask, backend)
        _joint_counts_setup_context(ctx, (p1, p2, offsets, mask, backend), counts)
        return counts

    @staticmethod
    def backward(ctx, grad_j):
        saved = ctx.saved_tensors
        return _gradients_without_a_derivative(
            "joint_counts", lambda: _joint_counts_grads(ctx, saved, grad_j, _joint_counts_backward_impl),
            grad_j, *saved)


class _BoundaryCCFunction(torch.autograd.Function):
    """The eager route of `boundary_cc` (`_boundary_cc_setup_context`, `_boundary_cc_grads`)."""

    @staticmethod
    def forward(ctx, p, edge, window, backend):
        output = _boundary_cc_impl(p, edge, window, backend)
        _boundary_cc_setup_context(ctx, (p, edge, window, backend), output)
        return output

    @staticmethod
    def backward(ctx, grad_cc, _grad_u_range):
        saved = ctx.saved_tensors
        return _gradients_without_a_derivative(
            "boundary_cc", lambda: _boundary_cc_grads(ctx, saved, grad_cc, _boundary_cc_backward_impl),
            grad_cc, *saved)


# ------------------------------------------------------------------------------------------------
# the torch.func route
# ------------------------------------------------------------------------------------------------
# torch.library's custom ops have no torch.func support (their generated Function has no
# setup_context), so under a transform the ops go through the Functions below: setup_context
# style, a vmap rule (the op slice by slice: the kernels have no batched form), and the backward
# kernels behind Functions of their own, since a transform's wrapped tensors reach a kernel only
# through a Function (which runs its forward on the unwrapped tensors).
def _transform_route() -> bool:
    """Whether a call takes the torch.func route: a grad, vjp, vmap or jvp transform is on top
    and nothing else traces (torch.compile, torch.jit.trace, a tracing mode and
    torch.func.functionalize take the custom ops)."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or _tracing_modes_active():
        return False
    interpreter = torch._C._functorch.peek_interpreter_stack()
    return interpreter is not None and interpreter.key() in _FUNCTION_TRANSFORMS


_FUNCTION_TRANSFORMS = (torch._C._functorch.TransformType.Grad, torch._C._functorch.TransformType.Vmap,
                        torch._C._functorch.TransformType.Jvp)


def _alive(t: Optional[Tensor]) -> Optional[Tensor]:
    """`t` without the wrappers of torch.func transforms that have ended: the function torch.func.vjp
    returns runs the backward after its transform has exited, on its tensors' dead wrappers,
    which a kernel cannot read."""
    return t if t is None else torch._C._functorch.unwrap_if_dead(t)


def _each_slice(apply, info, in_dims, *args):
    """The vmap rule of every op here: the op on each slice of the vmapped dimension, stacked (a
    slice is one whole call, maps of shape (B, K, *S))."""
    results = [
        apply(*[arg.select(dim, i) if isinstance(arg, Tensor) and dim is not None else arg
                for arg, dim in zip(args, in_dims)])
        for i in range(info.batch_size)
    ]
    if isinstance(results[0], tuple):
        stacked = tuple(torch.stack(parts) for parts in zip(*results))
        return stacked, (0,) * len(stacked)
    return torch.stack(results), 0


def _refuse_jvp(ctx, *tangents):
    raise _no_forward_derivative()


def _functions_for_torch_func(op_name, impl, setup_context, grads, backward_impl):
    """The Function of op `op_name` under torch.func transforms: forward `impl`, saved tensors
    and gradients as the custom op's (`setup_context`, `grads`), whose backward kernels
    (`backward_impl`) run in a second Function without a derivative."""

    class Backward(torch.autograd.Function):
        @staticmethod
        def forward(*args):
            return backward_impl(*args)

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

        @staticmethod
        def backward(ctx, *grads_of_grads):
            raise _no_second_derivative(op_name)

        @staticmethod
        def vmap(info, in_dims, *args):
            return _each_slice(Backward.apply, info, in_dims, *args)

        jvp = staticmethod(_refuse_jvp)

    class Forward(torch.autograd.Function):
        @staticmethod
        def forward(*args):
            return impl(*args)

        @staticmethod
        def backward(ctx, grad, *_grads_of_nondifferentiable_outputs):
            saved = tuple(map(_alive, ctx.saved_tensors))
            return grads(ctx, saved, _alive(grad), Backward.apply)

        @staticmethod
        def vmap(info, in_dims, *args):
            return _each_slice(Forward.apply, info, in_dims, *args)

        jvp = staticmethod(_refuse_jvp)

    Forward.setup_context = staticmethod(setup_context)
    Backward.__name__ = Backward.__qualname__ = f"_{op_name}_backward_for_torch_func"
    Forward.__name__ = Forward.__qualname__ = f"_{op_name}_for_torch_func"
    return Forward


_JointCountsForTorchFunc = _functions_for_torch_func(
    "joint_counts", _joint_counts_impl, _joint_counts_setup_context, _joint_counts_grads,
    _joint_counts_backward_impl)
_BoundaryCCForTorchFunc = _functions_for_torch_func(
    "boundary_cc", _boundary_cc_impl, _boundary_cc_setup_context, _boundary_cc_grads,
    _boundary_cc_backward_impl)


class _EdgeMapForTorchFunc(torch.autograd.Function):
    """`edge_map` under torch.func transforms (vmap over images); no gradient, as everywhere."""

    @staticmethod
    def forward(image, gamma, backend):
        return _edge_map_impl(image, gamma, backend)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(output)

    @staticmethod
    def backward(ctx, grad_edge):
        return None, None, None

    @staticmethod
    def vmap(info, in_dims, *args):
        return _each_slice(_EdgeMapForTorchFunc.apply, info, in_dims, *args)

    @staticmethod
    def jvp(ctx, *tangents):
        return None


# ------------------------------------------------------------------------------------------------
# the entry points
# ------------------------------------------------------------------------------------------------
def _refuse_forward_mode(*maps: Tensor) -> None:
    """The kernels have no forward-mode derivative: a map carrying a tangent
    (torch.autograd.forward_ad) would lose it without a word, so refuse. Costs one attribute read
    when no dual level is active."""
    if getattr(forward_ad, "_current_level", -1) >= 0 and any(
            forward_ad.unpack_dual(t).tangent is not None for t in maps):
        raise _no_forward_derivative()


def apply_joint_counts(p1: Tensor, p2: Tensor, offsets: List[int], mask: Optional[Tensor],
                       backend: str) -> Tensor:
    """`joint_counts`, by the eager route where it may (see the module's docstring)."""
    _refuse_forward_mode(p1, p2)
    if not eager(p1, p2, mask):
        if _transform_route():
            return _JointCountsForTorchFunc.apply(p1, p2, offsets, mask, backend)
        return joint_counts(p1, p2, list(offsets), mask, backend)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (p1, p2, mask)):
        return _JointCountsFunction.apply(p1, p2, offsets, mask, backend)
    with torch.no_grad():
        return _joint_counts_impl(p1, p2, offsets, mask, backend)


def apply_boundary_cc(p: Tensor, edge: Tensor, window: int, backend: str) -> Tuple[Tensor, Tensor]:
    """`boundary_cc`, by the eager route where it may."""
    _refuse_forward_mode(p)
    if not eager(p, edge):
        if _transform_route():
            return _BoundaryCCForTorchFunc.apply(p, edge, window, backend)
        return boundary_cc(p, edge, window, backend)
    if torch.is_grad_enabled() and (p.requires_grad or edge.requires_grad):
        return _BoundaryCCFunction.apply(p, edge, window, backend)
    with torch.no_grad():
        return _boundary_cc_impl(p, edge, window, backend)


def apply_edge_map(image: Tensor, gamma: float, backend: str) -> Tensor:
    """`edge_map`, by the eager route where it may (no gradient either way)."""
    if not eager(image):
        if _transform_route():
            return _EdgeMapForTorchFunc.apply(image, gamma, backend)
        return edge_map(image, gamma, backend)
    with torch.no_grad():
        return _edge_map_impl(image, gamma, backend)
