"""The `backend` fixture: every (backend, device) pair this machine can run, each test skipped
with the backend's own reason where it cannot. A new backend registered in
`bimi_kernels.backends` gets the whole suite."""
from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

from bimi_kernels import backends


@dataclass(frozen=True)
class BackendUnderTest:
    name: str
    device: str

    @property
    def kernels(self) -> backends.Backend:
        return backends.get(self.name)

    @property
    def interpreted(self) -> bool:
        """Triton kernels on CPU tensors run in Triton's interpreter: slow, so big cases skip."""
        return self.name == "triton" and self.device == "cpu"

    def skip_if_too_slow(self, case) -> None:
        if self.interpreted and not case.interpreter:
            pytest.skip("too slow for Triton's CPU interpreter; runs compiled on a GPU")

    def __str__(self) -> str:
        return f"{self.name}-{self.device}"


def _devices() -> tuple:
    """cpu, and cuda where a device is visible; BIMI_TEST_DEVICES=cuda (a comma-separated list)
    keeps only those, so that a short GPU session does not repeat what CPU-only CI covers."""
    devices = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
    wanted = [d.strip() for d in os.environ.get("BIMI_TEST_DEVICES", "").split(",") if d.strip()]
    unknown = sorted(set(wanted) - {"cpu", "cuda"})
    if unknown:
        raise pytest.UsageError(f"BIMI_TEST_DEVICES: expected cpu and/or cuda, got {unknown}")
    return tuple(d for d in devices if d in wanted) if wanted else devices


DEVICES = _devices()
PAIRS = [BackendUnderTest(name, device) for name in backends.BACKEND_NAMES for device in DEVICES]


@pytest.fixture(params=PAIRS, ids=[str(pair) for pair in PAIRS])
def backend(request) -> BackendUnderTest:
    pair = request.param
    reason = backends.unavailable_reason(pair.name, pair.device)
    if reason is not None:
        pytest.skip(f"{pair.name} unavailable for {pair.device} tensors: {reason}")
    return pair
