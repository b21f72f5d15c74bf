"""Reference rows for the demo's tables, fitted on the labelled slices only:

- `intensity_lookup`: a table from image intensity (64 bins) to the labelled slices' majority
  class per bin: how much of the task is plain intensity thresholding;
- `linear_probe`: the U-Net frozen (pre-trained, or random), only a 1x1 head fitted on the
  labelled slices' decoder features (multinomial logistic regression, L-BFGS): how much the
  representation alone carries, before any fine-tuning;
- the lobes task's left-right mirror of the atlas labels is computed with the data
  (`TaskData.mirror_test`).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .unet import UNet


def intensity_lookup(images: torch.Tensor, labels: torch.Tensor, classes: int, new_images: torch.Tensor,
                     bins: int = 64) -> torch.Tensor:
    """Fit on (images (N, 1, H, W) in [0, 1], labels (N, H, W)); predict (M, H, W) labels for
    `new_images`. A bin no labelled pixel fell into predicts class 0."""
    index = (images.clamp(0, 1) * (bins - 1)).round().long().flatten()
    counts = torch.zeros(bins, classes).index_put_((index, labels.flatten()), torch.ones(index.numel()), accumulate=True)
    table = counts.argmax(1)
    return table[(new_images.clamp(0, 1) * (bins - 1)).round().long()][:, 0]


@torch.no_grad()
def frozen_features(unet: UNet, images: torch.Tensor, device, batch_size: int = 16) -> torch.Tensor:
    unet.eval()
    return torch.cat([unet.features(chunk.to(device)).cpu() for chunk in images.split(batch_size)])


def linear_probe(features: torch.Tensor, labels: torch.Tensor, classes: int, new_features: torch.Tensor,
                 seed: int = 0, weight_decay: float = 1e-4, iterations: int = 60) -> torch.Tensor:
    """A 1x1 convolution fitted by L-BFGS on `features` (N, F, H, W) -> `labels` (N, H, W), with
    a small L2 penalty; returns the (M, H, W) prediction for `new_features`."""
    generator = torch.Generator().manual_seed(seed)
    head = torch.nn.Conv2d(features.shape[1], classes, 1)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * 0.01)
        head.bias.zero_()
    optimizer = torch.optim.LBFGS(head.parameters(), lr=1, max_iter=iterations, history_size=20,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(head(features), labels) + weight_decay * head.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return torch.cat([head(chunk).argmax(1) for chunk in new_features.split(16)])


def random_unet(in_channels: int, width: int, depth: int, seed: int, state: Optional[dict] = None) -> UNet:
    """The U-Net that fine-tuning with this seed starts from (random init), or `state` loaded."""
    torch.manual_seed(20_000 + seed)
    unet = UNet(in_channels, width, depth)
    if state is not None:
        unet.load_state_dict(state)
    return unet
