"""Few-label fine-tuning with the authors' recipe, the checkpoint chosen on the validation
block, and the test block scored once at the end.

For a seed and a label count n, n slices of the fine-tune block are labelled (the same slices for
every setting, so settings are compared on equal terms; different seeds label different slices
while the block has room, `choose_labelled`). The U-Net (pre-trained or random) plus
a fresh 1x1 segmentation head are trained end to end, nothing frozen, one learning rate for
every layer, with cross-entropy on those n slices: RAdam, linear warm-up then cosine
(`training.warmup_cosine`), weight decay 1e-5, each step a random rotation (up to 30 degrees)
and shift (up to 0.06 of the image) of the slices and their labels (the authors' transform for
labelled images: rotate and crop, no flip, no intensity change).

Every `eval_every` steps the model is scored on the validation block; the scores form the
Dice-against-steps curve, the best one picks the checkpoint. Only when the run is over are the
test block's scores computed: for the chosen checkpoint, the last step, and each curve point
(from copies kept on the CPU) so the test curve can be drawn. Nothing in the run reads the test
block before its choice is made.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from ..views import random_affine_params, warp
from .pretrain import ModelConfig
from .training import warmup_cosine
from .unet import Segmenter, UNet

FINETUNE_ROTATION = 30.0  # degrees; the authors' RandomRotation(30) for labelled images
FINETUNE_SHIFT = 0.06  # of the image; their RandomCrop(224) of 256-pixel slices


@dataclass
class FinetuneConfig:
    steps: int = 300
    lr: float = 3e-4  # peak
    weight_decay: float = 1e-5
    warmup_fraction: float = 0.125
    eval_every: int = 25


def choose_labelled(block_size: int, count: int, seed: int) -> List[int]:
    """`count` distinct slice indices of the fine-tune block for one seed, as disjoint from the
    other seeds' as the block allows.

    The seeds deal in turn from a stream of fixed shuffles of the block (one shuffle, then another,
    and so on): seed s takes the next `count` slices after seeds 0 .. s-1 took theirs. A slice
    that is already in the hand being dealt is kept for the next hand. Seeds 0 .. S-1 therefore
    label different slices while S * count <= block_size, and beyond that every slice is used
    about equally often; two seeds can then get the same hand (not with the demo's blocks of 8
    and 17 slices, 1, 2 or 4 labels and up to 5 seeds, but for example seeds 1 and 3 with 4 of 7
    slices). Drawing each seed independently instead lets two seeds label the same slice even
    when the block has room for both, which understates the spread over the choice of slices."""
    if not 1 <= count <= block_size:
        raise ValueError(f"cannot label {count} of {block_size} slices")
    kept: List[int] = []
    rounds = 0
    stream: List[int] = []
    for _ in range(seed + 1):
        hand, pending, kept = [], kept, []
        while len(hand) < count:
            if not pending and not stream:
                generator = torch.Generator().manual_seed(10_000 + rounds)
                stream, rounds = torch.randperm(block_size, generator=generator).tolist(), rounds + 1
            item = pending.pop(0) if pending else stream.pop(0)
            (kept if item in hand else hand).append(item)
        kept = pending + kept
    return sorted(hand)


def dice_per_class(prediction: torch.Tensor, truth: torch.Tensor, classes: int) -> List[float]:
    """Dice of each class over all pixels of all slices (1.0 when a class is absent from both)."""
    scores = []
    for c in range(classes):
        p, t = prediction == c, truth == c
        total = int(p.sum()) + int(t.sum())
        scores.append(1.0 if total == 0 else 2 * int((p & t).sum()) / total)
    return scores


def mean_dice(per_class: Sequence[float], scored: Sequence[int]) -> float:
    return sum(per_class[c] for c in scored) / len(scored)


@torch.no_grad()
def predict(model: Segmenter, images: torch.Tensor, device, batch_size: int = 16) -> torch.Tensor:
    model.eval()
    return torch.cat([model(chunk.to(device)).argmax(1).cpu() for chunk in images.split(batch_size)])


def evaluation_steps(steps: int, every: int) -> List[int]:
    """The steps after which the validation block is scored: every `every`, and the last."""
    points = list(range(every, steps + 1, every)) if every > 0 else []
    if not points or points[-1] != steps:
        points.append(steps)
    return points


def validation_choice(steps: Sequence[int], scores: Sequence[float]) -> int:
    """Index of the checkpoint to keep: the best validation score, the earliest on a tie."""
    if not scores:
        raise ValueError("scores: expected at least one validation score")
    best = max(scores)
    return next(i for i, score in enumerate(scores) if score == best)


def finetune_and_evaluate(
    unet_state: Optional[dict],
    model_config: ModelConfig,
    config: FinetuneConfig,
    data,
    labelled: int,
    seed: int,
    device: torch.device,
    score_test: bool = True,
) -> Dict:
    """Fine-tune on `labelled` slices of `data.finetune` (a `TaskData`), choose the checkpoint on
    `data.validation`, then score `data.test` (unless `score_test` is False). `unet_state` None
    means random initialisation. Returns the labelled slices, the loss curve, the validation
    curve, the chosen step, and the test Dice (per class and the task's mean) at the chosen
    step, the last step and every curve point."""
    classes, scored = len(data.class_names), data.scored
    torch.manual_seed(20_000 + seed)  # the same random init / head init for every setting
    unet = UNet(data.finetune.images.shape[1], model_config.width, model_config.depth)
    if unet_state is not None:
        unet.load_state_dict(unet_state)
    model = Segmenter(unet, classes).to(device)
    optimizer = torch.optim.RAdam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = warmup_cosine(optimizer, config.steps, config.warmup_fraction)

    chosen = choose_labelled(len(data.finetune), labelled, seed)
    images = data.finetune.images[chosen].to(device)
    labels = data.finetune.labels[chosen].to(device)
    generator = torch.Generator().manual_seed(30_000 + seed)
    checkpoints = evaluation_steps(config.steps, config.eval_every)
    # each step's loss stays on the device until the run is over: reading it every step would
    # make the host wait for the device every step
    losses = torch.empty(config.steps, dtype=torch.float64, device=device)
    validation_curve, snapshots = [], []
    for step in range(1, config.steps + 1):
        model.train()
        params = random_affine_params(len(chosen), images.shape[2:], max_rotation=FINETUNE_ROTATION,
                                      scale_range=(1.0, 1.0), max_translation=FINETUNE_SHIFT, flip_prob=0.0,
                                      generator=generator)  # drawn on the CPU: one copy, of theta
        theta = params.theta.to(device)
        x = warp(images, theta, mode="bilinear")
        # padding is background, which is what the warp fills the label map with (0)
        y = warp(labels[:, None], theta, mode="nearest")[:, 0]
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses[step - 1] = loss.detach()
        if step in checkpoints:
            per_class = dice_per_class(predict(model, data.validation.images, device), data.validation.labels, classes)
            validation_curve.append({"step": step, "dice": per_class, "mean": mean_dice(per_class, scored)})
            snapshots.append({k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()})
    losses = losses.tolist()
    best = validation_choice(checkpoints, [point["mean"] for point in validation_curve])
    result = {
        "labelled_slices": chosen,
        "final_loss": losses[-1],
        "loss_curve": losses,
        "validation_curve": validation_curve,
        "chosen_step": checkpoints[best],
        "validation_mean": validation_curve[best]["mean"],
    }
    if score_test:  # the run and its choice are over: now, and only now, the test block
        test_curve = []
        for state in snapshots:
            model.load_state_dict(state)
            per_class = dice_per_class(predict(model, data.test.images, device), data.test.labels, classes)
            test_curve.append({"step": None, "dice": per_class, "mean": mean_dice(per_class, scored)})
        for point, step in zip(test_curve, checkpoints):
            point["step"] = step
        result.update(test_curve=test_curve, test_dice=test_curve[best]["dice"], test_mean=test_curve[best]["mean"],
                      test_last_dice=test_curve[-1]["dice"], test_last_mean=test_curve[-1]["mean"])
    return result
