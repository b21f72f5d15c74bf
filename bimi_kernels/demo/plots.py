"""Pictures of the demo (matplotlib, Agg backend: no display needed).

- `cluster_grid`: one row per sample slice (taken from the fine-tune block, whose labels the
  protocol may use): the transformed image (view 2), its edge map, the ground-truth labels in
  view 2's frame, the cluster map of each view in view 2's frame (view 1's warped, padding
  greyed out), and the uncertainty (entropy) map of view 2's clusters with its colour bar;
- `loss_curves`: pre-training loss per step for each setting, and the cluster purity on the
  validation block per epoch;
- `dice_bars`: the test Dice at the validation-chosen checkpoint, bars with the seed spread;
- `finetune_curves`: validation and test Dice against fine-tuning steps, mean ± std over seeds.
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


def class_colours(classes: int):
    """Background black, then tab10 colours, for label maps."""
    import matplotlib
    from matplotlib.colors import ListedColormap

    return ListedColormap([(0, 0, 0)] + list(matplotlib.colormaps["tab10"].colors)[: classes - 1])


def cluster_grid(
    path: Path,
    title: str,
    image: np.ndarray,
    edge: np.ndarray,
    truth: np.ndarray,
    class_names: Sequence[str],
    clusters_view1: np.ndarray,
    clusters_view2: np.ndarray,
    uncertainty: np.ndarray,
    valid: np.ndarray,
    clusters: int,
) -> None:
    """All arrays (N, H, W); `truth` holds class indices, the cluster maps cluster indices;
    `valid` is the warp mask."""
    plt = _pyplot()
    colours = cluster_colours(clusters)
    labels_cmap = class_colours(len(class_names))
    rows = image.shape[0]
    columns = ["view 2 image", "edge map", "ground truth (labelled slices)", "clusters, view 1 (warped)",
               "clusters, view 2", "uncertainty, view 2"]
    figure, axes = plt.subplots(rows, len(columns), figsize=(2.3 * len(columns) + 0.6, 2.3 * rows + 1.1), squeeze=False)
    for r in range(rows):
        masked_view1 = np.ma.masked_where(valid[r] < 0.5, clusters_view1[r])
        panels = [
            (image[r], dict(cmap="gray")),
            (edge[r], dict(cmap="magma", vmin=0, vmax=1)),
            (truth[r], dict(cmap=labels_cmap, vmin=-0.5, vmax=len(class_names) - 0.5, interpolation="nearest")),
            (masked_view1, dict(cmap=colours, vmin=-0.5, vmax=clusters - 0.5, interpolation="nearest")),
            (clusters_view2[r], dict(cmap=colours, vmin=-0.5, vmax=clusters - 0.5, interpolation="nearest")),
            (uncertainty[r], dict(cmap="viridis", vmin=0, vmax=np.log(clusters))),
        ]
        for c, (data, style) in enumerate(panels):
            axis = axes[r, c]
            axis.set_facecolor("white")  # the warp padding; no cluster colour is white
            shown = axis.imshow(data, **style)
            axis.set_xticks([])
            axis.set_yticks([])
            if r == 0:
                axis.set_title(columns[c], fontsize=8)
            if c == len(panels) - 1:
                bar = figure.colorbar(shown, ax=axis, fraction=0.046, pad=0.04)
                bar.set_label("entropy (nats)", fontsize=7)
                bar.ax.tick_params(labelsize=6)
    from matplotlib.patches import Patch

    handles = [Patch(color=labels_cmap(i), label=name) for i, name in enumerate(class_names)]
    figure.legend(handles=handles, loc="lower center", ncol=min(len(class_names), 5), fontsize=7, frameon=False)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout(rect=(0, 0.06 if len(class_names) <= 5 else 0.09, 1, 1))
    figure.savefig(path, dpi=80)
    plt.close(figure)


def loss_curves(path: Path, histories: Dict[str, dict], titles: Dict[str, str]) -> None:
    """Pre-training loss per step (one panel per setting: the losses have different scales) and
    cluster purity on the validation block per epoch (all settings in one panel)."""
    plt = _pyplot()
    names = list(histories)
    figure, axes = plt.subplots(1, len(names) + 1, figsize=(4 * (len(names) + 1), 3.4), squeeze=False)
    for axis, name in zip(axes[0], names):
        steps = histories[name]["step_loss"]
        axis.plot(np.arange(1, len(steps) + 1), steps, lw=0.8, alpha=0.5, label="step")
        epochs = histories[name]["epoch_loss"]
        if epochs:
            per_epoch = len(steps) / len(epochs)
            axis.plot(per_epoch * np.arange(1, len(epochs) + 1), epochs, "o-", ms=3, label="epoch mean")
        axis.set_title(titles.get(name, name), fontsize=9)
        axis.set_xlabel("step")
        axis.set_ylabel("loss (heads averaged)")
        axis.legend(fontsize=8)
    purity_axis = axes[0, -1]
    for name in names:
        purity = histories[name].get("epoch_purity") or []
        if purity:
            purity_axis.plot(np.arange(1, len(purity) + 1), purity, "o-", ms=3, label=name)
    purity_axis.set_title("cluster purity, validation block (head 0)", fontsize=9)
    purity_axis.set_xlabel("epoch")
    purity_axis.set_ylabel("pixel accuracy, majority label per cluster")
    purity_axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def dice_bars(path: Path, table: Dict[str, Dict[int, Sequence[float]]], titles: Dict[str, str], ylabel: str) -> None:
    """table[row][labelled] = list of Dice over seeds; one group of bars per label count, the
    legend to the right of the axes."""
    plt = _pyplot()
    rows = list(table)
    counts: List[int] = sorted({n for s in rows for n in table[s]})
    width = 0.8 / len(rows)
    figure, axis = plt.subplots(figsize=(3.0 + 1.5 * len(counts) + 3.2, 3.6))
    for i, row in enumerate(rows):
        means = [np.mean(table[row][n]) if table[row].get(n) else np.nan for n in counts]
        spreads = [np.std(table[row][n]) if table[row].get(n) else 0 for n in counts]
        axis.bar(np.arange(len(counts)) + (i - (len(rows) - 1) / 2) * width, means, width, yerr=spreads,
                 capsize=3, label=titles.get(row, row))
    axis.set_xticks(np.arange(len(counts)))
    axis.set_xticklabels([f"{n} labelled slice{'s' if n > 1 else ''}" for n in counts])
    axis.set_ylabel(ylabel)
    axis.set_ylim(0, 1)
    axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    figure.tight_layout()
    figure.savefig(path, dpi=90, bbox_inches="tight")  # the legend sits outside the axes
    plt.close(figure)


def finetune_curves(path: Path, curves: Dict[str, Dict[int, Dict[str, np.ndarray]]], titles: Dict[str, str],
                    ylabel: str) -> None:
    """curves[setting][labelled] = {"steps": (P,), "validation": (S, P), "test": (S, P) or None}
    (S seeds); one column per label count, rows validation / test; mean line, ±std band."""
    plt = _pyplot()
    settings = list(curves)
    counts = sorted({n for s in settings for n in curves[s]})
    blocks = ["validation"] + (["test"] if any(curves[s][n].get("test") is not None for s in settings for n in curves[s]) else [])
    figure, axes = plt.subplots(len(blocks), len(counts), figsize=(3.6 * len(counts) + 3.0, 3.0 * len(blocks)),
                                squeeze=False, sharey=True)
    for r, block in enumerate(blocks):
        for c, n in enumerate(counts):
            axis = axes[r, c]
            for setting in settings:
                curve = curves[setting].get(n)
                if curve is None or curve.get(block) is None:
                    continue
                values = np.asarray(curve[block])
                mean, spread = values.mean(0), values.std(0)
                line, = axis.plot(curve["steps"], mean, "o-", ms=3, label=titles.get(setting, setting))
                axis.fill_between(curve["steps"], mean - spread, mean + spread, color=line.get_color(), alpha=0.15)
            axis.set_title(f"{block}, {n} labelled slice{'s' if n > 1 else ''}", fontsize=9)
            axis.set_xlabel("fine-tuning step")
            if c == 0:
                axis.set_ylabel(ylabel, fontsize=8)
            axis.grid(alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="center right", fontsize=7, frameon=False)
    figure.tight_layout(rect=(0, 0, 1 - 2.9 / (3.6 * len(counts) + 3.0), 1))
    figure.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(figure)
