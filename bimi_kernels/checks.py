"""Input checks (docs/contract.md §9): a wrong call raises ValueError/TypeError naming the
argument, before any kernel runs.

Shape, dtype, device and setting checks cost nothing and always run. Checks that read values run
by default only for the maps and the mask, on a sample of pixels of CPU tensors, where reading
costs no device sync (logits passed for probabilities, negative or non-finite values, mask weights
outside [0, 1]); every value of the maps, the image and the mask weights is checked only when
asked (`validate=True`, or BIMI_VALIDATE on when `validate` is None).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import os
import sys
from typing import Optional, Tuple

import torch
from torch._subclasses.fake_tensor import is_fake

from .numerics import FLOAT_DTYPES


def stacklevel_outside_package() -> int:
    """The `warnings.warn` stacklevel, for a warning raised by our caller, that points at the
    first frame outside this package, torch and the dataclass machinery (`dataclasses.replace`,
    a generated __init__): the user's line, whichever route led here."""
    inside = tuple(os.path.dirname(os.path.abspath(module.__file__)) + os.sep
                   for module in (sys.modules[__name__], torch)) + (dataclasses.__file__,)
    package = __name__.split(".")[0]

    def ours(frame) -> bool:
        filename = frame.f_code.co_filename
        if filename.startswith("<"):  # generated code: ours (a dataclass __init__), or the user's REPL
            return str(frame.f_globals.get("__name__", "")).split(".")[0] in (package, "dataclasses")
        return filename.startswith(inside)

    frame, level = sys._getframe(2), 2
    while frame is not None and ours(frame):
        frame, level = frame.f_back, level + 1
    return level


