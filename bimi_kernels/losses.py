"""Drop-in torch.nn modules: each holds one checked `LossConfig` and calls `functional`.

Settings read and write as attributes (`loss_fn.alpha`, `loss_fn.alpha = 0.3`); a write replaces
the frozen config with a checked copy, so a module never holds an unchecked setting.
"""
from __future__ import annotations

import inspect
import warnings
from typing import Optional

import torch
from torch import nn

from . import functional
from .checks import stacklevel_outside_package
from .config import FIELD_NAMES, LossConfig
from .offsets import OffsetSpec


class _ConfiguredLoss(nn.Module):
    """Settings live in `self.config`; the module's own settings are exposed as attributes."""

    SETTINGS: tuple = ()  # the config fields this module takes: its constructor's keywords

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__module__ != __name__:
            return  # a user's subclass keeps its base's settings, whatever its constructor takes
        cls.SETTINGS = tuple(name for name in inspect.signature(cls.__init__).parameters if name != "self")
        unknown = set(cls.SETTINGS) - set(FIELD_NAMES)
        if unknown:
            raise TypeError(f"{cls.__name__}: constructor keywords that are not LossConfig fields: {sorted(unknown)}")

    def __init__(self, config: LossConfig):
        super().__init__()
        object.__setattr__(self, "config", config)

    def __getattr__(self, name):
        if name in self.SETTINGS and "config" in self.__dict__:  # (not yet set: AttributeError below)
            return getattr(self.__dict__["config"], name)
        if name in FIELD_NAMES:
            raise self._not_a_setting(name)
        return super().__getattr__(name)

    def __setattr__(self, name, value):
        if name in self.SETTINGS:
            object.__setattr__(self, "config", self.config.replace(**{name: value}))
        elif name in FIELD_NAMES:
            raise self._not_a_setting(name)
        elif name == "config":
            if not isinstance(value, LossConfig):
                raise TypeError(f"config: expected a LossConfig, got {type(value).__name__}")
            object.__setattr__(self, "config", value)
        else:
            super().__setattr__(name, value)

    def _not_a_setting(self, name: str) -> AttributeError:
        # a loss setting this module does not take: setting it would change nothing
        return AttributeError(
            f"{type(self).__name__} has no setting {name!r} (its settings: {', '.join(self.SETTINGS)})"
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={getattr(self.config, name)!r}" for name in self.SETTINGS if name != "process_group")


class RegularizedMILoss(_ConfiguredLoss):
    """The regularised mutual information L_MI of docs/contract.md §4.

    forward(p1, p2, *, mask=None): p1, p2 (B, K, H, W) or (B, K, D, H, W) cluster probabilities
    of two aligned views; mask (B, 1, *S) or (B, *S), by keyword: BIMILoss's third argument is
    the image, so a mask passed third by position is ambiguous. It is still taken as the mask in
    this release, with a FutureWarning, and will be a TypeError in the next.
    Settings: the constructor's keywords, also attributes; `help(bimi_kernels.LossConfig)`.

    Example::

        >>> loss_fn = RegularizedMILoss(offsets=1, alpha=0.5)
        >>> loss = loss_fn(p1, p2)
    """

    def __init__(
        self,
        offsets: OffsetSpec = 0,
        dilation: int = 1,
        alpha: float = 0.5,
        lamda: float = 1.0,
        symmetric: bool = True,
        backend: str = "auto",
        sync: bool = False,
        process_group=None,
        validate: Optional[bool] = None,
        pool_offsets: bool = False,
        eps_convention: str = "add",
    ):
        super().__init__(LossConfig.of(locals(), boundary_weight=0.0))

    def forward(self, p1: torch.Tensor, p2: torch.Tensor, *positional_mask: torch.Tensor,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if positional_mask:
            if len(positional_mask) > 1 or mask is not None:
                raise TypeError("RegularizedMILoss.forward(p1, p2, *, mask=None): takes p1, p2 and the mask "
                                f"by keyword; got {2 + len(positional_mask)} positional arguments"
                                + (" and a mask= keyword" if mask is not None else ""))
            # FutureWarning, shown by default (a DeprecationWarning is hidden outside __main__): an
            # image passed here as to BIMILoss would otherwise be taken for a mask without a word
            warnings.warn("RegularizedMILoss: pass the mask by keyword (mask=...); a third positional argument "
                          "is deprecated and will be a TypeError in the next release (BIMILoss's third argument "
                          "is the image, so a positional one is ambiguous)", FutureWarning,
                          stacklevel=stacklevel_outside_package())
            mask = positional_mask[0]
        return functional.regularized_mi_from_config(p1, p2, mask, self.config)


class BoundaryCCLoss(_ConfiguredLoss):
    """The boundary-aware cross-correlation L_CC of docs/contract.md §5.

    forward(p1, p2, image): cluster maps (B, K, *S) and the image (B, C, *S') in the maps' frame
    (resized to S if needed). Returns a 0-dim tensor (negative: better when lower).
    Settings: the constructor's keywords, also attributes; `help(bimi_kernels.LossConfig)`.

    Example::

        >>> loss = BoundaryCCLoss(window=5)(p1, p2, image)
    """

    def __init__(self, window: int = 5, gamma: float = 0.75, backend: str = "auto", validate: Optional[bool] = None):
        super().__init__(LossConfig.of(locals(), mi_weight=0.0))

    def forward(self, p1: torch.Tensor, p2: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        return functional.boundary_cc_loss_from_config(p1, p2, image, self.config)


class BIMILoss(_ConfiguredLoss):
    """The boundary-aware information-maximisation loss (docs/contract.md §6):

        L = mi_weight * L_MI(p1, p2) + boundary_weight * L_CC(p1, p2, image)

    forward(p1, p2, image=None, mask=None):
      p1, p2: (B, K, H, W) or (B, K, D, H, W) softmax outputs of two aligned views
              (p2 from the transformed image, p1 the transformed prediction of the original);
      image:  (B, C, *S') the transformed image, required when boundary_weight > 0;
      mask:   (B, 1, *S) or (B, *S), 1 where both views have a valid pixel.
    Returns a 0-dim float32 tensor (float64 for float64 maps).

    Settings: the constructor's keywords, each also an attribute (`loss_fn.alpha = 0.3` is
    checked); `help(bimi_kernels.LossConfig)` says what each one does.

    Example::

        >>> loss_fn = BIMILoss()                      # the authors' setting: offset 0, alpha 0.5
        >>> loss = loss_fn(p1, p2, image, mask)
        >>> loss.backward()
    """

    def __init__(
        self,
        offsets: OffsetSpec = 0,
        dilation: int = 1,
        alpha: float = 0.5,
        lamda: float = 1.0,
        mi_weight: float = 1.0,
        boundary_weight: float = 1.0,
        window: int = 5,
        gamma: float = 0.75,
        symmetric: bool = True,
        backend: str = "auto",
        sync: bool = False,
        process_group=None,
        validate: Optional[bool] = None,
        pool_offsets: bool = False,
        eps_convention: str = "add",
    ):
        super().__init__(LossConfig.of(locals()))

    def forward(
        self,
        p1: torch.Tensor,
        p2: torch.Tensor,
        image: Optional[torch.Tensor] = None,
        mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        return functional.bimi_loss_from_config(p1, p2, image, mask, self.config)
