"""The loss settings, defined once: a frozen, checked object shared by the modules and the
functional API (docs/contract.md §6, §7).

A new setting is one field here (its default, and its check in `LossConfig.__post_init__`),
plus the keyword in the public signatures that take it (docs/architecture.md, "Adding things";
tests/test_losses.py checks those signatures against this class).
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import torch

from . import checks
from .offsets import OffsetSpec, canonical_offset_spec

EPS_CONVENTIONS = ("add", "clamp")


@dataclass(frozen=True)
class LossConfig:
    """Every setting of the BIMI loss (docs/contract.md §3-§7), checked when made.

    offsets, dilation    the neighbour offsets: a window radius (times dilation) or n-tuples (§2)
    alpha, lamda         the regularised MI's weights (§4)
    pool_offsets         sum the counts over the offsets before one MI (IIC collapsed) (§4)
    eps_convention       "add" (eps inside the logs) or "clamp" (IIC's clamp at 2.2e-16) (§4)
    symmetric            symmetrise each joint distribution (§4)
    mi_weight, boundary_weight   the two terms' weights (§6)
    window, gamma        the boundary term's box window and edge-map exponent (§5)
    backend              "auto" or a backend name (§7)
    sync, process_group  all-reduce the counts over a process group (§4)
    validate             value checks: None (default: BIMI_VALIDATE if set, else a sample of
                         pixels of CPU tensors), True (every value), False (none) (§9)
    """

    offsets: OffsetSpec = 0
    dilation: int = 1
    alpha: float = 0.5
    lamda: float = 1.0
    mi_weight: float = 1.0
    boundary_weight: float = 1.0
    window: int = 5
    gamma: float = 0.75
    symmetric: bool = True
    backend: str = "auto"
    sync: bool = False
    process_group: Any = None
    validate: Optional[bool] = None
    pool_offsets: bool = False
    eps_convention: str = "add"

    def __post_init__(self):
        # an explicit offset list becomes a tuple of tuples: hashable, and safe from later edits
        object.__setattr__(self, "offsets", canonical_offset_spec(self.offsets))
        checks.check_int("dilation", self.dilation, minimum=1)
        checks.check_number("alpha", self.alpha, minimum=0.0, maximum=1.0)
        checks.check_number("lamda", self.lamda, above=0.0)
        checks.check_number("mi_weight", self.mi_weight, minimum=0.0)
        checks.check_number("boundary_weight", self.boundary_weight, minimum=0.0)
        checks.check_window(self.window)
        if self.window == 1 and self.boundary_weight != 0 and not torch.compiler.is_compiling():
            warnings.warn(
                "window=1: a box of one pixel has no variance, so every window's correlation is "
                "clamped and the boundary term is the constant -1 with no gradient "
                "(docs/contract.md §5); use window >= 3, or boundary_weight=0", UserWarning,
                stacklevel=checks.stacklevel_outside_package())
        checks.check_number("gamma", self.gamma, above=0.0)
        for name in ("symmetric", "sync", "pool_offsets"):
            checks.check_bool(name, getattr(self, name))
        checks.check_backend_name(self.backend)
        checks.check_process_group(self.process_group)
        if self.validate is not None:
            checks.check_bool("validate", self.validate)
        if self.eps_convention not in EPS_CONVENTIONS:
            raise ValueError(f"eps_convention: expected one of {EPS_CONVENTIONS}, got {self.eps_convention!r}")
        # other number types (Fraction, numpy scalars) as Python numbers: a Fraction cannot
        # multiply a tensor; symbolic numbers (torch.compile) stay as they are
        for name in _FLOAT_FIELDS:
            value = getattr(self, name)
            if type(value) not in (float, int) and not isinstance(value, torch.SymFloat):
                object.__setattr__(self, name, float(value))
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if type(value) is not int and not isinstance(value, torch.SymInt):
                object.__setattr__(self, name, int(value))
        for name in ("symmetric", "sync", "pool_offsets", "validate"):
            value = getattr(self, name)
            if value is not None and type(value) is not bool:  # numpy's bool
                object.__setattr__(self, name, bool(value))

    @classmethod
    def of(cls, namespace: dict, **overrides) -> "LossConfig":
        """The config of the settings found in `namespace` (a constructor's or function's
        `locals()`: its other names are ignored), with `overrides` applied. The public
        signatures list their settings once, for the reader; this passes them on."""
        settings = {name: value for name, value in namespace.items() if name in FIELD_NAMES}
        settings.update(overrides)
        return cls(**settings)

    def replace(self, **changes) -> "LossConfig":
        """A copy with `changes` applied, checked like a new config."""
        return dataclasses.replace(self, **changes)

    # Every field is immutable once made (offsets become a tuple), so a copy is the config
    # itself: copying a module (an EMA or teacher copy of a model holding the loss) shares its
    # process group, which cannot be copied.
    def __copy__(self) -> "LossConfig":
        return self

    def __deepcopy__(self, memo) -> "LossConfig":
        return self

    def __getstate__(self) -> dict:
        if self.process_group is not None:
            raise TypeError(
                "LossConfig: a config holding a process_group cannot be pickled (a process group "
                "belongs to the process that made it); pickle the loss with process_group=None "
                "and set `loss.process_group` after loading")
        return dict(self.__dict__)


FIELD_NAMES = frozenset(field.name for field in dataclasses.fields(LossConfig))
_FLOAT_FIELDS = ("alpha", "lamda", "mi_weight", "boundary_weight", "gamma")
_INT_FIELDS = ("dilation", "window")
