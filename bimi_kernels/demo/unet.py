"""A small 2-D U-Net whose last decoder block feeds linear cluster heads (pre-training) or a
segmentation head (fine-tuning).

Shapes: input (B, C_in, H, W) with H and W divisible by 2**(depth - 1); `features` returns the
last decoder block's output (B, width, H, W); each cluster head is a 1x1 convolution to K
channels followed by a softmax over them, as in the BIMI paper (3 heads on the last block).
"""
from __future__ import annotations

from typing import List

import torch
from torch import nn


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    # GroupNorm, not BatchNorm: fine-tuning sees batches of a single labelled slice.
    groups = min(8, out_channels)
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.GroupNorm(groups, out_channels),
        nn.LeakyReLU(0.1, inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        nn.GroupNorm(groups, out_channels),
        nn.LeakyReLU(0.1, inplace=True),
    )


class UNet(nn.Module):
    """Encoder-decoder with skip connections; `width` channels at full resolution, doubling at
    each of the `depth - 1` downsamplings."""

    def __init__(self, in_channels: int = 1, width: int = 16, depth: int = 4):
        super().__init__()
        if depth < 2:
            raise ValueError(f"depth: expected >= 2, got {depth}")
        channels = [width * 2**level for level in range(depth)]
        self.depth = depth
        self.width = width
        self.encoders = nn.ModuleList()
        previous = in_channels
        for c in channels:
            self.encoders.append(_conv_block(previous, c))
            previous = c
        self.pool = nn.MaxPool2d(2)
        self.upsamplers = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for c in reversed(channels[:-1]):
            self.upsamplers.append(nn.ConvTranspose2d(previous, c, 2, stride=2))
            self.decoders.append(_conv_block(2 * c, c))
            previous = c

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The last decoder block's output, (B, width, H, W)."""
        factor = 2 ** (self.depth - 1)
        if x.shape[-1] % factor or x.shape[-2] % factor:
            raise ValueError(f"x: H and W must be divisible by {factor}, got {tuple(x.shape[-2:])}")
        skips: List[torch.Tensor] = []
        for level, encoder in enumerate(self.encoders):
            x = encoder(x if level == 0 else self.pool(x))
            skips.append(x)
        for upsample, decoder, skip in zip(self.upsamplers, self.decoders, reversed(skips[:-1])):
            x = decoder(torch.cat([upsample(x), skip], dim=1))
        return x

    forward = features


class ClusterHeads(nn.Module):
    """`heads` independent 1x1 convolutions from the features to K clusters, softmax over K."""

    def __init__(self, in_channels: int, clusters: int, heads: int = 3):
        super().__init__()
        self.heads = nn.ModuleList(nn.Conv2d(in_channels, clusters, 1) for _ in range(heads))

    def forward(self, features: torch.Tensor) -> List[torch.Tensor]:
        """A list of `heads` probability maps (B, K, H, W)."""
        return [head(features).softmax(dim=1) for head in self.heads]


class Segmenter(nn.Module):
    """The U-Net with a 1x1 segmentation head (logits over the classes) for fine-tuning."""

    def __init__(self, unet: UNet, classes: int):
        super().__init__()
        self.unet = unet
        self.head = nn.Conv2d(unet.width, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.unet.features(x))
