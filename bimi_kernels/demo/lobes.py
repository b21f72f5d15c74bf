"""The anatomical task: lobes of the AAL atlas on the Colin27 brain, sagittal slices.

Data: the Debian package ``mricron-data`` (``apt-get install mricron-data``) installs, on one
1 mm grid (181 x 217 x 181, RAS), the Colin27 T1 brain ``ch2.nii.gz``, its skull-stripped
version ``ch2bet.nii.gz``, the AAL atlas ``aal.nii.gz`` and its label names ``aal.nii.txt``
(lines ``index name code``) in ``/usr/share/mricron/templates`` (or the folder named by the
environment variable ``BIMI_MRICRON_DIR``).

Classes: AAL's 116 regions grouped into lobes by name (`LOBE_PREFIXES`), plus background and
in-brain voxels that AAL leaves unlabelled (mostly white matter):
0 background, 1 unlabelled brain, 2 frontal, 3 parietal, 4 temporal, 5 occipital,
6 insula / limbic, 7 deep grey, 8 cerebellum. The headline is the mean Dice of the 7 lobes.

Split by hemisphere, so no test voxel is trained on; but the right hemisphere mirrors the left,
so a test slice at distance d looks like the left slice at d (label Dice about 0.8, image
correlation about 0.95 between such twins): the test measures transfer to the mirrored
hemisphere, close to a block of neighbours, not to an unseen subject. Sagittal slices at
distance d mm from the midline (d >= 3, with at least a quarter of the largest slice's brain
area); left hemisphere: validation at d = 0 mod 8, the fine-tune block
(the slices that may be labelled) at d = 4 mod 8, pre-training on every left slice except the
validation slices and their direct neighbours; test: the right hemisphere, every 2 mm.
The baseline "mirror" labels each test slice with the left hemisphere's atlas labels at the
same distance from the midline (the brain's left-right symmetry; it uses every left label).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch

from .data import MissingDemoData, SliceBlock, TaskData, read_nifti, resize, resize_labels, square_crop

LOBE_CLASSES = ("background", "unlabelled brain", "frontal", "parietal", "temporal", "occipital",
                "insula / limbic", "deep grey", "cerebellum")
# AAL region names (without the _L / _R suffix) by the start of the name; one lobe each.
LOBE_PREFIXES: Dict[str, Tuple[str, ...]] = {
    "frontal": ("Precentral", "Frontal_", "Rolandic_Oper", "Supp_Motor_Area", "Olfactory", "Rectus"),
    "parietal": ("Postcentral", "Parietal_", "SupraMarginal", "Angular", "Precuneus", "Paracentral_Lobule"),
    "temporal": ("Heschl", "Temporal_"),
    "occipital": ("Calcarine", "Cuneus", "Lingual", "Occipital_", "Fusiform"),
    "insula / limbic": ("Insula", "Cingulum_", "Hippocampus", "ParaHippocampal", "Amygdala"),
    "deep grey": ("Caudate", "Putamen", "Pallidum", "Thalamus"),
    "cerebellum": ("Cerebelum_", "Vermis_"),
}
DEFAULT_FOLDER = Path("/usr/share/mricron/templates")
FILES = ("ch2bet.nii.gz", "aal.nii.gz", "aal.nii.txt")
INSTALL_COMMAND = "sudo apt-get install mricron-data"
MIDLINE_X = 90  # voxel index of x = 0 mm on the mricron 1 mm grid (affine offset -90)


def lobe_of(name: str) -> int:
    """The lobe class (index into LOBE_CLASSES) of an AAL region name such as 'Frontal_Sup_L'."""
    base = name[:-2] if name.endswith(("_L", "_R")) else name
    found = [lobe for lobe, prefixes in LOBE_PREFIXES.items() if any(base.startswith(p) for p in prefixes)]
    if len(found) != 1:
        raise ValueError(f"name: AAL region {name!r} matches {len(found)} lobes ({found}), expected one")
    return LOBE_CLASSES.index(found[0])


def read_label_names(path: Path) -> Dict[int, str]:
    """{atlas value: region name} from an AAL names file (lines 'index name code')."""
    names = {}
    for line in Path(path).read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit():
            names[int(parts[0])] = parts[1]
    return names


def lobe_lookup(names: Dict[int, str]) -> np.ndarray:
    """A table from atlas value to lobe class; value 0 (no region) -> 1 (unlabelled brain)."""
    table = np.ones(max(names) + 1, np.int64)
    for value, name in names.items():
        table[value] = lobe_of(name)
    return table


def data_folder() -> Path:
    """Where mricron-data's files are, or MissingDemoData with the install command."""
    folder = Path(os.environ.get("BIMI_MRICRON_DIR", DEFAULT_FOLDER))
    missing = [name for name in FILES if not (folder / name).is_file()]
    if missing:
        raise MissingDemoData(
            f"the lobes task needs the Colin27 brain and the AAL atlas of the Debian package mricron-data "
            f"({', '.join(missing)} not found in {folder}). Install it with:\n    {INSTALL_COMMAND}\n"
            "(or point BIMI_MRICRON_DIR at a folder holding ch2bet.nii.gz, aal.nii.gz and aal.nii.txt)"
        )
    return folder


