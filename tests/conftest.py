"""Shared test set-up. Triton runs on CPU tensors only through its interpreter, which must be
switched on before triton is imported anywhere, so it is decided here, first."""
import os

if not os.path.exists("/dev/nvidiactl"):  # no GPU: run Triton kernels in the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The test tensors are tiny: a second OpenMP thread only adds barriers, which stall badly on a
# shared 2-core machine (several times slower). Tests of thread-count independence set it explicitly.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import signal  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# The conformance suite's case table and checks (tests/backends/cases.py) are imported as `cases`
# also by the per-backend files, which reuse them for what is specific to one backend.
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "backends"))

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# A run stopped at a time limit with SIGINT (scripts/gpu_check.sh) should end with pytest's
# summary and XML; Python turns SIGINT into KeyboardInterrupt only when it was not ignored at
# start-up, which it is for a background job of a non-interactive shell.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile("dev", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def _interpret_min_max_as_a_gpu() -> None:
    """Triton's tl.minimum/tl.maximum (and tl.min/tl.max) without propagate_nan return the
    operand that is not NaN on a GPU, but the interpreter computes them with np.minimum/np.maximum,
    which return the NaN: make the interpreter behave like the GPU, so that the tests see the
    NaN handling the compiled kernels have."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        import numpy as np
        from triton.runtime.interpreter import InterpreterBuilder
    except ImportError:  # no triton: nothing to interpret
        return
    InterpreterBuilder.create_minnumf = lambda self, lhs, rhs: self.binary_op(lhs, rhs, np.fmin)
    InterpreterBuilder.create_maxnumf = lambda self, lhs, rhs: self.binary_op(lhs, rhs, np.fmax)


_interpret_min_max_as_a_gpu()


from helpers import random_maps  # noqa: E402


@pytest.fixture
def maps_2d():
    return random_maps((2, 4, 9, 11))


@pytest.fixture
def maps_3d():
    return random_maps((2, 3, 5, 6, 7))
