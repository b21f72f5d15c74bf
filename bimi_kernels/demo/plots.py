"""Pictures of the demo (matplotlib, Agg backend: no display needed).

- `cluster_grid`: per epoch, one row per sample slice: the transformed image (view 2), its edge
  map, the cluster map of each view in view 2's frame (view 1's warped, padding greyed out),
  and the uncertainty (entropy) map of view 2's clusters;
- `loss_curves`: pre-training loss per step for each setting, and the cluster purity on the
  fine-tune block per epoch;
- `dice_bars`: the results table as bars.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def cluster_colours(clusters: int):
    """A ListedColormap of `clusters` visually distinct colours (tab20 / tab20b / tab20c, then hsv)."""
    import matplotlib
    from matplotlib.colors import ListedColormap

    tables = [matplotlib.colormaps[name].colors for name in ("tab20", "tab20b", "tab20c")]
    colours = [c for table in tables for c in table]
    if clusters > len(colours):
        hsv = matplotlib.colormaps["hsv"]
        colours = [hsv(i / clusters)[:3] for i in range(clusters)]
    return ListedColormap(colours[:clusters])


def cluster_grid(
    path: Path,
    title: str,
    image: np.ndarray,
    edge: np.ndarray,
    clusters_view1: np.ndarray,
    clusters_view2: np.ndarray,
    uncertainty: np.ndarray,
    valid: np.ndarray,
    clusters: int,
) -> None:
    """All arrays (N, H, W); cluster maps hold cluster indices; `valid` is the warp mask."""
    plt = _pyplot()
    colours = cluster_colours(clusters)
    rows = image.shape[0]
    columns = ["view 2 image", "edge map", "clusters, view 1 (warped)", "clusters, view 2", "uncertainty, view 2"]
    figure, axes = plt.subplots(rows, len(columns), figsize=(2.4 * len(columns), 2.4 * rows + 0.5), squeeze=False)
    for r in range(rows):
        masked_view1 = np.ma.masked_where(valid[r] < 0.5, clusters_view1[r])
        panels = [
            (image[r], dict(cmap="gray")),
            (edge[r], dict(cmap="magma", vmin=0, vmax=1)),
            (masked_view1, dict(cmap=colours, vmin=-0.5, vmax=clusters - 0.5, interpolation="nearest")),
            (clusters_view2[r], dict(cmap=colours, vmin=-0.5, vmax=clusters - 0.5, interpolation="nearest")),
            (uncertainty[r], dict(cmap="viridis", vmin=0, vmax=np.log(clusters))),
        ]
        for c, (data, style) in enumerate(panels):
            axis = axes[r, c]
            axis.set_facecolor("white")  # the warp padding; no cluster colour is white
            axis.imshow(data, **style)
            axis.set_xticks([])
            axis.set_yticks([])
            if r == 0:
                axis.set_title(columns[c], fontsize=9)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def loss_curves(path: Path, histories: Dict[str, dict], titles: Dict[str, str]) -> None:
    """Pre-training loss per step (one panel per setting: the losses have different scales) and
    cluster purity on the fine-tune block per epoch (all settings in one panel)."""
    plt = _pyplot()
    names = list(histories)
    figure, axes = plt.subplots(1, len(names) + 1, figsize=(4 * (len(names) + 1), 3.4), squeeze=False)
    for axis, name in zip(axes[0], names):
        steps = histories[name]["step_loss"]
        axis.plot(np.arange(1, len(steps) + 1), steps, lw=0.8, alpha=0.5, label="step")
        epochs = histories[name]["epoch_loss"]
        if epochs:
            per_epoch = len(steps) / len(epochs)
            axis.plot(per_epoch * np.arange(1, len(epochs) + 1), epochs, "o-", label="epoch mean")
        axis.set_title(titles.get(name, name), fontsize=9)
        axis.set_xlabel("step")
        axis.set_ylabel("loss (heads averaged)")
        axis.legend(fontsize=8)
    purity_axis = axes[0, -1]
    for name in names:
        purity = histories[name].get("epoch_purity") or []
        if purity:
            purity_axis.plot(np.arange(1, len(purity) + 1), purity, "o-", label=name)
    purity_axis.set_title("cluster purity, fine-tune block (head 0)", fontsize=9)
    purity_axis.set_xlabel("epoch")
    purity_axis.set_ylabel("pixel accuracy, majority label per cluster")
    purity_axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def dice_bars(path: Path, table: Dict[str, Dict[int, Sequence[float]]], titles: Dict[str, str],
              scored_on: str = "test Dice") -> None:
    """table[setting][labelled] = list of mean tissue Dice over seeds."""
    plt = _pyplot()
    settings = list(table)
    counts: List[int] = sorted({n for s in settings for n in table[s]})
    width = 0.8 / len(settings)
    figure, axis = plt.subplots(figsize=(1.8 + 1.6 * len(counts), 3.6))
    for i, setting in enumerate(settings):
        means = [np.mean(table[setting][n]) for n in counts]
        spreads = [np.std(table[setting][n]) for n in counts]
        axis.bar(np.arange(len(counts)) + (i - (len(settings) - 1) / 2) * width, means, width, yerr=spreads,
                 capsize=3, label=titles.get(setting, setting))
    axis.set_xticks(np.arange(len(counts)))
    axis.set_xticklabels([f"{n} labelled slice{'s' if n > 1 else ''}" for n in counts])
    axis.set_ylabel(f"{scored_on}\nmean of GM / WM / other")
    axis.set_ylim(0, 1)
    axis.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