def left_right_positions(area: np.ndarray, min_brain_fraction: float = 0.25, min_distance: int = 3) -> Dict[str, List[int]]:
    """x indices of the blocks (see the module docstring) from the brain area per sagittal slice."""
    usable = area >= min_brain_fraction * area.max()
    distances = [d for d in range(min_distance, MIDLINE_X + 1)]
    left = [d for d in distances if MIDLINE_X - d >= 0 and usable[MIDLINE_X - d]]
    right = [d for d in distances if MIDLINE_X + d < len(area) and usable[MIDLINE_X + d]]
    return {
        "validation": [MIDLINE_X - d for d in left if d % 8 == 0],
        "finetune": [MIDLINE_X - d for d in left if d % 8 == 4],
        "pretrain": [MIDLINE_X - d for d in left if d % 8 not in (7, 0, 1)],
        "test": [MIDLINE_X + d for d in right if d % 2 == 0],
        "mirror": [MIDLINE_X - d for d in right if d % 2 == 0],  # the left slice facing each test slice
    }


def load_lobes(resolution: int = 64) -> TaskData:
    folder = data_folder()
    image = read_nifti(folder / "ch2bet.nii.gz").astype(np.float32)
    atlas = read_nifti(folder / "aal.nii.gz").astype(np.int64)
    if image.shape != atlas.shape:
        raise MissingDemoData(f"{folder}: ch2bet {image.shape} and aal {atlas.shape} are not on one grid")
    table = lobe_lookup(read_label_names(folder / "aal.nii.txt"))
    inside = (image > 0) | (atlas > 0)
    lobes = np.where(inside, table[atlas], 0)
    image = np.clip(image / np.percentile(image[image > 0], 99.9), 0, 1) * inside
    positions = left_right_positions(inside.sum(axis=(1, 2)))

    # (x, y, z) -> per x: (row = superior at the top, column = anterior on the left)
    def to_slices(volume, xs):
        cropped = square_crop(volume, inside, slice_axis=0)[xs]
        return torch.from_numpy(np.ascontiguousarray(cropped)).permute(0, 2, 1).flip(1).flip(2)

    def block(xs):
        images = resize(to_slices(image, xs)[:, None].float(), resolution).clamp(0, 1)
        labels = resize_labels(to_slices(lobes, xs), len(LOBE_CLASSES), resolution)
        return SliceBlock(images * (labels > 0)[:, None], labels, torch.tensor(xs))

    blocks = {name: block(xs) for name, xs in positions.items()}
    return TaskData(
        task="lobes",
        source="Colin27 (mricron-data) sagittal slices, AAL lobes; left hemisphere for training, right for test",
        class_names=LOBE_CLASSES,
        scored=tuple(range(2, len(LOBE_CLASSES))),
        score_title="mean Dice of the 7 lobes",
        pretrain=blocks["pretrain"],
        finetune=blocks["finetune"],
        validation=blocks["validation"],
        test=blocks["test"],
        resolution=resolution,
        position_unit="x",
        mirror_test=blocks["mirror"].labels,
    )
