"""`bimi demo` / `python -m bimi_kernels demo`: pre-train a small U-Net with BIMILoss on brain
MRI slices without labels, draw its clusters, then fine-tune it with 1, 2 or 4 labelled slices
and compare the pre-training settings (random init, IIC, regularised MI, full BIMI) by Dice on a
held-out test block, the fine-tuning checkpoint chosen on a separate validation block.

Tasks: `tissue` (default; grey matter / white matter / other in-brain, mostly CSF, on the MNI
template bundled with nilearn) and `lobes` (AAL lobes on the Colin27 brain from the Debian
package mricron-data; sagittal slices, left hemisphere for training, right for test).

The quick preset (default) takes about 10 minutes on a 2-core CPU; `--preset full` is the long
run for a GPU (`--device cuda`). Every option below overrides the preset's value.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence

# What a run cuts from the authors' protocol is written in results.md (AUTHORS_PROTOCOL and the options).
PRESETS = {
    # quick: one CPU thread, because this small model gains little from a second one and on a
    # shared machine OpenMP threads that wait on each other made a 2-thread run several times
    # slower
    "quick": dict(resolution=64, width=16, depth=3, clusters=16, heads=3, epochs=40, batches_per_epoch=9,
                  batch_size=8, lr=2e-3, finetune_steps=300, finetune_lr=3e-3, eval_every=25, seeds=3,
                  labels=[1, 4], threads=1),
    "full": dict(resolution=128, width=32, depth=4, clusters=40, heads=3, epochs=60, batches_per_epoch=100,
                 batch_size=16, lr=2e-4, finetune_steps=3000, finetune_lr=3e-4, eval_every=100, seeds=5,
                 labels=[1, 2, 4], threads=None),
}
AUTHORS_PROTOCOL = ("the authors: ~15,000 pre-training steps at peak lr 2e-4; ~9,000 fine-tuning steps at peak lr "
                    "3e-5 to 6e-4 by data set; 224-256 pixel slices, a U-Net of up to 512 channels; several scans")
PICTURE_SLICES = 4
# CPU seconds per step measured on this project's 2-core CPU with one thread, quick model
# (64x64, width 16, depth 3): pre-training at batch 8, fine-tuning per labelled slice. Used
# only to say how long a CPU run would take, scaled by batch x pixels x width^2 x depth.
CPU_PRETRAIN_STEP_SECONDS = 0.2
CPU_FINETUNE_SLICE_SECONDS = 0.015
# What each offset beyond the first adds to a pre-training step, per head (the loss's joint counts,
# forward and backward, with the C++ backend at batch 8, K = 16, 64x64); scaled by batch x pixels
# x K^2.
CPU_LOSS_OFFSET_SECONDS = 0.55e-3
LONG_CPU_RUN_SECONDS = 3600
# The source volumes are under 256 voxels across (MNI ICBM152: 197 x 233 x 189; Colin27: 181 x 217
# x 181): a larger slice side only interpolates, and loading the slices at 1024 takes a minute.
MAX_RESOLUTION = 512
DEMO_FILES = ("results.md", "results.json", "loss_curves.png", "dice.png", "finetune_curves.png", "log.txt")


def int_at_least(minimum: int, maximum: Optional[int] = None, why: str = ""):
    """An argparse type: an integer >= minimum (and <= maximum), else a usage error saying so."""
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"expected an integer <= {maximum}{why}, got {text}")
        return value

    parse.__name__ = "integer"  # argparse names the type in "invalid integer value: ..."
    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)
at_least_two = int_at_least(2)
# K: the cluster maps of 3 heads, both views and their gradients grow with K (K = 256 at the full
# preset's batch of 16 at 128x128 is about 3 GB); far beyond, a run only ends out of memory
MAX_CLUSTERS = 256
cluster_count = int_at_least(2, MAX_CLUSTERS, " (the maps' memory grows with K)")


def positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value < math.inf:  # also refuses nan
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value


def learning_rate(text: str) -> float:
    """A peak learning rate in (0, 1]: RAdam above 1 only diverges (the runs use 2e-4 to 3e-3)."""
    value = positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a learning rate in (0, 1], got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bimi demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--task", choices=["tissue", "lobes"], default="tissue",
                        help="tissue (default, from pip alone) or lobes (needs: sudo apt-get install mricron-data)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick",
                        help="quick: 64x64, 360 pre-training and 300 fine-tuning steps, 3 seeds, 1 and 4 labelled "
                             "slices, 1 CPU thread (CPU, about 10 minutes); full: 128x128, 6,000 pre-training and "
                             "3,000 fine-tuning steps, 5 seeds, 1, 2 and 4 labelled slices (GPU)")
    parser.add_argument("--out", type=Path, default=Path("demo_out"),
                        help="where results.md, results.json and pictures/ go (default: demo_out)")
    parser.add_argument("--checkpoint-dir", type=Path, default=None,
                        help="where the per-epoch pre-training checkpoints go (default: OUT/checkpoints)")
    again = parser.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue each pre-training from its last checkpoint (same settings); the rest is redone")
    again.add_argument("--overwrite", action="store_true",
                       help="replace the demo's files in an existing --out (and its checkpoints)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto: cuda if available)")
    parser.add_argument("--backend", default="auto", help="BIMILoss backend: auto, reference, cpp, triton, cuda")
    parser.add_argument("--settings", nargs="+", default=["random", "iic", "rmi", "bimi"],
                        choices=["random", "iic", "rmi", "bimi"], help="which pre-training settings to compare")
    parser.add_argument("--views", choices=["authors", "mild"], default="authors",
                        help="the two-view augmentation of pre-training (bimi_kernels.views.VIEW_SETTINGS; default authors)")
    parser.add_argument("--resolution", type=positive_int, help="slice side in pixels (divisible by 2^(depth-1), >= 16)")
    parser.add_argument("--width", type=positive_int, help="U-Net channels at full resolution")
    parser.add_argument("--depth", type=at_least_two, help="U-Net levels")
    parser.add_argument("--clusters", type=cluster_count, help=f"K, clusters per head (2 to {MAX_CLUSTERS})")
    parser.add_argument("--heads", type=positive_int, help="cluster heads (loss averaged over them)")
    parser.add_argument("--epochs", type=positive_int, help="pre-training epochs (checkpoints and pictures per epoch)")
    parser.add_argument("--batches-per-epoch", "--pretrain-steps", dest="batches_per_epoch", type=positive_int,
                        help="pre-training batches per epoch (default: one pass over the pre-training slices)")
    parser.add_argument("--batch-size", type=positive_int, help="pre-training batch size")
    parser.add_argument("--lr", type=learning_rate, help="pre-training peak learning rate (RAdam, warm-up + cosine)")
    parser.add_argument("--offsets", type=non_negative_int, default=0,
                        help="BIMILoss neighbour window radius (default 0, the authors' choice)")
    parser.add_argument("--finetune-steps", type=positive_int, help="fine-tuning steps")
    parser.add_argument("--finetune-lr", type=learning_rate,
                        help="fine-tuning peak learning rate, every layer (RAdam, warm-up + cosine)")
    parser.add_argument("--eval-every", type=positive_int,
                        help="score the validation block every N fine-tuning steps (the curve; the checkpoint choice)")
    parser.add_argument("--labels", type=positive_int, nargs="+", help="labelled-slice counts")
    parser.add_argument("--seeds", type=positive_int, help="fine-tuning seeds per setting and label count")
    parser.add_argument("--seed", type=int, default=0, help="pre-training seed (default 0)")
    parser.add_argument("--no-test", action="store_true",
                        help="never score the test block (for choosing settings): tables on the validation block only")
    parser.add_argument("--picture-every", type=positive_int, default=None,
                        help="draw the cluster picture every N epochs (default: about 4 per setting; the first and "
                             "last epochs are always drawn)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch CPU threads (quick preset: 1, full: torch's choice; 1 can be much faster on a busy "
                             "shared machine, where OpenMP threads wait on each other)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (the summary lines still print)")
    parser.add_argument("--allow-long-cpu-run", action="store_true",
                        help="go on with a run estimated to take over an hour on a CPU (--preset full without a GPU)")
    return parser


def resolve_options(args: argparse.Namespace) -> argparse.Namespace:
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.checkpoint_dir is None:
        args.checkpoint_dir = args.out / "checkpoints"
    if args.picture_every is None:
        args.picture_every = max(1, args.epochs // 4)
    return args


def resolve_device(parser: argparse.ArgumentParser, text: str):
    """torch.device for --device, or a usage error saying why it cannot be used."""
    import torch

    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kind, _, index = text.partition(":")
    if kind not in ("cpu", "cuda") or (index and (not index.isdigit() or kind == "cpu")):
        parser.error(f"argument --device: expected auto, cpu, cuda or cuda:N, got {text!r}")
    if kind == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch is a CPU-only build" if torch.version.cuda is None
                   else "no CUDA device is visible")
            parser.error(f"argument --device: {text!r} cannot be used: {why} (torch {torch.__version__}); "
                         "use --device cpu")
        if index and int(index) >= torch.cuda.device_count():
            parser.error(f"argument --device: {text!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return torch.device(text)


def estimated_seconds(args: argparse.Namespace, pretrain_images: int) -> float:
    """Rough CPU time of a run, from the quick model's measured step times (see the constants)."""
    model = (args.resolution / 64) ** 2 * (args.width / 16) ** 2 * (args.depth / 3)
    batches = args.batches_per_epoch or -(-pretrain_images // args.batch_size)
    pretrained = sum(1 for s in args.settings if s != "random")
    extra_offsets = (2 * args.offsets + 1) ** 2 - 1
    loss = (extra_offsets * args.heads * CPU_LOSS_OFFSET_SECONDS * (args.resolution / 64) ** 2
            * (args.clusters / 16) ** 2)
    pretrain = (pretrained * args.epochs * batches * (args.batch_size / 8)
                * (CPU_PRETRAIN_STEP_SECONDS * model + loss))
    finetune = (len(args.settings) * args.seeds * args.finetune_steps * sum(args.labels)
                * CPU_FINETUNE_SLICE_SECONDS * model)
    return pretrain + finetune


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """Every check that needs no data: usage errors (exit 2) before anything is written.
    Returns the torch.device."""
    factor = 2 ** (args.depth - 1)
    if args.resolution < 16 or args.resolution % factor or args.resolution > MAX_RESOLUTION:
        parser.error(f"argument --resolution: expected a multiple of {factor} (2^(depth-1) for depth {args.depth}) "
                     f"from 16 to {MAX_RESOLUTION} (the source volumes are under 256 voxels across), "
                     f"got {args.resolution}")
    if args.offsets >= args.resolution:  # the loss's own check, before any work
        parser.error(f"argument --offsets: a window radius below the slice size {args.resolution} is needed "
                     f"(an offset of {args.offsets} pixels leaves no pixel pair), got {args.offsets}")
    for flag, folder in (("--out", args.out), ("--checkpoint-dir", args.checkpoint_dir)):
        problem = folder_problem(folder)
        if problem:
            parser.error(f"argument {flag}: {problem}")
    if len(set(args.labels)) != len(args.labels):
        parser.error(f"argument --labels: expected distinct counts, got {args.labels}")
    if len(set(args.settings)) != len(args.settings):
        parser.error(f"argument --settings: expected distinct settings, got {args.settings}")
    device = resolve_device(parser, args.device)
    import bimi_kernels

    if args.backend != "auto":
        reasons = bimi_kernels.available_backends(device.type)
        if args.backend not in reasons:
            parser.error(f"argument --backend: expected auto or one of {sorted(reasons)}, got {args.backend!r}")
        if reasons[args.backend] is not None:
            parser.error(f"argument --backend: {args.backend!r} cannot run on {device.type}: {reasons[args.backend]}")
    elif os.environ.get("BIMI_BACKEND", "").strip():  # it overrides auto: refuse it now, not at the first loss
        from bimi_kernels import backends

        try:
            backends.resolve("auto", device.type)
        except (RuntimeError, ValueError) as exc:
            parser.error(str(exc))
    if device.type == "cpu":
        from bimi_kernels.native import cpu_isa

        try:
            cpu_isa()  # a BIMI_CPU_ISA the C++ loops refuse would stop the run at its first loss
        except ValueError as exc:
            parser.error(str(exc))
    if not (args.resume or args.overwrite):  # an existing run is what those two are for
        existing = [p for p in [args.out / name for name in DEMO_FILES] + [args.out / "pictures"] if p.exists()]
        if args.checkpoint_dir.is_dir():
            existing += sorted(args.checkpoint_dir.glob("pretrain_*.pt"))
        if existing:
            parser.error(f"argument --out: {args.out} already holds a demo run ({existing[0]}, ...); "
                         "add --resume to continue it, --overwrite to replace it, or choose another --out")
    return device


def folder_problem(folder: Path) -> Optional[str]:
    """Why the demo could not create or write the folder `folder`, or None."""
    if folder.exists():
        if not folder.is_dir():
            return f"{folder} exists and is not a folder"
        return None if _can_write_in(folder) else f"{folder} is not writable"
    parent = folder.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"cannot create {folder}: {parent} is not a folder"
    if not _can_write_in(parent):
        return f"cannot create {folder}: {parent} is not writable"
    return None


def _can_write_in(folder: Path) -> bool:
    """Whether a file can be made in `folder`, tried (permission bits say yes for root on
    read-only mounts and on /proc)."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def run_configs(args: argparse.Namespace, pretrain_images: int):
    """(ModelConfig, PretrainConfig, batches per epoch) of a run: what its checkpoints record."""
    from .pretrain import ModelConfig, PretrainConfig

    model_config = ModelConfig(width=args.width, depth=args.depth, clusters=args.clusters, heads=args.heads)
    pretrain_config = PretrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                                     backend=args.backend, views=args.views,
                                     loss_overrides={"offsets": args.offsets} if args.offsets else {})
    batches_per_epoch = args.batches_per_epoch or -(-pretrain_images // args.batch_size)
    return model_config, pretrain_config, batches_per_epoch


def check_resume(parser: argparse.ArgumentParser, args: argparse.Namespace, pretrain_images: torch.Tensor) -> None:
    """--resume: every checkpoint it would continue was made with this run's settings, on this
    run's pre-training images."""
    if not args.resume:
        return
    from .pretrain import SETTINGS, checkpoint_path, resume_mismatch

    model_config, pretrain_config, batches_per_epoch = run_configs(args, len(pretrain_images))
    for setting in args.settings:
        path = checkpoint_path(args.checkpoint_dir, setting)
        if SETTINGS[setting] is not None and path.is_file():
            problem = resume_mismatch(path, model_config, pretrain_config, batches_per_epoch, pretrain_images)
            if problem:
                parser.error(f"argument --resume: {problem}")


def check_cpu_time(parser: argparse.ArgumentParser, args: argparse.Namespace, device, pretrain_images: int) -> None:
    if device.type != "cpu" or args.allow_long_cpu_run:
        return
    seconds = estimated_seconds(args, pretrain_images)
    if seconds > LONG_CPU_RUN_SECONDS:
        parser.error(f"this run would take about {seconds / 3600:.0f} hours on a CPU like this project's 2-core one "
                     f"(estimated from the quick preset's step times); it is meant for a GPU (--device cuda). "
                     "Add --allow-long-cpu-run to start it anyway")


def remove_previous_outputs(args: argparse.Namespace) -> None:
    """--overwrite: delete only what the demo writes (never the folder itself)."""
    for name in DEMO_FILES:
        path = args.out / name
        if path.is_file():
            path.unlink()
    pictures = args.out / "pictures"
    if pictures.is_dir():
        for picture in pictures.glob("*_epoch*.png"):
            picture.unlink()
    if args.checkpoint_dir.is_dir():
        for checkpoint in args.checkpoint_dir.glob("pretrain_*.pt*"):
            checkpoint.unlink()


def _format(values: List[float]) -> str:
    if not values:
        return "n/a"
    mean = statistics.fmean(values)
    if len(values) == 1:  # one seed: no spread to show
        return f"{mean:.3f}"
    return f"{mean:.3f} ± {statistics.pstdev(values):.3f}"


def _format_steps(values: List[int]) -> str:
    if len(values) == 1:
        return f"{values[0]}"
    mean, spread = _mean_std([float(v) for v in values])
    return f"{mean:.0f} ± {spread:.0f} (each seed: {', '.join(str(v) for v in values)})"


def _mean_std(values: List[float]):
    return statistics.fmean(values), (statistics.pstdev(values) if len(values) > 1 else 0.0)


def cpu_description(backend_name: str) -> str:
    """The processor, and the build of the C++ loops where the cpp backend ran: the same code and
    seeds end elsewhere on another processor (results/demo/README.md), so a result names both."""
    from bimi_kernels.native import cpu_isa, processor_name

    name = processor_name()
    return f"{name}; C++ loops: {cpu_isa()} build" if backend_name == "cpp" else name


def command_line(argv: List[str]) -> str:
    """The command as typed: `bimi demo` and the arguments, quoted where needed."""
    return "bimi demo" + (" " + shlex.join(argv) if argv else "")


def count_label(n: int) -> str:
    return f"{n} labelled slice{'s' if n > 1 else ''}"


def evaluate_criterion(summary: Dict) -> List[str]:
    """The success criterion stated in results/demo/README.md, checked on the test Dice at the
    validation-chosen checkpoint: (a) at the fewest labelled slices, full BIMI's mean is above
    random init's by more than twice the larger of their standard deviations over seeds; (b) at
    every label count, the means order full BIMI >= regularised MI >= IIC."""
    runs, counts = summary["finetune"], sorted(summary["options"]["labels"])
    key = "validation_mean" if summary["options"].get("no_test") else "test_mean"
    settings = summary["settings"]

    def cell(setting, n):
        return [r[key] for r in runs if r["setting"] == setting and r["labelled"] == n]

    lines = []
    fewest = counts[0]
    if {"bimi", "random"} <= set(settings):
        (bimi, bimi_std), (random_, random_std) = _mean_std(cell("bimi", fewest)), _mean_std(cell("random", fewest))
        margin = 2 * max(bimi_std, random_std)
        difference = (f"- (a) {count_label(fewest)}: full BIMI {bimi:.3f} - random init {random_:.3f} = "
                      f"{bimi - random_:+.3f}")
        if len(cell("bimi", fewest)) < 2:
            lines.append(difference + "; with one seed there is no seed spread to compare it with "
                         "(--seeds 2 or more): not evaluated")
        else:
            verdict = "met" if bimi - random_ > margin else "not met"
            lines.append(difference + f", needed > {margin:.3f} (2 x the larger seed std): **{verdict}**")
    else:
        lines.append("- (a) needs the settings random and bimi: not evaluated")
    if {"bimi", "rmi", "iic"} <= set(settings):
        parts, ordered = [], True
        for n in counts:
            means = {s: _mean_std(cell(s, n))[0] for s in ("bimi", "rmi", "iic")}
            holds = means["bimi"] >= means["rmi"] >= means["iic"]
            ordered &= holds
            parts.append(f"{n}: {means['bimi']:.3f} / {means['rmi']:.3f} / {means['iic']:.3f} ({'yes' if holds else 'no'})")
        lines.append("- (b) BIMI >= regularised MI >= IIC at every label count (BIMI / RMI / IIC) - "
                     + "; ".join(parts) + f": **{'met' if ordered else 'not met'}**")
    else:
        lines.append("- (b) needs the settings bimi, rmi and iic: not evaluated")
    return lines


def labelled_slices_line(runs: Sequence[Dict], counts: Sequence[int], seeds: int) -> str:
    """'1 slice: [3], [5], [0]; 4 slices: [...]' from the runs (the same slices for every setting)."""
    parts = []
    for n in counts:
        draws = []
        for seed in range(seeds):
            found = [r["labelled_slices"] for r in runs if r["labelled"] == n and r["seed"] == seed]
            draws.append(str(found[0]) if found else "n/a")
        parts.append(f"{count_label(n)}: {', '.join(draws)}")
    return "; ".join(parts)


def write_tables(out: Path, summary: Dict) -> str:
    """results.json (everything) and results.md (the tables); returns the markdown."""
    from .pretrain import SETTING_TITLES
    from .training import atomic_write_text

    runs, options = summary["finetune"], summary["options"]
    settings, counts, seeds = summary["settings"], options["labels"], options["seeds"]
    class_names, scored = summary["class_names"], summary["scored"]
    no_test = options.get("no_test")
    block = "validation" if no_test else "test"

    def gather(rows, setting, n, key):
        return [r[key] for r in rows if r["setting"] == setting and r["labelled"] == n and key in r]

    threads = summary["threads"]
    lines = [
        f"# BIMI demo results: {summary['task']} task",
        "",
        f"Command: `{summary['command']}`",
        "",
        f"- Data: {summary['data']}",
        f"- Device: {summary['device']} ({summary['device_name']}), BIMILoss backend: {summary['backend']}, "
        f"torch {summary['torch']}, {threads} thread{'s' if threads != 1 else ''}",
        f"- Model: U-Net width {options['width']}, depth {options['depth']}; {options['heads']} cluster heads, "
        f"K = {options['clusters']}",
        f"- Views: {summary['views']}",
        f"- Pre-training: {summary['pretrain_steps']} steps ({options['epochs']} epoch{'s' if options['epochs'] != 1 else ''} of "
        f"{summary['batches_per_epoch']} batches of {options['batch_size']}), RAdam, peak lr {options['lr']:g}, "
        f"warm-up + cosine, no weight decay, seed {options['seed']} (one run per setting)",
        f"- Fine-tuning: {options['finetune_steps']} steps, RAdam, peak lr {options['finetune_lr']:g} for every layer, "
        "warm-up + cosine, weight decay 1e-5, nothing frozen; validation Dice every "
        f"{options['eval_every']} steps, the best step's checkpoint kept; {seeds} seed{'s' if seeds != 1 else ''} "
        "per cell (each seed: which slices are labelled, random init and head init, augmentation; the same "
        "for every setting)",
        f"- Slices labelled by each seed (positions in the fine-tune block): {labelled_slices_line(runs, counts, seeds)}",
        f"- Cut to fit the time budget: this run has {summary['pretrain_steps']} pre-training steps at peak lr "
        f"{options['lr']:g} and {options['finetune_steps']} fine-tuning steps at peak lr {options['finetune_lr']:g}, "
        f"{options['resolution']}x{options['resolution']} slices, a U-Net of width {options['width']}, one template "
        f"({AUTHORS_PROTOCOL})",
        f"- Wall time: {summary['seconds_total']:.0f} s; load average (1 min) {summary['load_start']:.1f} at the "
        f"start, {summary['load_end']:.1f} at the end, on {summary['cpus']} CPU{'s' if summary['cpus'] != 1 else ''}",
        "",
        f"Headline number: {summary['score_title']} on the {block} block, "
        + ("mean ± std over seeds." if seeds > 1 else "one seed (no spread)."),
        "",
        "## Criterion (stated in results/demo/README.md before the run)",
        "",
        *evaluate_criterion(summary),
        "",
    ]
    title = "validation block (`--no-test`: the test block was not scored)" if no_test else "test block"
    key = "validation_mean" if no_test else "test_mean"
    lines += [
        f"## {summary['score_title']}, {title}, at the validation-chosen checkpoint",
        "",
        "| | " + " | ".join(count_label(n) for n in counts) + " |",
        "|---|" + "---|" * len(counts),
    ]
    for name, rows in summary["baselines"].items():
        cells = [_format(gather(rows, "baseline", n, key)) for n in counts]
        lines.append(f"| baseline: {name} | " + " | ".join(cells) + " |")
    for setting in settings:
        cells = [_format(gather(runs, setting, n, key)) for n in counts]
        lines.append(f"| fine-tuned from {SETTING_TITLES[setting]} | " + " | ".join(cells) + " |")
    for setting in settings:
        cells = [_format(gather(summary["probes"], setting, n, key)) for n in counts]
        lines.append(f"| linear probe on frozen {setting} features | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Baselines and probes are fitted on the same labelled slices as the fine-tuning (per seed). "
        "A linear probe: the U-Net frozen, a 1x1 head fitted by L-BFGS on its decoder features.",
        "",
    ]
    if not no_test:
        lines += [
            f"## {summary['score_title']}, test block, at the last fine-tuning step",
            "",
            "| pre-training | " + " | ".join(count_label(n) for n in counts) + " |",
            "|---|" + "---|" * len(counts),
        ]
        for setting in settings:
            cells = [_format(gather(runs, setting, n, "test_last_mean")) for n in counts]
            lines.append(f"| {setting} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        "## Chosen fine-tuning step (validation), mean ± std over seeds",
        "",
        "| pre-training | " + " | ".join(count_label(n) for n in counts) + " |",
        "|---|" + "---|" * len(counts),
    ]
    for setting in settings:
        cells = [_format_steps(gather(runs, setting, n, "chosen_step")) for n in counts]
        lines.append(f"| {setting} | " + " | ".join(cells) + " |")
    for curve_key, curve_block in (("validation_curve", "validation"), ("test_curve", "test")):
        if curve_block == "test" and no_test:
            continue
        for n in counts:
            steps = [p["step"] for p in next((r[curve_key] for r in runs if r["labelled"] == n), [])]
            lines += [
                "",
                f"## Dice against fine-tuning steps, {curve_block} block, {count_label(n)} (mean ± std over seeds)",
                "",
                "| pre-training | " + " | ".join(f"step {s}" for s in steps) + " |",
                "|---|" + "---|" * len(steps),
            ]
            for setting in settings:
                curves = [r[curve_key] for r in runs if r["setting"] == setting and r["labelled"] == n]
                cells = [_format([c[i]["mean"] for c in curves]) for i in range(len(steps))]
                lines.append(f"| {setting} | " + " | ".join(cells) + " |")
    if not no_test:
        lines += ["", "## Test Dice per class at the validation-chosen checkpoint (mean ± std over seeds)", ""]
        lines += ["| pre-training | labelled | " + " | ".join(class_names) + " |",
                  "|---|---|" + "---|" * len(class_names)]
        for setting in settings:
            for n in counts:
                per_class = [r["test_dice"] for r in runs if r["setting"] == setting and r["labelled"] == n]
                cells = [_format([d[c] for d in per_class]) for c in range(len(class_names))]
                lines.append(f"| {setting} | {n} | " + " | ".join(cells) + " |")
    pretrained = summary["pretrain"]
    if pretrained:
        lines += [
            "",
            "## Pre-training",
            "",
            "| setting | first-epoch loss | last-epoch loss | change over the last quarter of the epochs | "
            "cluster purity (validation block), first → last epoch | seconds |",
            "|---|---|---|---|---|---|",
        ]
        for setting, info in pretrained.items():
            losses, purity = info["epoch_loss"], info["epoch_purity"]
            quarter = max(1, len(losses) // 4)
            change = losses[-1] - losses[-1 - quarter] if len(losses) > quarter else float("nan")
            purity_text = f"{purity[0]:.3f} → {purity[-1]:.3f}" if purity else "n/a"
            lines.append(f"| {setting} | {losses[0]:.4f} | {losses[-1]:.4f} | {change:+.4f} | {purity_text} | "
                         f"{sum(info['epoch_seconds']):.0f} |")
        lines += [
            "",
            "Cluster purity: pixel accuracy on the validation block when each cluster of head 0 is mapped to "
            "its majority label (background counts as a label).",
        ]
    lines += ["", "Pictures: `pictures/` (clusters every few epochs per setting, with the ground truth of "
              "fine-tune-block slices), `loss_curves.png`, `dice.png`, `finetune_curves.png`.", ""]
    markdown = "\n".join(lines)
    atomic_write_text(out / "results.md", markdown)
    atomic_write_text(out / "results.json", json.dumps(summary, indent=1))
    return markdown


def draw_dice_bars(path: Path, summary: Dict) -> None:
    """dice.png from a results summary (results.json's keys finetune, baselines, probes,
    settings, options, score_title): one bar per setting, baseline and the frozen-BIMI probe."""
    from . import plots
    from .pretrain import SETTING_TITLES

    counts, no_test = summary["options"]["labels"], summary["options"].get("no_test")
    key = "validation_mean" if no_test else "test_mean"

    def cells(rows, setting=None):
        return {n: [r[key] for r in rows if r["labelled"] == n and key in r and (setting is None or r["setting"] == setting)]
                for n in counts}

    table = {s: cells(summary["finetune"], s) for s in summary["settings"]}
    for name, rows in summary["baselines"].items():
        table[f"baseline: {name}"] = cells(rows)
    if "bimi" in summary["settings"]:
        table["linear probe, frozen bimi"] = cells(summary["probes"], "bimi")
    table = {name: row for name, row in table.items() if any(row.values())}
    plots.dice_bars(path, table, SETTING_TITLES,
                    f"{'validation' if no_test else 'test'} Dice, validation-chosen checkpoint\n{summary['score_title']}")


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = resolve_options(parser.parse_args(argv))
    device = check_arguments(parser, args)

    from .packages import MissingDemoData, check_packages

    try:
        check_packages()
        from .data import load_task  # imports numpy: only after the check

        data = load_task(args.task, args.resolution)
    except MissingDemoData as exc:
        print(f"bimi demo: {exc}", file=sys.stderr)
        return 2
    if max(args.labels) > len(data.finetune):
        parser.error(f"argument --labels: the {args.task} task's fine-tune block has {len(data.finetune)} slices, "
                     f"so at most {len(data.finetune)} can be labelled; got {max(args.labels)}")
    check_cpu_time(parser, args, device, len(data.pretrain))
    check_resume(parser, args, data.pretrain.images)
    if args.overwrite:
        remove_previous_outputs(args)

    import torch

    threads_before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return run_demo(args, argv, data, device)
    finally:
        torch.set_num_threads(threads_before)  # leave the caller's process as it was


def run_demo(args: argparse.Namespace, argv: List[str], data, device) -> int:
    """The whole demo for checked options and loaded data; `argv` is only recorded as the command."""
    started = time.perf_counter()
    load_start = os.getloadavg()[0]
    import torch
    from tqdm.auto import tqdm

    from .. import backends
    from ..functional import edge_map, uncertainty_map
    from ..views import TwoViewTransform
    from . import plots
    from .baselines import frozen_features, intensity_lookup, linear_probe, random_unet
    from .finetune import FinetuneConfig, choose_labelled, dice_per_class, finetune_and_evaluate, mean_dice
    from .pretrain import SETTING_TITLES, SETTINGS, pretrain, two_view_cluster_maps

    out = args.out
    pictures = out / "pictures"
    pictures.mkdir(parents=True, exist_ok=True)
    log_lines: List[str] = []

    def log(*parts):
        text = " ".join(str(p) for p in parts)
        log_lines.append(text)
        print(text, flush=True)

    backend_name = backends.resolve(args.backend, device.type)
    log(data.describe())
    log(f"device {device}, BIMILoss backend {backend_name}, {torch.get_num_threads()} torch thread(s); writing to {out}")

    classes, scored = len(data.class_names), data.scored
    model_config, pretrain_config, batches_per_epoch = run_configs(args, len(data.pretrain))
    views_setting = TwoViewTransform.named(args.views)

    # Fixed fine-tune-block slices and views for the pictures, so epochs are comparable.
    picture_index = torch.linspace(0, len(data.finetune) - 1, PICTURE_SLICES).round().long().unique()
    picture_views = views_setting(data.finetune.images[picture_index], generator=torch.Generator().manual_seed(1234))
    picture_truth = picture_views.labels_in_view2(data.finetune.labels[picture_index])
    # (a few small CPU slices, for display: the reference, whatever the device, --backend or BIMI_BACKEND)
    picture_edges = edge_map(picture_views.transformed, backend="reference")[:, 0].numpy()

    def draw_epoch(setting):
        def callback(epoch, unet, heads, history):
            if epoch % args.picture_every and epoch not in (1, args.epochs):
                return
            with torch.no_grad():
                views = picture_views.to(device)
                p1s, p2s = two_view_cluster_maps(unet, heads, views)
                p1, p2 = p1s[0].float().cpu(), p2s[0].float().cpu()
                plots.cluster_grid(
                    pictures / f"{setting}_epoch{epoch:03d}.png",
                    f"{data.task}: {SETTING_TITLES[setting]}, epoch {epoch}, head 0 of {model_config.heads}, "
                    f"K = {model_config.clusters}",
                    image=picture_views.transformed[:, 0].numpy(),
                    edge=picture_edges,
                    truth=picture_truth.numpy(),
                    class_names=data.class_names,
                    clusters_view1=p1.argmax(1).numpy(),
                    clusters_view2=p2.argmax(1).numpy(),
                    uncertainty=uncertainty_map(p2)[:, 0].numpy(),
                    valid=picture_views.mask[:, 0].numpy(),
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
            setting, data.pretrain.images, model_config, pretrain_config, args.checkpoint_dir, device,
            resume=args.resume, probe=(data.validation.images, data.validation.labels),
            on_epoch_end=draw_epoch(setting), progress=not args.no_progress, batches_per_epoch=batches_per_epoch,
        )
        unet_states[setting] = result.unet_state
        history = result.history
        pretrain_summary[setting] = {k: history[k] for k in ("epoch_loss", "epoch_purity", "epoch_seconds", "step_loss")}
        pretrain_summary[setting]["resumed_from_epoch"] = result.resumed_from_epoch
        purity = f", cluster purity {history['epoch_purity'][-1]:.3f}" if history["epoch_purity"] else ""
        log(f"pre-trained {setting}: loss {history['epoch_loss'][0]:.4f} -> {history['epoch_loss'][-1]:.4f}{purity} "
            f"({sum(history['epoch_seconds']):.0f} s)")
    if pretrain_summary:
        plots.loss_curves(out / "loss_curves.png", pretrain_summary, SETTING_TITLES)

    finetune_config = FinetuneConfig(steps=args.finetune_steps, lr=args.finetune_lr, eval_every=args.eval_every)
    jobs = [(s, n, seed) for n in args.labels for seed in range(args.seeds) for s in args.settings]
    runs = []
    finetune_started = time.perf_counter()
    for setting, labelled, seed in tqdm(jobs, desc="fine-tune", disable=args.no_progress):
        result = finetune_and_evaluate(unet_states[setting], model_config, finetune_config, data,
                                       labelled=labelled, seed=seed, device=device, score_test=not args.no_test)
        result.update(setting=setting, labelled=labelled, seed=seed)
        runs.append(result)
    log(f"fine-tuned {len(jobs)} runs ({time.perf_counter() - finetune_started:.0f} s)")

    # Baselines and linear probes, fitted on the same labelled slices as each fine-tuning run.
    def scores(prediction_validation, prediction_test):
        row = {"validation_mean": mean_dice(dice_per_class(prediction_validation, data.validation.labels, classes), scored)}
        if prediction_test is not None:
            row["test_dice"] = dice_per_class(prediction_test, data.test.labels, classes)
            row["test_mean"] = mean_dice(row["test_dice"], scored)
        return row

    test_images = None if args.no_test else data.test.images
    baselines: Dict[str, List[dict]] = {"intensity lookup (64 bins)": []}
    probes: List[dict] = []
    encoders: Dict[object, tuple] = {}

    def encoder(setting, seed):
        """The frozen U-Net of a setting (random init: the one this seed's fine-tuning starts
        from) and its features of the validation and test blocks, computed once."""
        key = setting if unet_states[setting] is not None else (setting, seed)
        if key not in encoders:
            unet = random_unet(1, args.width, args.depth, seed, unet_states[setting]).to(device)
            encoders[key] = (unet, frozen_features(unet, data.validation.images, device),
                             None if test_images is None else frozen_features(unet, test_images, device))
        return encoders[key]

    for n in args.labels:
        for seed in range(args.seeds):
            chosen = choose_labelled(len(data.finetune), n, seed)
            images, labels = data.finetune.images[chosen], data.finetune.labels[chosen]
            row = scores(intensity_lookup(images, labels, classes, data.validation.images),
                         None if test_images is None else intensity_lookup(images, labels, classes, test_images))
            baselines["intensity lookup (64 bins)"].append(dict(row, setting="baseline", labelled=n, seed=seed))
            for setting in args.settings:
                unet, validation_features, test_features = encoder(setting, seed)
                labelled_features = frozen_features(unet, images, device)
                row = scores(linear_probe(labelled_features, labels, classes, validation_features, seed=seed),
                             None if test_features is None else
                             linear_probe(labelled_features, labels, classes, test_features, seed=seed))
                probes.append(dict(row, setting=setting, labelled=n, seed=seed))
    if data.mirror_test is not None and not args.no_test:
        mirror_dice = dice_per_class(data.mirror_test, data.test.labels, classes)
        baselines["left-right mirror of the atlas labels (uses every left label)"] = [
            dict(setting="baseline", labelled=n, seed=0, test_dice=mirror_dice, test_mean=mean_dice(mirror_dice, scored))
            for n in args.labels]

    # Pictures of the fine-tuning results
    tables = {"finetune": runs, "baselines": baselines, "probes": probes, "settings": args.settings,
              "options": {"labels": args.labels, "no_test": args.no_test}, "score_title": data.score_title}
    draw_dice_bars(out / "dice.png", tables)
    curves = {}
    for s in args.settings:
        curves[s] = {}
        for n in args.labels:
            cell = [r for r in runs if r["setting"] == s and r["labelled"] == n]
            curves[s][n] = {
                "steps": [p["step"] for p in cell[0]["validation_curve"]],
                "validation": [[p["mean"] for p in r["validation_curve"]] for r in cell],
                "test": None if args.no_test else [[p["mean"] for p in r["test_curve"]] for r in cell],
            }
    plots.finetune_curves(out / "finetune_curves.png", curves, SETTING_TITLES, data.score_title)

    summary = {
        "command": command_line(argv),
        "task": data.task,
        "data": data.describe(),
        "class_names": list(data.class_names),
        "scored": list(scored),
        "score_title": data.score_title,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_description(backend_name),
        "backend": backend_name,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "views": views_setting.describe(),
        "settings": args.settings,
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "model": asdict(model_config),
        "batches_per_epoch": batches_per_epoch,
        "pretrain_steps": args.epochs * batches_per_epoch,
        "pretrain": pretrain_summary,
        "finetune": runs,
        "baselines": baselines,
        "probes": probes,
        "load_start": load_start,
        "load_end": os.getloadavg()[0],
        "seconds_total": time.perf_counter() - started,
    }
    markdown = write_tables(out, summary)
    log("\n" + markdown)
    log(f"results: {out / 'results.md'} (tables), {out / 'results.json'}, pictures in {pictures}, "
        f"{out / 'loss_curves.png'}, {out / 'dice.png'}, {out / 'finetune_curves.png'}")
    (out / "log.txt").write_text("\n".join(log_lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
