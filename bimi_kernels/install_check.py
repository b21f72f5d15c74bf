"""What the package says when it runs without its native kernels where they should exist.

An install can lack its compiled extension (a build that skipped it, or a library that no longer
loads after torch was upgraded). Asking for a missing backend by name already raises; this module
covers `backend="auto"`, which would otherwise run the plain-PyTorch reference several times
slower without a word. `backends.resolve` calls `warn_reference_fallback` when `auto` ends at the
reference although a native backend serves the device; the warning comes once per device type
and process, with the reason and the fix.
"""
from __future__ import annotations

import threading
import warnings
from typing import Dict, Optional

# How to build the extensions against the torch that is installed (see setup.py).
REBUILD_COMMAND = "pip install --no-build-isolation --no-deps -e ."  # from a source checkout
INSTALL_COMMAND = "pip install --no-build-isolation ."


class NativeBackendMissingWarning(UserWarning):
    """`backend="auto"` runs the reference because the native backends for the device are missing."""


_lock = threading.Lock()
_warned_device_types: set = set()


def reference_fallback_message(device_type: str, reasons: Dict[str, Optional[str]]) -> str:
    """The warning text: what runs instead, why each native backend is missing, the fix."""
    why = "; ".join(f"{name}: {reason}" for name, reason in reasons.items() if reason is not None)
    return (
        f"bimi_kernels: backend='auto' runs the plain-PyTorch 'reference' backend on {device_type} "
        f"tensors (several times slower) because no native backend is available there: {why}. "
        f"Fix: build the extension against the installed torch, `{INSTALL_COMMAND}` (in a source "
        f"checkout: `{REBUILD_COMMAND}`); `python -m bimi_kernels info` lists the backends. To run "
        f"the reference on purpose, pass backend='reference' or set BIMI_BACKEND=reference."
    )


def warn_reference_fallback(device_type: str, reasons: Dict[str, Optional[str]], stacklevel: int = 3) -> None:
    """Warn (once per device type and process) that `auto` fell back to the reference.

    `reasons` maps each native backend `auto` tried for this device to why it is unavailable.
    """
    with _lock:
        if device_type in _warned_device_types:
            return
        _warned_device_types.add(device_type)
    warnings.warn(reference_fallback_message(device_type, reasons), NativeBackendMissingWarning,
                  stacklevel=stacklevel)
