"""Why does pre-training not beat random initialisation here? Diagnostics on the pre-train and
fine-tune blocks only (the test block is never loaded into a score).

1. Intensity alone: a lookup table from T1 intensity (64 bins) to the majority label of the
   labelled slices, scored on the fine-tune block's unlabelled slices: how much of the task is
   plain intensity thresholding.
2. Linear probe: the U-Net frozen (pre-trained from a demo checkpoint, or random), only a 1x1
   head trained on the labelled slices' features (cross-entropy, 300 Adam steps): does the
   pre-trained representation carry more tissue information than a random one?

Usage: python results/demo/diagnose.py CHECKPOINT_DIR [--resolution 64]
(CHECKPOINT_DIR holds the demo's pretrain_<setting>.pt files.)
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from bimi_kernels.demo.data import load_brain_slices
from bimi_kernels.demo.finetune import choose_labelled, dice_per_class
from bimi_kernels.demo.unet import UNet


def mean_tissue_dice(prediction, truth):
    return sum(dice_per_class(prediction, truth, 4)[1:]) / 3


def intensity_lookup(images, labels, held_images, bins=64):
    index = (images.clamp(0, 1) * (bins - 1)).round().long().flatten()
    counts = torch.zeros(bins, 4).index_put_((index, labels.flatten()), torch.ones(index.numel()), accumulate=True)
    table = counts.argmax(1)
    return table[(held_images.clamp(0, 1) * (bins - 1)).round().long()][:, 0]


def linear_probe(features, labels, held_features, seed=0):
    """Multinomial logistic regression per pixel (a 1x1 conv), fitted with L-BFGS."""
    torch.manual_seed(seed)
    head = torch.nn.Conv2d(features.shape[1], 4, 1)
    optimizer = torch.optim.LBFGS(head.parameters(), lr=1, max_iter=60, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(head(features), labels) + 1e-4 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return head(held_features).argmax(1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint_dir", type=Path)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args(argv)
    data = load_brain_slices(args.resolution)
    block = data.finetune
    encoders = {}
    for path in sorted(args.checkpoint_dir.glob("pretrain_*.pt")):
        state = torch.load(path, map_location="cpu", weights_only=False)
        config = state["model_config"]
        unet = UNet(1, config["width"], config["depth"])
        unet.load_state_dict(state["unet"])
        encoders[state["setting"]] = unet
        torch.manual_seed(20_000)
        encoders.setdefault("random", UNet(1, config["width"], config["depth"]))
    features = {}
    with torch.no_grad():
        for name, unet in encoders.items():
            unet.eval()
            features[name] = unet.features(block.images)
    rows = {}
    for labelled in (1, 2, 4):
        for seed in range(args.seeds):
            chosen = choose_labelled(len(block), labelled, seed)
            held = [i for i in range(len(block)) if i not in chosen]
            truth = block.labels[held]
            guess = intensity_lookup(block.images[chosen], block.labels[chosen], block.images[held])
            rows.setdefault(("intensity lookup", labelled), []).append(mean_tissue_dice(guess, truth))
            for name, feats in features.items():
                guess = linear_probe(feats[chosen], block.labels[chosen], feats[held], seed=seed)
                rows.setdefault((f"linear probe, {name} U-Net (frozen)", labelled), []).append(mean_tissue_dice(guess, truth))
    names = list(dict.fromkeys(name for name, _ in rows))
    print("| fine-tune block, unlabelled slices: mean tissue Dice | 1 labelled | 2 labelled | 4 labelled |")
    print("|---|---|---|---|")
    for name in names:
        cells = []
        for labelled in (1, 2, 4):
            values = rows[(name, labelled)]
            cells.append(f"{statistics.fmean(values):.3f} ± {statistics.pstdev(values):.3f}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    with open(args.checkpoint_dir / "diagnose.json", "w") as handle:
        json.dump({f"{n} | {k}": v for (n, k), v in rows.items()}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
