"""Real brain MRI for the demo: axial slices of the MNI ICBM152 2009 template with tissue labels.

The `nilearn` wheel bundles the symmetric ICBM152 2009a template (T1, grey-matter and
white-matter probability maps, 197 x 233 x 189 voxels of 1 mm, skull-stripped) in
`nilearn/datasets/data/`. We read those three files with nibabel; nilearn itself is never
imported (its import pulls in scikit-learn, pandas and more), we only locate its folder.

Labels per pixel: 0 background (outside the brain), 1 grey matter, 2 white matter, 3 other
in-brain tissue (mostly cerebrospinal fluid), the most probable of GM / WM / 1 - GM - WM
inside the brain mask (T1 > 0).

Axial slices (along the inferior-superior axis) are split into contiguous blocks, inferior to
superior: pre-train | gap | fine-tune | gap | test. Neighbouring slices are nearly identical,
so a random split would leak the test set into training; the gaps keep the blocks apart.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import torch
import torch.nn.functional as F

CLASS_NAMES = ("background", "grey matter", "white matter", "other in-brain")
TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
INSTALL_HINT = "pip install nibabel nilearn   (or: pip install 'bimi_kernels[demo]')"


class MissingDemoData(RuntimeError):
    """The demo's data packages (nibabel, nilearn) are not installed."""


def template_folder() -> Path:
    """nilearn's bundled data folder, found without importing nilearn."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDemoData(
            "The brain MRI demo reads the MNI ICBM152 template bundled in the nilearn package, "
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


def load_volumes() -> Dict[str, np.ndarray]:
    """T1 (intensity in [0, 1]) and GM / WM probability volumes, float32, axes (x, y, z) in RAS."""
    folder = template_folder()
    try:
        import nibabel
    except ImportError as exc:
        raise MissingDemoData(f"The brain MRI demo needs nibabel to read NIfTI files: {INSTALL_HINT}") from exc
    volumes = {}
    for key, name in TEMPLATE_FILES.items():
        data = np.asanyarray(nibabel.load(str(folder / name)).dataobj).astype(np.float32)
        volumes[key] = data / 255.0 if data.max() > 1.5 else data
    return volumes


@dataclass
class SliceBlock:
    """A contiguous block of axial slices at the demo resolution.

    images : (N, 1, R, R) float32, T1 intensity scaled to [0, 1]
    labels : (N, R, R) int64 in {0, 1, 2, 3} (see CLASS_NAMES)
    z      : (N,) the slice index in the template (inferior to superior)
    """

    images: torch.Tensor
    labels: torch.Tensor
    z: torch.Tensor

    def __len__(self) -> int:
        return self.images.shape[0]


@dataclass
class BrainSlices:
    pretrain: SliceBlock
    finetune: SliceBlock
    test: SliceBlock
    resolution: int

    def describe(self) -> str:
        def span(block):
            return f"{len(block)} slices (z {int(block.z[0])}-{int(block.z[-1])})"

        return (
            f"MNI ICBM152 2009a axial slices at {self.resolution}x{self.resolution}: "
            f"pre-train {span(self.pretrain)}, fine-tune {span(self.finetune)}, test {span(self.test)}"
        )


def _resize(x: torch.Tensor, resolution: int) -> torch.Tensor:
    """(N, C, h, w) -> (N, C, R, R), antialiased (these are downsampled 1 mm slices)."""
    return F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True)


def load_brain_slices(
    resolution: int = 64,
    fractions: Tuple[float, float, float] = (0.55, 0.15, 0.30),
    gap: int = 3,
    min_brain_fraction: float = 0.25,
    slice_step: int = 1,
) -> BrainSlices:
    """Axial slices of the template, labelled and split into contiguous blocks.

    resolution         : side R of the square slices (the brain's bounding box, padded square)
    fractions          : share of the usable slices for pre-train, fine-tune, test (in that
                         order, inferior to superior)
    gap                : slices dropped between two blocks
    min_brain_fraction : a slice is usable when its brain area is at least this share of the
                         largest slice's (drops the tiny caps at both ends)
    slice_step         : keep every n-th slice inside each block
    """
    if abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) <= 0:
        raise ValueError(f"fractions: expected three positive shares summing to 1, got {fractions!r}")
    volumes = load_volumes()
    t1, gm, wm = volumes["t1"], volumes["gm"], volumes["wm"]
    brain = t1 > 0
    area = brain.sum(axis=(0, 1))
    usable = np.nonzero(area >= min_brain_fraction * area.max())[0]
    z_lo, z_hi = int(usable[0]), int(usable[-1]) + 1

    # Crop in-plane to the brain's bounding box over the whole volume, padded to a square.
    xs, ys = np.nonzero(brain.any(axis=2))
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    side = max(x1 - x0, y1 - y0) + 4
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2

    def crop(volume):
        out = np.zeros((side, side, volume.shape[2]), np.float32)
        xa, ya = cx - side // 2, cy - side // 2
        sx = slice(max(xa, 0), min(xa + side, volume.shape[0]))
        sy = slice(max(ya, 0), min(ya + side, volume.shape[1]))
        out[sx.start - xa : sx.stop - xa, sy.start - ya : sy.stop - ya] = volume[sx, sy]
        return out

    # (z, x, y) -> display orientation (z, row = anterior at the top, column = x)
    def to_slices(volume):
        stack = torch.from_numpy(crop(volume)[:, :, z_lo:z_hi]).permute(2, 1, 0).flip(1)
        return _resize(stack[:, None].contiguous(), resolution)

    image = to_slices(t1).clamp(0, 1)
    inside = to_slices(brain.astype(np.float32)) > 0.5
    grey, white = to_slices(gm), to_slices(wm)
    other = (1 - grey - white).clamp(min=0)
    tissue = torch.cat([grey, white, other], dim=1).argmax(dim=1) + 1
    labels = torch.where(inside[:, 0], tissue, torch.zeros_like(tissue))
    image = image * inside  # the resize blurs a little intensity outside the brain mask
    z = torch.arange(z_lo, z_hi)

    count = z_hi - z_lo
    sizes = [int(round(f * (count - 2 * gap))) for f in fractions[:2]]
    starts = [0, sizes[0] + gap, sizes[0] + gap + sizes[1] + gap]
    stops = [sizes[0], sizes[0] + gap + sizes[1], count]

    def block(i):
        part = slice(starts[i], stops[i], slice_step)
        return SliceBlock(images=image[part].contiguous(), labels=labels[part].contiguous(), z=z[part])

    return BrainSlices(pretrain=block(0), finetune=block(1), test=block(2), resolution=resolution)