def check_tensor(name: str, t) -> None:
    """TypeError unless t is a tensor."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")


def check_float_tensor(name: str, t) -> None:
    """TypeError unless t is a tensor of one of the dtypes the kernels take (FLOAT_DTYPES)."""
    check_tensor(name, t)
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a float dtype (float16, bfloat16, float32 or float64), got {t.dtype}")


def check_maps(p1, p2) -> None:
    """p1, p2: (B, K, H, W) or (B, K, D, H, W), same shape, dtype and device, K >= 2."""
    for name, t in (("p1", p1), ("p2", p2)):
        check_float_tensor(name, t)
        if t.dim() not in (4, 5):
            raise ValueError(
                f"{name}: expected shape (B, K, H, W) or (B, K, D, H, W), "
                f"got {tuple(t.shape)} with {t.dim()} dims"
            )
    if p1.shape != p2.shape:
        raise ValueError(f"p2: shape {tuple(p2.shape)} must equal the shape of p1, {tuple(p1.shape)}")
    if p1.dtype != p2.dtype:
        raise TypeError(f"p2: dtype {p2.dtype} must equal the dtype of p1, {p1.dtype}")
    if p1.device != p2.device:
        raise ValueError(f"p2: on device {p2.device}, but p1 is on {p1.device}; expected the same device")
    check_map(p1, "p1")


def check_map(p, name: str = "p") -> None:
    """One cluster map: float dtype, 4 or 5 dims, K >= 2, no empty dim."""
    check_float_tensor(name, p)
    if p.dim() not in (4, 5):
        raise ValueError(
            f"{name}: expected shape (B, K, H, W) or (B, K, D, H, W), got {tuple(p.shape)} with {p.dim()} dims"
        )
    if p.shape[1] < 2:
        raise ValueError(f"{name}: expected K >= 2 clusters in dim 1, got shape {tuple(p.shape)}")
    if p.numel() == 0:
        raise ValueError(f"{name}: has an empty dimension, shape {tuple(p.shape)}")


def check_image(image, p, name: str = "image") -> None:
    """image: (B, C, *S') with the maps' batch size and number of spatial dims, same device."""
    check_tensor(name, image)
    if not image.is_floating_point():
        raise TypeError(f"{name}: expected a floating dtype, got {image.dtype}")
    if image.dim() != p.dim():
        raise ValueError(
            f"{name}: expected {p.dim()} dims (B, C, {'D, ' if p.dim() == 5 else ''}H, W) like the maps, "
            f"got shape {tuple(image.shape)}"
        )
    if image.shape[0] != p.shape[0]:
        raise ValueError(f"{name}: batch size {image.shape[0]} does not match the maps' batch size {p.shape[0]}")
    if image.device != p.device:
        raise ValueError(f"{name}: on device {image.device}, but the maps are on {p.device}")
    if image.numel() == 0:
        raise ValueError(f"{name}: has an empty dimension, shape {tuple(image.shape)}")


def normalize_mask(mask, p) -> Optional[torch.Tensor]:
    """mask (B, 1, *S) or (B, *S) -> a contiguous (B, *S) tensor of weights in p's dtype, or None."""
    if mask is None:
        return None
    check_tensor("mask", mask)
    if mask.is_complex():
        raise TypeError(f"mask: expected a bool, integer or float dtype, got {mask.dtype}")
    batch, spatial = p.shape[0], tuple(p.shape[2:])
    shape = tuple(mask.shape)
    # two == tests, not `in`: torch.compile evaluates `in` wrongly on symbolic sizes
    if not (shape == (batch, 1) + spatial or shape == (batch,) + spatial):
        raise ValueError(
            f"mask: expected shape {(batch, 1) + spatial} or {(batch,) + spatial}, got {tuple(mask.shape)}"
        )
    if mask.device != p.device:
        raise ValueError(f"mask: on device {mask.device}, but the maps are on {p.device}")
    return mask.reshape((batch,) + spatial).to(p.dtype).contiguous()


def check_int(name: str, value, minimum: Optional[int] = None) -> None:
    """A Python int (not a bool, not a tensor) >= `minimum`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected a Python int, got {_describe(value)}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")


def check_number(name: str, value, minimum=None, maximum=None, above=None) -> None:
    """A finite Python number (int or float; not a bool, not a tensor) in the given range."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a Python number, got {_describe(value)}")
    try:
        value = float(value)
    except OverflowError:
        raise ValueError(f"{name}: expected a finite number, got an int too large for a float") from None
    # comparisons rather than math.isfinite, which torch.compile cannot trace once a float
    # setting that changed between calls has become a symbolic float
    if not -math.inf < value < math.inf:
        raise ValueError(f"{name}: expected a finite number, got {value}")
    if minimum is not None and maximum is not None and not minimum <= value <= maximum:
        raise ValueError(f"{name}: expected a number in [{minimum:g}, {maximum:g}], got {value:g}")
    if minimum is not None and maximum is None and not value >= minimum:
        raise ValueError(f"{name}: expected a number >= {minimum:g}, got {value:g}")
    if above is not None and not value > above:
        raise ValueError(f"{name}: expected a number > {above:g}, got {value:g}")


def check_bool(name: str, value) -> None:
    """True or False: a Python bool, or numpy's (as other settings take numpy numbers)."""
    kind = type(value)
    if not (isinstance(value, bool) or (kind.__module__ == "numpy" and kind.__name__ in ("bool_", "bool"))):
        raise TypeError(f"{name}: expected True or False, got {_describe(value)}")


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a torch.Tensor of shape {tuple(value.shape)} (pass a Python number, e.g. t.item())"
    kind = type(value)
    name = kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    return f"{value!r} ({name})"


def check_size(size, ndim: int) -> tuple:
    """A spatial size: `ndim` ints >= 1 (e.g. (H, W)); returned as a tuple."""
    if isinstance(size, (str, bytes)) or not isinstance(size, (tuple, list, torch.Size)):
        raise TypeError(f"size: expected a sequence of {ndim} ints (e.g. (H, W)), got {_describe(size)}")
    if len(size) != ndim or any(isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 1 for s in size):
        raise ValueError(f"size: expected {ndim} ints >= 1 (one per spatial dim), got {tuple(size)}")
    return tuple(int(s) for s in size)


def check_process_group(group) -> None:
    """None (the default group) or a torch.distributed process group."""
    if group is None:
        return
    distributed = torch.distributed
    if not (distributed.is_available() and isinstance(group, distributed.ProcessGroup)):
        raise TypeError(
            f"process_group: expected None or a torch.distributed process group (dist.new_group(...)), "
            f"got {_describe(group)}"
        )


