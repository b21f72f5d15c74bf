"""The demo's two tasks on real brain MRI, as blocks of 2-D slices.

- ``tissue`` (the default; from pip alone): axial slices of the MNI ICBM152 2009a template that
  the `nilearn` wheel bundles (`nilearn/datasets/data/`: T1, grey- and white-matter probability
  maps, 1 mm, skull-stripped). We read the files with nibabel; nilearn itself is never imported
  (its import pulls in scikit-learn, pandas and more), we only locate its folder. Labels per
  pixel: 0 background (outside the brain), 1 grey matter, 2 white matter, 3 other in-brain
  tissue (mostly cerebrospinal fluid): the most probable of GM / WM / 1 - GM - WM inside the
  brain mask (T1 > 0). Slices are split into contiguous blocks, inferior to superior:
  pre-train | gap | fine-tune | gap | validation | gap | test. Neighbouring slices are nearly
  identical, so a random split would leak; the gaps keep the blocks apart.
- ``lobes`` (needs the Debian package ``mricron-data``): sagittal slices of the Colin27 brain
  with the AAL atlas grouped into lobes; see `bimi_kernels.demo.lobes`.

Every task gives a `TaskData`: the images to pre-train on (never their labels), the fine-tune
block (the slices that may be labelled), a validation block (for choosing the fine-tuning
checkpoint) and a test block (scored once, at the end). The fine-tune, validation and test
blocks are disjoint; the pre-training images include the fine-tune block (unlabelled, as the
authors pre-train on all training scans) but never a validation or test slice.
"""
from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .packages import INSTALL_HINT, MissingDemoData, check_packages  # noqa: F401 (re-exported)

TISSUE_CLASSES = ("background", "grey matter", "white matter", "other in-brain")
CLASS_NAMES = TISSUE_CLASSES  # the old name, kept for callers of earlier versions
TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
TASKS = ("tissue", "lobes")


@dataclass
class SliceBlock:
    """Slices at the demo resolution.

    images   : (N, 1, R, R) float32, intensity scaled to [0, 1]
    labels   : (N, R, R) int64 class indices (see the task's class_names)
    position : (N,) where each slice lies in its volume (z index for axial slices, x index for
               sagittal ones)
    """

    images: torch.Tensor
    labels: torch.Tensor
    position: torch.Tensor

    def __len__(self) -> int:
        return self.images.shape[0]

    def take(self, index) -> "SliceBlock":
        return SliceBlock(self.images[index].contiguous(), self.labels[index].contiguous(), self.position[index])

    def span(self, unit: str) -> str:
        """'N slices (z 22-74, 78-94)': the runs of consecutive positions (at most three shown)."""
        if len(self) == 0:
            return "0 slices"
        positions = sorted(int(p) for p in self.position)
        runs = [[positions[0], positions[0]]]
        for p in positions[1:]:
            if p == runs[-1][1] + 1:
                runs[-1][1] = p
            else:
                runs.append([p, p])
        if len(runs) > 3:
            return f"{len(self)} slices ({unit} {positions[0]}-{positions[-1]}, not consecutive)"
        text = ", ".join(f"{lo}-{hi}" if hi > lo else f"{lo}" for lo, hi in runs)
        return f"{len(self)} slices ({unit} {text})"


@dataclass
class TaskData:
    """One task's slices.

    pretrain     : the slices pre-training sees (their labels are never used for training)
    finetune     : the slices that may be labelled for fine-tuning
    validation   : labelled slices for choosing the fine-tuning checkpoint (never trained on)
    test         : scored once, with the chosen checkpoint, after every choice is made
    scored       : the classes whose Dice is averaged in the headline number
    mirror_test  : for the lobes task, the test block labelled by mirroring the other
                   hemisphere's atlas labels (a baseline); None otherwise
    """

    task: str
    source: str
    class_names: Tuple[str, ...]
    scored: Tuple[int, ...]
    score_title: str
    pretrain: SliceBlock
    finetune: SliceBlock
    validation: SliceBlock
    test: SliceBlock
    resolution: int
    position_unit: str
    mirror_test: Optional[torch.Tensor] = None

    def describe(self) -> str:
        unit = self.position_unit
        return (
            f"{self.source} at {self.resolution}x{self.resolution}: pre-train {self.pretrain.span(unit)}, "
            f"fine-tune {self.finetune.span(unit)}, validation {self.validation.span(unit)}, "
            f"test {self.test.span(unit)}"
        )


