"""bimi_kernels: fused kernels for the boundary-aware information-maximisation (BIMI) loss.

Public API: the modules `BIMILoss`, `RegularizedMILoss`, `BoundaryCCLoss`; `functional`
(the same losses as functions, and their pieces); `LossConfig` (every setting, checked);
`reference` (the plain-PyTorch ground truth);
`available_backends()`; `views` (seeded two-view transforms: `TwoViewTransform`, `TwoViews`).
"""
from . import functional, ops, reference, views  # noqa: F401  (ops registers the torch.library custom ops)
from .backends import available_backends
from .config import LossConfig
from .losses import BIMILoss, BoundaryCCLoss, RegularizedMILoss
from .offsets import make_offsets
from .views import TwoViews, TwoViewTransform

from ._version import __version__

__all__ = [
    "BIMILoss",
    "RegularizedMILoss",
    "BoundaryCCLoss",
    "LossConfig",
    "functional",
    "reference",
    "available_backends",
    "make_offsets",
    "views",
    "TwoViewTransform",
    "TwoViews",
    "__version__",
]