def check_window(window) -> None:
    if isinstance(window, bool) or not isinstance(window, numbers.Integral):
        raise TypeError(f"window: expected an odd int >= 1, got {_describe(window)}")
    if window < 1 or window % 2 == 0:
        raise ValueError(f"window: expected an odd int >= 1, got {window}")


def check_backend_name(backend) -> None:
    from .backends import BACKEND_NAMES

    if not isinstance(backend, str) or (backend != "auto" and backend not in BACKEND_NAMES):
        raise ValueError(f"backend: expected 'auto' or one of {BACKEND_NAMES}, got {backend!r}")


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


def validation_mode(validate: Optional[bool]) -> str:
    """"full" (every value, a device sync), "sampled" (the default: a fixed sample of pixels, on
    CPU tensors only, where reading values costs no sync) or "off" (docs/contract.md §9).

    `validate=None` defers to the environment variable BIMI_VALIDATE, parsed as a boolean."""
    if validate is None:
        raw = os.environ.get("BIMI_VALIDATE")
        if raw is None:
            return "sampled"
        value = raw.strip().lower()
        if value in _TRUE:
            return "full"
        if value in _FALSE:
            return "off" if value else "sampled"
        raise ValueError(
            f"BIMI_VALIDATE: expected one of 1/true/yes/on or 0/false/no/off, got {raw!r}"
        )
    return "full" if validate else "off"


# Pixels read by the default (sampled) check of each map: cheap, and a map of logits has
# negative values or sums away from 1 almost everywhere.
SAMPLED_PIXELS = 64


def graph_traced() -> bool:
    """Whether torch.compile, make_fx or a FakeTensorMode is tracing this call: then a Python branch
    on a tensor's value would break the graph or read a placeholder. (Other dispatch modes, a
    FlopCounterMode say, run on real values and keep the eager checks.)"""
    if torch.compiler.is_compiling():
        return True
    try:
        keys = torch._C._TorchDispatchModeKey
        return any(torch._C._get_dispatch_mode(key) is not None for key in (keys.PROXY, keys.FAKE))
    except AttributeError:  # pragma: no cover - private API gone in some later torch
        return torch._C._len_torch_dispatch_stack() > 0


def _sum_tolerance(dtype: torch.dtype) -> float:
    """How far a probability vector's sum may be from 1: softmax in `dtype`, summed exactly, is
    off by about one rounding of the largest entry; 1e-2 leaves room for any sane K."""
    return 1e-2 + 4 * torch.finfo(dtype).eps


# What makes values wrong, defined once for the eager checks (which count the faults and name
# them) and the traced ones (which assert there are none).
def _probability_faults(values: torch.Tensor, dim: int):
    """(non-finite entries, negative entries, vectors along `dim` whose sum is neither 1 nor 0)
    of `values` as boolean tensors, and the vectors' sums (float64)."""
    tolerance = _sum_tolerance(values.dtype)
    values = values.detach().double()
    sums = values.sum(dim=dim)
    return ~torch.isfinite(values), values < 0, ((sums - 1).abs() > tolerance) & (sums != 0), sums


def _mask_faults(mask: torch.Tensor) -> torch.Tensor:
    """The mask weights outside [0, 1] (nan included)."""
    values = mask.detach().double()
    return (values < 0) | (values > 1) | ~torch.isfinite(values)


_NOT_LOGITS = "expected probabilities (a softmax over dim 1), not logits"
_MASK_RANGE = "expected weights in [0, 1] (1: valid)"


def _assert_values_in_graph(maps: dict, others: dict, mask) -> None:
    """`validate_values` inside a traced graph: each check a `torch._assert_async` that the graph
    keeps (a RuntimeError with this message when it fails on CPU tensors; on a GPU a device-side
    assert, as torch's own kernels raise)."""
    for name, p in maps.items():
        non_finite, negative, off, _ = _probability_faults(p, dim=1)
        torch._assert_async(~non_finite.any(), f"{name}: contains non-finite value(s) (nan or inf)")
        torch._assert_async(~negative.any(), f"{name}: contains negative probability value(s); {_NOT_LOGITS}")
        torch._assert_async(~off.any(), f"{name}: holds vectors that do not sum to 1 over the K clusters; "
                            f"{_NOT_LOGITS} or scores")
    for name, t in others.items():
        if t is not None and t.is_floating_point():
            torch._assert_async(torch.isfinite(t.detach()).all(), f"{name}: contains non-finite value(s) (nan or inf)")
    if mask is not None and mask.dtype != torch.bool:
        torch._assert_async(~_mask_faults(mask).any(), f"mask: contains value(s) outside [0, 1]; {_MASK_RANGE}")