def template_folder() -> Path:
    """nilearn's bundled data folder, found without importing nilearn."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDemoData(
            "The tissue task reads the MNI ICBM152 template bundled in the nilearn package, "
            f"which is not installed. Install it with:\n    {INSTALL_HINT}"
        )
    for location in spec.submodule_search_locations:
        folder = Path(location) / "datasets" / "data"
        if all((folder / name).is_file() for name in TEMPLATE_FILES.values()):
            return folder
    raise MissingDemoData(
        "nilearn is installed but its bundled MNI ICBM152 2009 files "
        f"({', '.join(TEMPLATE_FILES.values())}) were not found under "
        f"{list(spec.submodule_search_locations)}/datasets/data. Reinstall it: {INSTALL_HINT}"
    )


def read_nifti(path: Path) -> np.ndarray:
    try:
        import nibabel
    except ImportError as exc:
        raise MissingDemoData(f"The demo needs nibabel to read NIfTI files: {INSTALL_HINT}") from exc
    return np.asanyarray(nibabel.load(str(path)).dataobj)


def load_volumes() -> Dict[str, np.ndarray]:
    """T1 (intensity in [0, 1]) and GM / WM probability volumes, float32, axes (x, y, z) in RAS."""
    folder = template_folder()
    volumes = {}
    for key, name in TEMPLATE_FILES.items():
        data = read_nifti(folder / name).astype(np.float32)
        volumes[key] = data / 255.0 if data.max() > 1.5 else data
    return volumes


def resize(x: torch.Tensor, resolution: int) -> torch.Tensor:
    """(N, C, h, w) -> (N, C, R, R), antialiased (these are downsampled 1 mm slices)."""
    return F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True)


def square_crop(volume: np.ndarray, inside: np.ndarray, slice_axis: int, margin: int = 4) -> np.ndarray:
    """Crop the two in-plane axes of `volume` to the bounding box of `inside` over the whole
    volume, padded to a square with zeros; the slice axis is kept."""
    in_plane = [a for a in range(3) if a != slice_axis]
    box = []
    for axis in in_plane:
        other = tuple(a for a in range(3) if a != axis)
        hits = np.nonzero(inside.any(axis=other))[0]
        box.append((int(hits.min()), int(hits.max()) + 1))
    side = max(hi - lo for lo, hi in box) + margin
    out_shape = list(volume.shape)
    for axis in in_plane:
        out_shape[axis] = side
    out = np.zeros(out_shape, volume.dtype)
    source = [slice(None)] * 3
    target = [slice(None)] * 3
    for axis, (lo, hi) in zip(in_plane, box):
        start = (lo + hi) // 2 - side // 2
        source[axis] = slice(max(start, 0), min(start + side, volume.shape[axis]))
        target[axis] = slice(source[axis].start - start, source[axis].stop - start)
    out[tuple(target)] = volume[tuple(source)]
    return out


def resize_labels(labels: torch.Tensor, classes: int, resolution: int) -> torch.Tensor:
    """(N, h, w) int -> (N, R, R): per pixel the class with the largest antialiased share."""
    best = torch.full((labels.shape[0], resolution, resolution), -1.0)
    out = torch.zeros(labels.shape[0], resolution, resolution, dtype=torch.int64)
    for c in range(classes):
        share = resize((labels == c).float()[:, None], resolution)[:, 0]
        better = share > best
        out[better] = c
        best = torch.where(better, share, best)
    return out


def split_contiguous(count: int, fractions: Sequence[float], gap: int) -> list:
    """Consecutive index ranges for `fractions` of `count` slices with `gap` slices dropped
    between neighbours (the last range takes what is left)."""
    usable = count - gap * (len(fractions) - 1)
    sizes = [int(round(f * usable)) for f in fractions[:-1]]
    ranges, start = [], 0
    for size in sizes:
        ranges.append(range(start, start + size))
        start += size + gap
    ranges.append(range(start, count))
    return ranges


def load_tissue(
    resolution: int = 64,
    fractions: Tuple[float, float, float, float] = (0.47, 0.15, 0.10, 0.28),
    gap: int = 3,
    min_brain_fraction: float = 0.25,
) -> TaskData:
    """Axial slices of the MNI template with tissue labels (see the module docstring).

    fractions          : share of the usable slices for pre-train, fine-tune, validation, test
                         (in that order, inferior to superior)
    gap                : slices dropped between two blocks
    min_brain_fraction : a slice is usable when its brain area is at least this share of the
                         largest slice's (drops the tiny caps at both ends)

    Pre-training sees the pre-train and the fine-tune blocks (as the authors pre-train on all
    their training scans, the labelled ones included), never validation or test.
    """
    if len(fractions) != 4 or abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) <= 0:
        raise ValueError(f"fractions: expected four positive shares summing to 1, got {fractions!r}")
    volumes = load_volumes()
    t1, gm, wm = volumes["t1"], volumes["gm"], volumes["wm"]
    brain = t1 > 0
    area = brain.sum(axis=(0, 1))
    usable = np.nonzero(area >= min_brain_fraction * area.max())[0]
    z_lo, z_hi = int(usable[0]), int(usable[-1]) + 1

    # (x, y, z) -> (z, row = anterior at the top, column = x)
    def to_slices(volume):
        cropped = square_crop(volume, brain, slice_axis=2)[:, :, z_lo:z_hi]
        stack = torch.from_numpy(np.ascontiguousarray(cropped)).permute(2, 1, 0).flip(1)
        return resize(stack[:, None].contiguous().float(), resolution)

    image = to_slices(t1).clamp(0, 1)
    inside = to_slices(brain.astype(np.float32)) > 0.5
    grey, white = to_slices(gm), to_slices(wm)
    other = (1 - grey - white).clamp(min=0)
    tissue = torch.cat([grey, white, other], dim=1).argmax(dim=1) + 1
    labels = torch.where(inside[:, 0], tissue, torch.zeros_like(tissue))
    image = image * inside  # the resize blurs a little intensity outside the brain mask
    everything = SliceBlock(images=image, labels=labels, position=torch.arange(z_lo, z_hi))
    pre, fine, val, test = (everything.take(list(r)) for r in split_contiguous(z_hi - z_lo, fractions, gap))
    pretrain = SliceBlock(torch.cat([pre.images, fine.images]), torch.cat([pre.labels, fine.labels]),
                          torch.cat([pre.position, fine.position]))
    return TaskData(
        task="tissue",
        source="MNI ICBM152 2009a axial slices",
        class_names=TISSUE_CLASSES,
        scored=(1, 2, 3),
        score_title="mean Dice of grey matter / white matter / other in-brain",
        pretrain=pretrain,
        finetune=fine,
        validation=val,
        test=test,
        resolution=resolution,
        position_unit="z",
    )


@functools.lru_cache(maxsize=4)
def load_task(task: str, resolution: int) -> TaskData:
    """The slices of `task` ("tissue" or "lobes") at `resolution` (cached: callers must not
    modify the tensors)."""
    if task == "tissue":
        return load_tissue(resolution)
    if task == "lobes":
        from .lobes import load_lobes

        return load_lobes(resolution)
    raise ValueError(f"task: expected one of {TASKS}, got {task!r}")


def load_brain_slices(resolution: int = 64) -> TaskData:
    """The tissue task (the name of earlier versions)."""
    return load_tissue(resolution)
