"""The dispatch route (docs/architecture.md): lazy plain-function loaders, `resolve` cached per
(request, device type, BIMI_BACKEND), explicit requests never fall back, and `auto` warns once
when it has to run the slow reference where a native backend belongs."""
import warnings

import pytest
import torch

from helpers import random_image, random_maps

import bimi_kernels
from bimi_kernels import backends


@pytest.fixture
def fresh_dispatch(monkeypatch):
    """Forget what was loaded and resolved; restore it afterwards."""
    monkeypatch.setattr(backends, "_loaded", {})
    monkeypatch.setattr(backends, "_load_errors", {})
    monkeypatch.delenv("BIMI_BACKEND", raising=False)
    backends.reset_cache()
    yield
    backends.reset_cache()


def test_resolve_is_cached_per_request_device_and_environment(fresh_dispatch, monkeypatch):
    calls = []
    original = backends.unavailable_reason

    def counting(name, device_type):
        calls.append((name, device_type))
        return original(name, device_type)

    monkeypatch.setattr(backends, "unavailable_reason", counting)
    assert backends.resolve("auto", "cpu") == "cpp"
    first = len(calls)
    assert first > 0
    for _ in range(5):
        assert backends.resolve("auto", "cpu") == "cpp"
    assert len(calls) == first  # answered from the cache
    monkeypatch.setenv("BIMI_BACKEND", "reference")
    assert backends.resolve("auto", "cpu") == "reference"  # a new environment is a new key
    assert backends.resolve("cpp", "cpu") == "cpp"  # BIMI_BACKEND overrides auto only


def test_explicit_unavailable_backend_raises_every_time(fresh_dispatch):
    for _ in range(2):
        with pytest.raises(RuntimeError, match="backend 'cuda' was requested for cpu tensors"):
            backends.resolve("cuda", "cpu")


def test_auto_falling_back_to_reference_warns_once_with_reason_and_fix(fresh_dispatch, monkeypatch):
    def broken():
        raise ImportError("bimi_kernels._C was not built")

    monkeypatch.setitem(backends._LOADERS, "cpp", broken)
    p1, p2 = random_maps((2, 3, 6, 7), dtype=torch.float32)
    image = random_image(p1.shape, dtype=torch.float32)
    with pytest.warns(RuntimeWarning, match=r"runs the slow 'reference'.*cpp: could not be loaded.*_C was not built.*no-build-isolation"):
        bimi_kernels.BIMILoss()(p1, p2, image)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bimi_kernels.BIMILoss()(p1, p2, image)  # once only
    assert bimi_kernels.available_backends("cpu")["cpp"].startswith("could not be loaded")


def test_choosing_reference_knowingly_does_not_warn(fresh_dispatch):
    p1, p2 = random_maps((2, 3, 6, 7), dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bimi_kernels.RegularizedMILoss(backend="reference")(p1, p2)


def test_loaders_are_plain_functions_returning_backends():
    for name, loader in backends._LOADERS.items():
        assert callable(loader) and loader.__module__ == "bimi_kernels.backends"
    assert backends.get("reference").name == "reference"


def test_eager_route_only_where_nothing_traces():
    """ops.eager: the custom ops are skipped only for plain tensors with no tracing, mode or
    transform active, so torch.compile, export, fake tensors and torch.func see the custom ops."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from bimi_kernels import ops

    p = torch.rand(1, 2, 3, 3)
    assert ops.eager(p, None)
    assert ops.eager(torch.nn.Parameter(p))
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(p)
        assert not ops.eager(fake)
    assert not ops.eager(fake)  # a fake tensor outside its mode
    with torch.device("cpu"):  # a function mode
        assert not ops.eager(p)
    seen = []
    torch.func.grad(lambda x: (seen.append(ops.eager(x)), x.sum())[1])(p)
    assert seen == [False]
    seen.clear()
    with warnings.catch_warnings():  # torch.jit.trace is deprecated, still in use
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.trace(lambda x: (seen.append(ops.eager(x)), x * 2)[1], (p,), check_trace=False)
    assert seen == [False]
    torch._dynamo.reset()
    traced = torch.compile(lambda x: x * 2 if ops.eager(x) else x * 3, fullgraph=True, backend="eager")
    assert torch.equal(traced(p), p * 3)
