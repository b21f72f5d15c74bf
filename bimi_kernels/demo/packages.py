"""The demo's third-party packages, checked before anything imports them.

Nothing here imports numpy or the other extras, so `bimi demo` can name every missing package
at once, with the command that installs them, instead of stopping at the first import.
"""
from __future__ import annotations

import importlib.util
from typing import Sequence

DEMO_PACKAGES = ("numpy", "nibabel", "nilearn", "matplotlib", "tqdm")
INSTALL_HINT = ("pip install " + " ".join(DEMO_PACKAGES)
                + "   (the demo extras; in a source tree: pip install --no-build-isolation '.[demo]')")


class MissingDemoData(RuntimeError):
    """A package or data file the demo needs is not installed; the message says how to get it."""


def missing_packages(names: Sequence[str] = DEMO_PACKAGES) -> list:
    return [name for name in names if importlib.util.find_spec(name) is None]


def check_packages(names: Sequence[str] = DEMO_PACKAGES) -> None:
    """Raise MissingDemoData naming every missing package at once, with the install command."""
    missing = missing_packages(names)
    if missing:
        raise MissingDemoData(
            f"the demo needs {', '.join(missing)} ({'is' if len(missing) == 1 else 'are'} not installed). "
            f"Install the demo extras:\n    {INSTALL_HINT}"
        )
