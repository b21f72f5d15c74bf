"""`bimi demo` / `python -m bimi_kernels demo`: pre-train a small U-Net with BIMILoss on brain
MRI slices, draw the clusters, then fine-tune with 1, 2 and 4 labelled slices and compare the
pre-training settings (random init, IIC, regularised MI, full BIMI) by Dice on a held-out block.

The quick preset (default) finishes in about 10 minutes on a 2-core CPU; `--preset full` is the
longer run for a GPU (`--device cuda`). Every option below overrides the preset's value.
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List, Optional

PRESETS = {
    # quick: one CPU thread, because this small model gains little from a second one and on a
    # shared machine OpenMP threads that wait on each other made a 2-thread run 6x slower
    "quick": dict(resolution=64, width=16, depth=3, clusters=16, heads=3, epochs=24, batch_size=8, lr=2e-3,
                  finetune_steps=120, finetune_lr=2e-3, seeds=3, labels=[1, 2, 4], threads=1),
    "full": dict(resolution=128, width=32, depth=4, clusters=40, heads=3, epochs=60, batch_size=16, lr=1e-3,
                 finetune_steps=300, finetune_lr=1e-3, seeds=5, labels=[1, 2, 4], threads=None),
}
PICTURE_SLICES = 4


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bimi demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick",
                        help="quick: 64x64, 24 epochs, 120 fine-tuning steps, 3 seeds, 1 CPU thread (CPU, ~8 min); "
                             "full: 128x128, 60 epochs, 300 fine-tuning steps, 5 seeds (GPU)")
    parser.add_argument("--out", type=Path, default=Path("demo_out"),
                        help="where results.md, results.json and pictures/ go (default: demo_out)")
    parser.add_argument("--checkpoint-dir", type=Path, default=None,
                        help="where the per-epoch checkpoints go (default: OUT/checkpoints)")
    parser.add_argument("--resume", action="store_true",
                        help="continue each pre-training from its last checkpoint (same settings)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--backend", default="auto", help="BIMILoss backend (default: auto)")
    parser.add_argument("--settings", nargs="+", default=["random", "iic", "rmi", "bimi"],
                        choices=["random", "iic", "rmi", "bimi"], help="which pre-training settings to compare")
    parser.add_argument("--resolution", type=int, help="slice side in pixels")
    parser.add_argument("--width", type=int, help="U-Net channels at full resolution")
    parser.add_argument("--depth", type=int, help="U-Net levels")
    parser.add_argument("--clusters", type=int, help="K, clusters per head")
    parser.add_argument("--heads", type=int, help="cluster heads (loss averaged over them)")
    parser.add_argument("--epochs", type=int, help="pre-training epochs")
    parser.add_argument("--batch-size", type=int, help="pre-training batch size")
    parser.add_argument("--lr", type=float, help="pre-training peak learning rate (one-cycle)")
    parser.add_argument("--offsets", type=int, default=0, help="BIMILoss neighbour window radius (SPEC default 0)")
    parser.add_argument("--finetune-steps", type=int, help="fine-tuning steps")
    parser.add_argument("--finetune-lr", type=float, help="fine-tuning peak learning rate")
    parser.add_argument("--labels", type=int, nargs="+", help="labelled-slice counts (default 1 2 4)")
    parser.add_argument("--seeds", type=int, help="fine-tuning seeds per setting and label count")
    parser.add_argument("--seed", type=int, default=0, help="pre-training seed (default 0)")
    parser.add_argument("--pretrain-steps", type=int, default=None,
                        help="cap on pre-training steps per epoch (for smoke tests)")
    parser.add_argument("--no-test", action="store_true",
                        help="do not touch the test block: score on the fine-tune block's unlabelled slices only "
                             "(for choosing settings without looking at the test block)")
    parser.add_argument("--picture-every", type=int, default=1,
                        help="draw the cluster picture every N epochs (default 1; the last epoch is always drawn)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (quick preset: 1, full: torch's choice; 1 can be much faster on a busy "
                             "shared machine, where OpenMP threads wait on each other)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (the summary lines still print)")
    return parser


def resolve_options(args: argparse.Namespace) -> argparse.Namespace:
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.checkpoint_dir is None:
        args.checkpoint_dir = args.out / "checkpoints"
    return args


def _format(values: List[float]) -> str:
    if not values:
        return "n/a"
    mean = statistics.fmean(values)
    spread = statistics.pstdev(values) if len(values) > 1 else 0.0
    return f"{mean:.3f} ± {spread:.3f}"


def write_tables(out: Path, summary: Dict) -> str:
    """results.json (everything) and results.md (the tables); returns the markdown."""
    from .data import CLASS_NAMES
    from .pretrain import SETTING_TITLES

    runs = summary["finetune"]
    settings, counts = summary["settings"], summary["options"]["labels"]
    seeds = summary["options"]["seeds"]

    def gather(setting, n, key, index=None):
        values = [r[key] if index is None else r[key][index] for r in runs if r["setting"] == setting and r["labelled"] == n and key in r]
        return values

    def count_label(n):
        return f"{n} labelled slice{'s' if n > 1 else ''}"

    lines = [
        "# BIMI demo results",
        "",
        f"Command: `{summary['command']}`",
        "",
        f"- Data: {summary['data']}",
        f"- Device: {summary['device']} ({summary['device_name']}), BIMILoss backend: {summary['backend']}, "
        f"torch {summary['torch']}, {summary['threads']} threads",
        f"- Model: U-Net width {summary['options']['width']}, depth {summary['options']['depth']}; "
        f"{summary['options']['heads']} cluster heads, K = {summary['options']['clusters']}",
        f"- Pre-training: {summary['options']['epochs']} epochs, batch {summary['options']['batch_size']}, "
        f"peak lr {summary['options']['lr']}, seed {summary['options']['seed']} (one run per setting)",
        f"- Fine-tuning: {summary['options']['finetune_steps']} steps, peak lr {summary['options']['finetune_lr']}; "
        f"{seeds} seeds per cell (each seed: which slices are labelled, head init, augmentation; the same "
        "for every setting)",
        f"- Wall time: {summary['seconds_total']:.0f} s",
        "",
    ]
    if summary["options"].get("no_test"):
        lines += ["**Test block not evaluated (`--no-test`).**"]
    else:
        lines += [
            f"## Test Dice, mean over grey matter / white matter / other in-brain (mean ± std over {seeds} seeds)",
            "",
            "| pre-training | " + " | ".join(count_label(n) for n in counts) + " |",
            "|---|" + "---|" * len(counts),
        ]
        for setting in settings:
            cells = [_format(gather(setting, n, "test_mean_tissue_dice")) for n in counts]
            lines.append(f"| {SETTING_TITLES[setting]} | " + " | ".join(cells) + " |")
        lines += ["", "## Test Dice per class (mean ± std over seeds)", ""]
        lines += ["| pre-training | labelled | " + " | ".join(CLASS_NAMES) + " |",
                  "|---|---|" + "---|" * len(CLASS_NAMES)]
        for setting in settings:
            for n in counts:
                cells = [_format(gather(setting, n, "test_dice", c)) for c in range(len(CLASS_NAMES))]
                lines.append(f"| {setting} | {n} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Diagnostic: Dice on the fine-tune block's unlabelled slices (mean of the 3 tissues)",
        "",
        "Used to look for causes (never the test block).",
        "",
        "| pre-training | " + " | ".join(count_label(n) for n in counts) + " |",
        "|---|" + "---|" * len(counts),
    ]
    for setting in settings:
        cells = [_format(gather(setting, n, "val_mean_tissue_dice")) for n in counts]
        lines.append(f"| {setting} | " + " | ".join(cells) + " |")
    pretrained = summary["pretrain"]
    if pretrained:
        lines += [
            "",
            "## Pre-training",
            "",
            "| setting | first-epoch loss | last-epoch loss | cluster purity (fine-tune block), first → last epoch | seconds |",
            "|---|---|---|---|---|",
        ]
        for setting, info in pretrained.items():
            losses, purity = info["epoch_loss"], info["epoch_purity"]
            purity_text = f"{purity[0]:.3f} → {purity[-1]:.3f}" if purity else "n/a"
            lines.append(f"| {setting} | {losses[0]:.4f} | {losses[-1]:.4f} | {purity_text} | {sum(info['epoch_seconds']):.0f} |")
        lines += [
            "",
            "Cluster purity: pixel accuracy on the fine-tune block when each cluster of head 0 is "
            "mapped to its majority tissue label (background counts as a label).",
        ]
    lines += ["", "Pictures: `pictures/` (clusters per epoch per setting), `loss_curves.png`, `dice.png`.", ""]
    markdown = "\n".join(lines)
    (out / "results.md").write_text(markdown)
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    return markdown


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = resolve_options(build_parser().parse_args(argv))
    import torch

    threads_before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return run_demo(args, argv)
    finally:
        torch.set_num_threads(threads_before)  # leave the caller's process as it was


def run_demo(args: argparse.Namespace, argv: List[str]) -> int:
    """The whole demo for resolved options; `argv` is only recorded as the command."""
    started = time.perf_counter()
    import torch

    from .. import backends
    from ..views import TwoViewTransform
    from . import plots
    from .data import MissingDemoData, load_brain_slices
    from .finetune import FinetuneConfig, finetune_and_evaluate
    from .pretrain import SETTING_TITLES, SETTINGS, ModelConfig, PretrainConfig, pretrain, two_view_cluster_maps

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    try:
        data = load_brain_slices(args.resolution)
    except MissingDemoData as exc:
        print(f"bimi demo: {exc}", file=sys.stderr)
        return 2
    def log(*parts):
        print(*parts, flush=True)

    backend_name = backends.resolve(args.backend, device.type)
    log(data.describe())
    log(f"device {device}, BIMILoss backend {backend_name}; writing to {args.out}")

    out = args.out
    pictures = out / "pictures"
    pictures.mkdir(parents=True, exist_ok=True)
    model_config = ModelConfig(width=args.width, depth=args.depth, clusters=args.clusters, heads=args.heads)
    pretrain_config = PretrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                                     backend=args.backend, loss_overrides={"offsets": args.offsets} if args.offsets else {})
    pretrain_images = data.pretrain.images
    if args.pretrain_steps:
        pretrain_images = pretrain_images[: args.pretrain_steps * args.batch_size]

    # Fixed slices and views for the pictures, so epochs are comparable.
    picture_index = torch.linspace(0, len(data.pretrain) - 1, PICTURE_SLICES).round().long()
    picture_views = TwoViewTransform(noise_std=0.0)(data.pretrain.images[picture_index], generator=torch.Generator().manual_seed(1234))

    def draw_epoch(setting):
        from ..functional import edge_map, uncertainty_map

        def callback(epoch, unet, heads, history):
            if epoch % max(args.picture_every, 1) and epoch != args.epochs:
                return
            with torch.no_grad():
                views = type(picture_views)(*(getattr(picture_views, f).to(device) if f != "params" else picture_views.params
                                              for f in ("original", "transformed", "params", "mask")))
                p1s, p2s = two_view_cluster_maps(unet, heads, views)
                p1, p2 = p1s[0].float().cpu(), p2s[0].float().cpu()
                plots.cluster_grid(
                    pictures / f"{setting}_epoch{epoch:03d}.png",
                    f"{SETTING_TITLES[setting]}: epoch {epoch}, head 0 of {model_config.heads}, K = {model_config.clusters}",
                    image=views.transformed[:, 0].cpu().numpy(),
                    edge=edge_map(views.transformed.cpu())[:, 0].numpy(),
                    clusters_view1=p1.argmax(1).numpy(),
                    clusters_view2=p2.argmax(1).numpy(),
                    uncertainty=uncertainty_map(p2)[:, 0].numpy(),
                    valid=views.mask[:, 0].cpu().numpy(),
                    clusters=model_config.clusters,
                )

        return callback

    pretrain_summary: Dict[str, dict] = {}
    unet_states: Dict[str, Optional[dict]] = {}
    for setting in args.settings:
        if SETTINGS[setting] is None:
            unet_states[setting] = None
            continue
        result = pretrain(
            setting, pretrain_images, model_config, pretrain_config, args.checkpoint_dir, device,
            resume=args.resume, probe=(data.finetune.images, data.finetune.labels),
            on_epoch_end=draw_epoch(setting), progress=not args.no_progress,
        )
        unet_states[setting] = result.unet_state
        pretrain_summary[setting] = {k: result.history[k] for k in ("epoch_loss", "epoch_purity", "epoch_seconds")}
        pretrain_summary[setting]["step_loss"] = result.history["step_loss"]
        pretrain_summary[setting]["resumed_from_epoch"] = result.resumed_from_epoch
        history = result.history
        purity = f", cluster purity {history['epoch_purity'][-1]:.3f}" if history["epoch_purity"] else ""
        log(f"pre-trained {setting}: loss {history['epoch_loss'][0]:.4f} -> {history['epoch_loss'][-1]:.4f}{purity}")
    if pretrain_summary:
        plots.loss_curves(out / "loss_curves.png", pretrain_summary, SETTING_TITLES)

    from tqdm.auto import tqdm

    finetune_config = FinetuneConfig(steps=args.finetune_steps, lr=args.finetune_lr)
    jobs = [(s, n, seed) for n in args.labels for seed in range(args.seeds) for s in args.settings]
    runs = []
    for setting, labelled, seed in tqdm(jobs, desc="fine-tune", disable=args.no_progress):
        result = finetune_and_evaluate(
            unet_states[setting], model_config, finetune_config,
            data.finetune.images, data.finetune.labels,
            None if args.no_test else data.test.images, None if args.no_test else data.test.labels,
            labelled=labelled, seed=seed, device=device,
        )
        result.update(setting=setting, labelled=labelled, seed=seed)
        runs.append(result)

    score = "val_mean_tissue_dice" if args.no_test else "test_mean_tissue_dice"
    table = {s: {n: [r[score] for r in runs if r["setting"] == s and r["labelled"] == n]
                 for n in args.labels} for s in args.settings}
    plots.dice_bars(out / "dice.png", table, SETTING_TITLES,
                    "fine-tune block Dice (unlabelled slices)" if args.no_test else "test Dice")
    summary = {
        "command": "bimi demo " + shlex.join(argv),
        "data": data.describe(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "backend": backend_name,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "settings": args.settings,
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "model": asdict(model_config),
        "pretrain": pretrain_summary,
        "finetune": runs,
        "seconds_total": time.perf_counter() - started,
    }
    markdown = write_tables(out, summary)
    log("\n" + markdown)
    log(f"results: {out / 'results.md'} (table), {out / 'results.json'}, pictures in {pictures}, "
        f"{out / 'loss_curves.png'}, {out / 'dice.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
