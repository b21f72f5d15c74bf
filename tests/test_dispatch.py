"""The dispatch route (docs/architecture.md): lazy plain-function loaders, `resolve` cached per
(request, device type, BIMI_BACKEND, BIMI_CPU_ISA), explicit requests never fall back, and `auto` warns once
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
    with pytest.warns(RuntimeWarning, match=r"runs the slow 'reference'.*cpp: could not be loaded.*_C was not built.*no-build-isolation") as caught:
        bimi_kernels.BIMILoss()(p1, p2, image)
    # attributed to the caller's line (this file), not to a line inside the package
    assert [w.filename for w in caught] == [__file__]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bimi_kernels.BIMILoss()(p1, p2, image)  # once only
    assert bimi_kernels.available_backends("cpu")["cpp"].startswith("could not be loaded")


@pytest.mark.parametrize("value", ["avx9", "AVX512"])
def test_a_cpu_build_setting_that_cannot_run_is_refused_up_front(fresh_dispatch, monkeypatch, value):
    """BIMI_CPU_ISA naming a build the loops do not have (or, on a processor without AVX-512, one
    it cannot run): cpp is reported unavailable with that reason, and both backend='cpp' and
    'auto' raise its ValueError before any kernel, never moving on to the slow reference; a
    changed setting is a new cache key."""
    from bimi_kernels.native import cpu_isa

    monkeypatch.setenv("BIMI_CPU_ISA", value)
    try:
        cpu_isa()
    except ValueError as exc:
        message = str(exc)
    else:
        pytest.skip(f"this processor runs the {value} build")
    p1, p2 = random_maps((1, 3, 5, 6), dtype=torch.float32)
    image = random_image(p1.shape, dtype=torch.float32)
    assert bimi_kernels.available_backends("cpu")["cpp"] == message
    for backend in ("auto", "cpp"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback warning either
            with pytest.raises(ValueError, match="BIMI_CPU_ISA"):
                bimi_kernels.BIMILoss(backend=backend)(p1, p2, image)
    bimi_kernels.BIMILoss(backend="reference")(p1, p2, image)
    monkeypatch.delenv("BIMI_CPU_ISA")
    assert backends.resolve("auto", "cpu") == "cpp"
    assert bimi_kernels.available_backends("cpu")["cpp"] is None


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
    transform active, so torch.compile, export, fake and meta tensors see the custom ops (and
    torch.func its own Functions)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from bimi_kernels import ops

    p = torch.rand(1, 2, 3, 3)
    assert ops.eager(p, None)
    assert ops.eager(torch.nn.Parameter(p))
    assert not ops.eager(p.to("meta"))
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(p)
        assert not ops.eager(fake)
    assert not ops.eager(fake)  # a fake tensor outside its mode
    with torch.device("cpu"):  # a default device only places new tensors: still eager
        assert ops.eager(p)

    class Logging(torch.overrides.TorchFunctionMode):  # any other function mode may trace
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Logging():
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


@pytest.mark.parametrize("requires_grad", [False, True], ids=["no-grad", "grad"])
def test_the_loss_on_fake_and_meta_tensors_gives_shapes_and_dtypes(requires_grad):
    """Under FakeTensorMode and on meta tensors (shape propagation, memory planning) the loss
    runs through the ops' fakes with the default checks on: the sampled value check skips what
    has no values (it used to raise DataDependentOutputException, and meta tensors an autocast
    error)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    def run(p1, p2, image):
        loss = bimi_kernels.BIMILoss(offsets=1)(p1.requires_grad_(requires_grad), p2, image)
        assert loss.shape == () and loss.dtype == torch.float32 and loss.device == p1.device
        if requires_grad:
            loss.backward()
            assert p1.grad.shape == p1.shape

    shape = (2, 3, 8, 9)
    with FakeTensorMode():
        run(torch.rand(shape), torch.rand(shape), torch.rand(2, 1, 8, 9))
    run(torch.rand(shape, device="meta"), torch.rand(shape, device="meta"), torch.rand(2, 1, 8, 9, device="meta"))
    # validate=True has no values to read either: nothing to check, no error
    meta = torch.rand(shape, device="meta")
    loss = bimi_kernels.BIMILoss(offsets=1, validate=True)(meta, meta, torch.rand(2, 1, 8, 9, device="meta"),
                                                           torch.ones(2, 1, 8, 9, device="meta"))
    assert loss.device.type == "meta"


@pytest.mark.parametrize("value,error,message", [
    ("bogus", ValueError, r"unknown backend 'bogus' \(from the environment variable BIMI_BACKEND"),
    ("cuda", RuntimeError, r"backend 'cuda' \(from the environment variable BIMI_BACKEND.*not available"),
])
def test_errors_name_bimi_backend_when_it_chose(fresh_dispatch, monkeypatch, value, error, message):
    """A backend chosen by BIMI_BACKEND (not by the caller) says so when it cannot serve."""
    if value == "cuda" and torch.cuda.is_available():
        pytest.skip("cuda is available here")
    monkeypatch.setenv("BIMI_BACKEND", value)
    p1, p2 = random_maps((1, 3, 6, 7), dtype=torch.float32)
    with pytest.raises(error, match=message):
        bimi_kernels.BIMILoss(boundary_weight=0.0)(p1, p2)


def test_a_missing_extension_and_one_that_does_not_load_are_told_apart(monkeypatch):
    """Not built (no module file) and built against another torch (an undefined symbol when
    loading) are different fixes for the user to see."""
    from bimi_kernels import native

    assert native._import_error("bimi_kernels._no_such_extension").startswith("bimi_kernels._no_such_extension was not built;")

    def undefined_symbol(name):
        raise ImportError(f"{name}.so: undefined symbol: _ZN2at4_ops")

    monkeypatch.setattr(native.importlib, "import_module", undefined_symbol)
    reason = native._import_error("bimi_kernels._C")
    assert reason.startswith("bimi_kernels._C was built but does not load: ImportError") and "undefined symbol" in reason
