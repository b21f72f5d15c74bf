"""Few-label fine-tuning and evaluation: does the pre-training help when only 1, 2 or 4 slices
are labelled?

For a seed and a label count n, n slices are drawn from the fine-tune block (the same slices for
every setting, so settings are compared on equal terms); the U-Net (pre-trained or random) plus a
fresh 1x1 segmentation head are trained with cross-entropy on them (random affine + flip +
intensity jitter each step), then scored by Dice per class on the test block, and, as the number
to diagnose with, on the fine-tune block's unlabelled slices.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from ..views import TwoViewTransform, warp
from .data import CLASS_NAMES
from .pretrain import ModelConfig
from .unet import Segmenter, UNet


@dataclass
class FinetuneConfig:
    steps: int = 60
    lr: float = 2e-3
    weight_decay: float = 1e-4


def choose_labelled(block_size: int, count: int, seed: int) -> List[int]:
    """`count` distinct slice indices of the fine-tune block, from the seed only."""
    generator = torch.Generator().manual_seed(10_000 + seed)
    return sorted(torch.randperm(block_size, generator=generator)[:count].tolist())


def dice_per_class(prediction: torch.Tensor, truth: torch.Tensor, classes: int) -> List[float]:
    """Dice of each class over all pixels of all slices (1.0 when a class is absent from both)."""
    scores = []
    for c in range(classes):
        p, t = prediction == c, truth == c
        total = int(p.sum()) + int(t.sum())
        scores.append(1.0 if total == 0 else 2 * int((p & t).sum()) / total)
    return scores


@torch.no_grad()
def predict(model: Segmenter, images: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    model.eval()
    return torch.cat([model(chunk).argmax(1).cpu() for chunk in images.split(batch_size)])


def finetune_and_evaluate(
    unet_state: Optional[dict],
    model_config: ModelConfig,
    config: FinetuneConfig,
    finetune_images: torch.Tensor,
    finetune_labels: torch.Tensor,
    test_images: Optional[torch.Tensor],
    test_labels: Optional[torch.Tensor],
    labelled: int,
    seed: int,
    device: torch.device,
) -> Dict:
    """Fine-tune on `labelled` slices of the fine-tune block; Dice per class on the test block
    (skipped when `test_images` is None) and on the fine-tune block's other slices.
    `unet_state` None means random initialisation."""
    classes = len(CLASS_NAMES)
    torch.manual_seed(20_000 + seed)  # the same random init / head init for every setting
    unet = UNet(finetune_images.shape[1], model_config.width, model_config.depth)
    if unet_state is not None:
        unet.load_state_dict(unet_state)
    model = Segmenter(unet, classes).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=config.steps, pct_start=0.2)

    chosen = choose_labelled(finetune_images.shape[0], labelled, seed)
    images = finetune_images[chosen].to(device)
    labels = finetune_labels[chosen].to(device)
    augment = TwoViewTransform()
    generator = torch.Generator().manual_seed(30_000 + seed)
    losses = []
    for _ in range(config.steps):
        model.train()
        params = augment.sample(images, generator)
        x = augment.jitter(warp(images, params.theta, mode="bilinear"), generator)
        # padding is background, which is what the warp fills the label map with (0)
        y = warp(labels[:, None], params.theta, mode="nearest")[:, 0]
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))

    held_out = [i for i in range(finetune_images.shape[0]) if i not in set(chosen)]
    result = {"labelled_slices": chosen, "final_loss": losses[-1], "loss_curve": losses}
    if test_images is not None:
        test_dice = dice_per_class(predict(model, test_images.to(device)), test_labels, classes)
        result["test_dice"] = test_dice
        result["test_mean_tissue_dice"] = sum(test_dice[1:]) / (classes - 1)
    if held_out:
        val_dice = dice_per_class(
            predict(model, finetune_images[held_out].to(device)), finetune_labels[held_out], classes
        )
        result["val_dice"] = val_dice
        result["val_mean_tissue_dice"] = sum(val_dice[1:]) / (classes - 1)
    return result
