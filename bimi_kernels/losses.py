"""Drop-in torch.nn modules: thin wrappers that hold the settings and call `functional`."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import checks, functional
from .offsets import OffsetSpec


class RegularizedMILoss(nn.Module):
    """The regularised mutual information L_MI of SPEC §4.

    forward(p1, p2, mask=None): p1, p2 (B, K, H, W) or (B, K, D, H, W) cluster probabilities of
    two aligned views; mask (B, 1, *S) or (B, *S). Returns a 0-dim tensor.

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
    ):
        super().__init__()
        checks.check_mi_weights(alpha, lamda)
        checks.check_backend_name(backend)
        self.offsets, self.dilation, self.alpha, self.lamda = offsets, dilation, alpha, lamda
        self.symmetric, self.backend, self.validate = symmetric, backend, validate
        self.sync, self.process_group = sync, process_group

    def forward(self, p1: torch.Tensor, p2: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return functional.regularized_mi(
            p1, p2, self.offsets, self.dilation, self.alpha, self.lamda, self.symmetric, mask,
            self.backend, self.validate, self.sync, self.process_group,
        )

    def extra_repr(self) -> str:
        return (f"offsets={self.offsets!r}, dilation={self.dilation}, alpha={self.alpha}, "
                f"lamda={self.lamda}, symmetric={self.symmetric}, backend={self.backend!r}, sync={self.sync}")


class BoundaryCCLoss(nn.Module):
    """The boundary-aware cross-correlation L_CC of SPEC §5.

    forward(p1, p2, image): cluster maps (B, K, *S) and the image (B, C, *S') in the maps' frame
    (resized to S if needed). Returns a 0-dim tensor (negative: better when lower).

    Example::

        >>> loss = BoundaryCCLoss(window=5)(p1, p2, image)
    """

    def __init__(self, window: int = 5, gamma: float = 0.75, backend: str = "auto", validate: Optional[bool] = None):
        super().__init__()
        checks.check_window(window)
        checks.check_gamma(gamma)
        checks.check_backend_name(backend)
        self.window, self.gamma, self.backend, self.validate = window, gamma, backend, validate

    def forward(self, p1: torch.Tensor, p2: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        return functional.boundary_cc_loss(p1, p2, image, self.window, self.gamma, self.backend, self.validate)

    def extra_repr(self) -> str:
        return f"window={self.window}, gamma={self.gamma}, backend={self.backend!r}"


class BIMILoss(nn.Module):
    """The boundary-aware information-maximisation loss (SPEC §6):

        L = mi_weight * L_MI(p1, p2) + boundary_weight * L_CC(p1, p2, image)

    forward(p1, p2, image=None, mask=None):
      p1, p2: (B, K, H, W) or (B, K, D, H, W) softmax outputs of two aligned views
              (p2 from the transformed image, p1 the transformed prediction of the original);
      image:  (B, C, *S') the transformed image, required when boundary_weight > 0;
      mask:   (B, 1, *S) or (B, *S), 1 where both views have a valid pixel.
    Returns a 0-dim float32 tensor (float64 for float64 maps).

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
    ):
        super().__init__()
        checks.check_mi_weights(alpha, lamda)
        checks.check_loss_weights(mi_weight, boundary_weight)
        checks.check_window(window)
        checks.check_gamma(gamma)
        checks.check_backend_name(backend)
        self.offsets, self.dilation, self.alpha, self.lamda = offsets, dilation, alpha, lamda
        self.mi_weight, self.boundary_weight = mi_weight, boundary_weight
        self.window, self.gamma, self.symmetric = window, gamma, symmetric
        self.backend, self.sync, self.process_group, self.validate = backend, sync, process_group, validate

    def forward(
        self,
        p1: torch.Tensor,
        p2: torch.Tensor,
        image: Optional[torch.Tensor] = None,
        mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        return functional.bimi_loss(
            p1, p2, image, mask,
            offsets=self.offsets, dilation=self.dilation, alpha=self.alpha, lamda=self.lamda,
            mi_weight=self.mi_weight, boundary_weight=self.boundary_weight, window=self.window,
            gamma=self.gamma, symmetric=self.symmetric, backend=self.backend,
            validate=self.validate, sync=self.sync, process_group=self.process_group,
        )

    def extra_repr(self) -> str:
        return (f"offsets={self.offsets!r}, dilation={self.dilation}, alpha={self.alpha}, lamda={self.lamda}, "
                f"mi_weight={self.mi_weight}, boundary_weight={self.boundary_weight}, window={self.window}, "
                f"gamma={self.gamma}, symmetric={self.symmetric}, backend={self.backend!r}, sync={self.sync}")