def _not_probabilities(name: str, values: torch.Tensor, what: str) -> Optional[str]:
    """Why `values` (n, K), read from map `name`, are not probability vectors, or None."""
    non_finite, negative, off, sums = _probability_faults(values, dim=-1)
    bad = non_finite.sum().item()
    if bad:
        return f"{name}: contains {bad} non-finite value(s) (nan or inf){what}"
    count = negative.sum().item()
    if count:
        lowest = values.detach().min().item()
        return f"{name}: contains {count} negative probability value(s){what} (min {lowest:.3g}); {_NOT_LOGITS}"
    count = off.sum().item()
    if count:
        return (
            f"{name}: {count} pixel(s){what} hold vectors that do not sum to 1 over the K clusters "
            f"(e.g. {sums[off][0].item():.4g}); {_NOT_LOGITS} or scores"
        )
    return None


def _even_picks(count: int, calls: int = 1) -> torch.Tensor:
    """SAMPLED_PIXELS indices per call spread evenly over range(count), first and last included;
    all of them when there are fewer. On the CPU whatever the default device
    (torch.set_default_device): the tensors checked are CPU tensors."""
    n = min(count, SAMPLED_PIXELS * calls)
    picks = sorted({(i * (count - 1)) // max(1, n - 1) for i in range(n)})
    return torch.tensor(picks, dtype=torch.long, device="cpu")


@functools.lru_cache(maxsize=32)
def _sample_index(shape, calls: int = 1) -> torch.Tensor:
    """(n, K) flat indices (as torch.take reads them) of SAMPLED_PIXELS pixels per call spread
    evenly over (B, *S), every channel of each (`calls`: the vmapped calls folded into B)."""
    batch, channels, spatial = shape[0], shape[1], tuple(shape[2:])
    pixels = math.prod(spatial)
    picks = _even_picks(batch * pixels, calls)
    sample, pixel = picks // pixels, picks % pixels
    channel = torch.arange(channels, device="cpu")
    return (sample * channels)[:, None] * pixels + channel[None, :] * pixels + pixel[:, None]


def values_and_calls(t: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """`t`'s values as a plain tensor, for the value checks, and the number of calls they hold:
    under torch.func transforms, the tensor beneath their wrappers, each vmapped dimension folded
    into the batch dimension (dim 0), so that a check reads the values of every vmapped call
    (reading values is what a vmapped tensor refuses)."""
    functorch = torch._C._functorch
    calls = 1
    while functorch.is_functorch_wrapped_tensor(t):
        if functorch.is_batchedtensor(t):
            unwrapped = functorch.get_unwrapped(t).movedim(functorch.maybe_get_bdim(t), 0)
            calls *= unwrapped.shape[0]
            t = unwrapped.flatten(0, 1)
        else:
            t = functorch.get_unwrapped(t)
    return t, calls


def _has_values(t: Optional[torch.Tensor]) -> bool:
    """Whether `t` holds values a check can read (fake and meta tensors hold none)."""
    return t is not None and not t.is_meta and not is_fake(t)


def values_of(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """`t`'s values beneath torch.func's wrappers (`values_and_calls`)."""
    return t if t is None else values_and_calls(t)[0]


@functools.lru_cache(maxsize=32)
def _mask_sample_index(numel: int, calls: int = 1) -> torch.Tensor:
    """Flat indices (as torch.take reads them, any strides) of the mask weights to check."""
    return _even_picks(numel, calls)


def check_probabilities_sampled(maps: dict, mask: Optional[torch.Tensor] = None) -> None:
    """The default value check (docs/contract.md §9): on CPU tensors, a fixed sample of pixels of
    each map must hold probability vectors, and a fixed sample of the mask's weights must lie in
    [0, 1]. Skipped for other devices (it would need a sync)
    and while torch.compile or make_fx traces (a data-dependent branch would break the graph).
    The good case costs a few small ops for all maps together; the message is worked out only on
    failure. Under torch.jit.trace it is skipped too: a traced check would be frozen into the
    trace as constants (with a TracerWarning per value read) and never run again."""
    if graph_traced() or torch.jit.is_tracing():
        return
    if mask is not None and mask.dtype != torch.bool:
        _check_mask_sampled(mask)
    unwrapped = {name: values_and_calls(p) for name, p in maps.items()}
    # values a CPU tensor gives without a sync (fake and meta tensors have none)
    unwrapped = {name: (p, calls) for name, (p, calls) in unwrapped.items()
                 if p.device.type == "cpu" and _has_values(p)}
    if not unwrapped:
        return
    maps = {name: p for name, (p, _) in unwrapped.items()}
    with torch.no_grad():
        samples = [torch.take(p.detach(), _sample_index(tuple(p.shape), calls)) for p, calls in unwrapped.values()]
        tolerance = min(_sum_tolerance(p.dtype) for p in maps.values())
        lowest = min(sample.amin().item() for sample in samples)
        sums = torch.cat([sample.sum(dim=-1, dtype=torch.float64) for sample in samples])
        worst_sum = (sums - 1).abs().amax().item()
    # written so that a nan in either fails the test
    if lowest >= 0 and worst_sum <= tolerance:
        return
    for (name, p), sample in zip(maps.items(), samples):
        message = _not_probabilities(name, sample, " (in a sample of pixels)")
        if message:
            raise ValueError(message + "; validate=False turns this check off")


def _check_mask_sampled(mask: torch.Tensor) -> None:
    values, calls = values_and_calls(mask)
    if values.device.type != "cpu" or not _has_values(values) or values.numel() == 0:
        return
    index = _mask_sample_index(values.numel(), calls)
    with torch.no_grad():
        try:
            sample = torch.take(values.detach(), index)
        except (NotImplementedError, RuntimeError):  # no take for uint16-64 and float8 masks
            sample = values.detach().reshape(-1)[index]
        sample = sample.double()
        lowest, highest = sample.amin().item(), sample.amax().item()
    if lowest >= 0 and highest <= 1:  # written so that a nan fails the test
        return
    outside = int(_mask_faults(sample).sum())
    raise ValueError(f"mask: contains {outside} value(s) outside [0, 1] (in a sample of pixels; "
                     f"min {lowest:.3g}, max {highest:.3g}); {_MASK_RANGE}; validate=False turns "
                     "this check off")


def validate_values(maps: dict, others: Optional[dict] = None, mask=None) -> None:
    """Every value (a device sync on a GPU), naming the argument and what was found: the cluster
    maps `maps` (name -> tensor) must hold probability vectors (finite, >= 0, summing to 1 or
    to 0), the tensors in `others` must be finite, the mask weights must lie in [0, 1]. While a
    graph is traced, the same checks become asserts in the graph (`_assert_values_in_graph`)."""
    if graph_traced():
        _assert_values_in_graph(maps, others or {}, mask)
        return
    maps = {name: p for name, p in ((name, values_of(p)) for name, p in maps.items()) if _has_values(p)}
    others = {name: t for name, t in ((name, values_of(t)) for name, t in (others or {}).items()) if _has_values(t)}
    mask = values_of(mask)
    mask = mask if _has_values(mask) else None
    for name, p in maps.items():
        message = _not_probabilities(name, p.movedim(1, -1).reshape(-1, p.shape[1]), "")
        if message:
            raise ValueError(message)
    for name, t in (others or {}).items():
        if t is None or not t.is_floating_point():
            continue
        bad = int((~torch.isfinite(t.detach())).sum())
        if bad:
            raise ValueError(f"{name}: contains {bad} non-finite value(s) (nan or inf)")
    if mask is not None and not mask.dtype == torch.bool:
        outside = int(_mask_faults(mask).sum())
        if outside:
            raise ValueError(f"mask: contains {outside} value(s) outside [0, 1]; {_MASK_RANGE}")
