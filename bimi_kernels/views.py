"""Two aligned views of a batch of 2-D images, from a known, seeded random transform.

The BIMI loss compares the cluster maps of two views pixel to pixel (docs/contract.md §2), so the
caller must bring them into one frame. The convention of this package:

- view 1 is the untransformed image (intensity jitter only); the network's output for it
  (decoder features or cluster probabilities) is then *warped* with the view's transform,
  nearest-neighbour, so no feature or probability is blended: that warped map gives `p1`;
- view 2 is the transformed image (bilinear warp, then intensity jitter); the network's output
  for it gives `p2` directly, already in the transformed frame;
- the loss gets `image = view 2` and `mask` = the pixels the warp between the views did not pad
  (a shared transform's padding is in both views alike and is not masked).

Typical use::

    make_views = TwoViewTransform()
    gen = torch.Generator().manual_seed(0)
    views = make_views(images, generator=gen)            # images (B, C, H, W)
    f1 = decoder(views.original)                         # (B, F, H', W'), any H', W'
    f2 = decoder(views.transformed)
    p1 = head(views.align(f1)).softmax(1)                 # f1 warped into view 2's frame (nearest)
    p2 = head(f2).softmax(1)
    loss = BIMILoss()(p1, p2, image=views.transformed, mask=views.mask_like(p2))

Two named settings (`VIEW_SETTINGS`, `TwoViewTransform.named(name)`):

- ``"mild"`` (the default of `TwoViewTransform()`): view 2 rotated by up to 15 degrees, zoomed
  by 0.9-1.1, shifted by up to 0.1 of the image, mirrored left-right with probability 0.5;
  both views get a small additive brightness / contrast jitter and pixel noise.
- ``"authors"``: the augmentation of the BIMI authors' training code (their Contrast-You
  repository's augmentation and training loop): one random geometric transform
  shared by both views (rotation up to 45 degrees, a mirror on each axis with probability
  0.5, a shift of up to 0.05 of the image: their loader's rotate / flip / crop), a
  brightness and a contrast factor drawn in [0.5, 1.5] for each view separately (their
  colour jitter), then for view 2 only a gamma correction ``x ** g`` with g uniform in
  [0.5, 2] and the warp between the views: rotation up to 45 degrees, zoom 0.8-1.3, shift up
  to 0.1 of the image, and with probability 0.9 a mirror along one axis picked at random.
  Intensity changes come before the warp, as in their code. Their images are [0, 1]
  intensities; the colour jitter clamps to that range so the gamma is defined, and an image
  outside it (raw scanner units, z-scores) is refused with a ValueError rather than cut.

Shapes: images and maps are (B, C, H, W); `theta` is (B, 2, 3); masks are (B, 1, H, W), 1.0 on
valid pixels and 0.0 on the padding. The transform is the same for every channel of a sample
and independent between samples. All randomness comes from the `torch.Generator` passed in
(a CPU generator; the parameters are moved to the images' device), so a seed gives the same
views on every run and device.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

__all__ = [
    "VIEW_SETTINGS",
    "AffineParams",
    "TwoViews",
    "TwoViewTransform",
    "affine_theta",
    "compose_theta",
    "random_affine_params",
    "intensity_jitter",
    "colour_jitter",
    "gamma_correction",
    "validity_mask",
    "warp",
]


@dataclass
class AffineParams:
    """One random affine transform per sample (all tensors have a leading batch dim B).

    rotation      : (B,) radians (see `affine_theta` for the direction)
    scale         : (B,) zoom factor (> 1 enlarges the content)
    translation   : (B, 2) shift of the content as a fraction of the image (x, y), in [-1, 1]
    flip          : (B,) bool, mirror left-right (along W) before rotating
    theta         : (B, 2, 3) the matrix for `F.affine_grid` (output -> input, normalised
                    coordinates, align_corners=False) that does all of the above
    flip_vertical : (B,) bool, mirror up-down (along H) before rotating; None means never
    """

    rotation: torch.Tensor
    scale: torch.Tensor
    translation: torch.Tensor
    flip: torch.Tensor
    theta: torch.Tensor
    flip_vertical: Optional[torch.Tensor] = None


def _uniform(n: int, low: float, high: float, generator: Optional[torch.Generator]) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64, device="cpu")


def affine_theta(
    rotation: torch.Tensor,
    scale: torch.Tensor,
    translation: torch.Tensor,
    flip: torch.Tensor,
    size: Sequence[int],
    flip_vertical: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The (B, 2, 3) `F.affine_grid` matrix (output -> input, normalised coordinates,
    align_corners=False) of given transforms: mirror left-right where `flip` (B,) is True and
    up-down where `flip_vertical` (B,) is True, then rotate by `rotation` (B,) radians
    (positive turns the content from the +x axis (right) towards the +y axis (down), i.e.
    clockwise as displayed with row 0 at the top), zoom by `scale` (B,), shift by `translation`
    (B, 2) = (x, y) fractions of the image size. Rotation and zoom are about the image centre
    and done in pixel space (rigid on non-square images). Computed in float64."""
    height, width = int(size[0]), int(size[1])
    rotation, scale = rotation.to(torch.float64).cpu(), scale.to(torch.float64).cpu()
    translation, flip = translation.to(torch.float64).cpu(), flip.cpu().bool()
    batch = rotation.shape[0]
    # Output pixel p samples the input at A p + t. Content turned by +r and zoomed by s means
    # sampling at R(-r) p / s; the mirror, applied to the content first, is applied last here.
    cos, sin = torch.cos(rotation), torch.sin(rotation)
    inverse_rotation = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], -2)
    mirror = torch.ones(batch, 2, dtype=torch.float64, device="cpu")
    mirror[:, 0] = torch.where(flip, -1.0, 1.0)
    if flip_vertical is not None:
        mirror[:, 1] = torch.where(flip_vertical.cpu().bool(), -1.0, 1.0)
    a_pixels = mirror[:, :, None] * inverse_rotation / scale[:, None, None]
    # Normalised coordinates are pixels / (W/2, H/2): A_norm = D^-1 A_pix D with D = diag(W, H).
    half = torch.tensor([width / 2, height / 2], dtype=torch.float64, device="cpu")
    a_normalised = a_pixels * half[None, None, :] / half[None, :, None]
    # A content shift of +t (fraction of the size; the normalised span is 2) samples at -2t.
    shift = -2 * torch.einsum("bij,bj->bi", a_normalised, translation)
    return torch.cat([a_normalised, shift[:, :, None]], dim=2)


def compose_theta(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """The single (B, 2, 3) `theta` of warping with `first`, then warping the result with
    `second` (both output -> input matrices on images of one size): output pixel p reads the
    first warp's output at S p + s, which read the input at F (S p + s) + f."""
    f_matrix, f_shift = first[:, :, :2], first[:, :, 2:]
    s_matrix, s_shift = second[:, :, :2], second[:, :, 2:]
    return torch.cat([f_matrix @ s_matrix, f_matrix @ s_shift + f_shift], dim=2)


def random_affine_params(
    batch: int,
    size: Sequence[int],
    max_rotation: float = 15.0,
    scale_range: Tuple[float, float] = (0.9, 1.1),
    max_translation: float = 0.1,
    flip_prob: float = 0.5,
    generator: Optional[torch.Generator] = None,
    device=None,
    dtype: torch.dtype = torch.float32,
    vertical_flip_prob: float = 0.0,
    mirror_prob: float = 0.0,
) -> AffineParams:
    """Draw `batch` random affine transforms for images of spatial size `size` = (H, W).

    Rotation is uniform in [-max_rotation, max_rotation] degrees, scale uniform in
    `scale_range`, translation uniform in [-max_translation, max_translation] of the image size
    per axis, a left-right flip with probability `flip_prob` and an up-down flip with
    probability `vertical_flip_prob` (independent draws), and with probability `mirror_prob`
    one more mirror along one axis picked with equal chance (the authors' "mirror on either
    axis"; it toggles the flip already drawn on that axis). The rotation is done in pixel
    space, so it stays rigid on non-square images. Draws on the CPU from `generator`; with the
    default `vertical_flip_prob=0` and `mirror_prob=0` the draws are those of earlier versions.
    """
    if len(size) != 2:
        raise ValueError(f"size: expected (H, W), got {tuple(size)!r}")
    for name, value in (("flip_prob", flip_prob), ("vertical_flip_prob", vertical_flip_prob),
                        ("mirror_prob", mirror_prob)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name}: expected a probability in [0, 1], got {value!r}")
    low, high = scale_range
    if not 0 < low <= high:
        raise ValueError(f"scale_range: expected 0 < low <= high, got {scale_range!r}")
    height, width = int(size[0]), int(size[1])
    rotation = _uniform(batch, -max_rotation, max_rotation, generator) * math.pi / 180
    scale = _uniform(batch, low, high, generator)
    translation = torch.stack(
        [_uniform(batch, -max_translation, max_translation, generator) for _ in range(2)], dim=1
    )
    flip = torch.rand(batch, generator=generator, dtype=torch.float64, device="cpu") < flip_prob
    flip_vertical = None
    if vertical_flip_prob > 0 or mirror_prob > 0:
        flip_vertical = torch.rand(batch, generator=generator, dtype=torch.float64, device="cpu") < vertical_flip_prob
        mirrored = torch.rand(batch, generator=generator, dtype=torch.float64, device="cpu") < mirror_prob
        on_vertical = torch.rand(batch, generator=generator, dtype=torch.float64, device="cpu") < 0.5
        flip = flip ^ (mirrored & ~on_vertical)
        flip_vertical = flip_vertical ^ (mirrored & on_vertical)

    theta = affine_theta(rotation, scale, translation, flip, (height, width), flip_vertical)
    as_out = dict(device=device, dtype=dtype)
    return AffineParams(
        rotation=rotation.to(**as_out),
        scale=scale.to(**as_out),
        translation=translation.to(**as_out),
        flip=flip.to(device=device),
        theta=theta.to(**as_out),
        flip_vertical=None if flip_vertical is None else flip_vertical.to(device=device),
    )


def geometry_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the transforms and sampling grids for images of `dtype`: float64 for
    float64, float32 otherwise (float16 and bfloat16 cannot place a pixel: bfloat16 has 8
    significant bits)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def warp(x: torch.Tensor, theta: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Resample `x` (B, C, H, W) with the affine `theta` (B, 2, 3); zero padding outside.

    `mode="bilinear"` for images, `"nearest"` for features, probabilities and label maps (no
    blending of values from different pixels). The output has the size of `x`; the transform is
    defined in normalised coordinates, so one `theta` fits maps of any resolution.
    """
    if x.dim() != 4:
        raise ValueError(f"x: expected a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
    if theta.shape != (x.shape[0], 2, 3):
        raise ValueError(f"theta: expected shape ({x.shape[0]}, 2, 3), got {tuple(theta.shape)}")
    if mode not in ("bilinear", "nearest"):
        raise ValueError(f"mode: expected 'bilinear' or 'nearest', got {mode!r}")
    work_dtype = geometry_dtype(x.dtype)  # a bfloat16 grid is off by up to half a pixel
    grid = F.affine_grid(theta.to(device=x.device, dtype=work_dtype), list(x.shape), align_corners=False)
    out = F.grid_sample(x.to(work_dtype), grid, mode=mode, padding_mode="zeros", align_corners=False)
    return out.to(x.dtype) if x.is_floating_point() else out.round().to(x.dtype)


def validity_mask(theta: torch.Tensor, size: Sequence[int], device=None, dtype=torch.float32) -> torch.Tensor:
    """(B, 1, H, W): 1.0 where a warp with `theta` reads only inside the input, 0.0 where it
    padded (any padded neighbour of a bilinear read counts as padded, so the mask is valid for
    both bilinear and nearest warps)."""
    if len(size) != 2:
        raise ValueError(f"size: expected (H, W), got {tuple(size)}")
    height, width = int(size[0]), int(size[1])
    work_dtype = geometry_dtype(theta.dtype)  # the grid `warp` computes for the same theta
    grid = F.affine_grid(
        theta.to(device=device, dtype=work_dtype), [theta.shape[0], 1, height, width], align_corners=False
    )
    # Pixel centres lie in [-1 + 1/W, 1 - 1/W]; a bilinear read there touches only inside pixels.
    # The slack (about 8 ulp of 1) admits a centre that rounding put just outside; beyond it a
    # read would take a padded neighbour with a weight above the grid dtype's precision.
    slack = 1e-6 if work_dtype == torch.float32 else 8 * torch.finfo(work_dtype).eps
    limit = torch.tensor([1 - 1 / width, 1 - 1 / height], device=grid.device, dtype=work_dtype) + slack
    inside = (grid.abs() <= limit).all(dim=-1)
    return inside[:, None].to(dtype)


def intensity_jitter(
    image: torch.Tensor,
    brightness: float = 0.1,
    contrast: float = 0.2,
    noise_std: float = 0.01,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """`image * c + b + noise` per sample: contrast c uniform in [1 - contrast, 1 + contrast],
    brightness b uniform in [-brightness, brightness] times the sample's intensity range,
    Gaussian noise of `noise_std` times that range. Returns a new tensor (B, C, H, W)."""
    batch = image.shape[0]
    shape = (batch,) + (1,) * (image.dim() - 1)
    c = _uniform(batch, 1 - contrast, 1 + contrast, generator)
    b = _uniform(batch, -brightness, brightness, generator)
    flat = image.detach().flatten(1)
    spread = (flat.max(dim=1).values - flat.min(dim=1).values).to(torch.float64).cpu()
    noise = torch.randn(image.shape, generator=generator, dtype=torch.float64, device="cpu") * noise_std
    as_image = dict(device=image.device, dtype=image.dtype)
    return (
        image * c.reshape(shape).to(**as_image)
        + (b * spread).reshape(shape).to(**as_image)
        + noise.to(**as_image) * spread.reshape(shape).to(**as_image)
    )


def colour_jitter(
    image: torch.Tensor,
    brightness: Tuple[float, float] = (0.5, 1.5),
    contrast: Tuple[float, float] = (0.5, 1.5),
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Brightness and contrast factors per sample, as torchvision's ColorJitter does on a grey
    image in [0, 1]: ``x * b`` clamped to [0, 1], then ``m + c (x - m)`` clamped to [0, 1],
    with m the sample's mean; b uniform in `brightness`, c uniform in `contrast`. (B, C, H, W)."""
    batch = image.shape[0]
    shape = (batch,) + (1,) * (image.dim() - 1)
    as_image = dict(device=image.device, dtype=image.dtype)
    b = _uniform(batch, brightness[0], brightness[1], generator).reshape(shape).to(**as_image)
    c = _uniform(batch, contrast[0], contrast[1], generator).reshape(shape).to(**as_image)
    out = (image * b).clamp(0, 1)
    mean = out.flatten(1).mean(dim=1).reshape(shape)
    return (mean + c * (out - mean)).clamp(0, 1)


def _check_unit_range(image: torch.Tensor) -> None:
    """The colour jitter and the gamma are defined on intensities in [0, 1] (they clamp to it):
    an image in other units (raw scanner values, z-scores) would be cut in silence. One read of
    the image's range (a device sync on a GPU, once per batch)."""
    low, high = (float(v) for v in torch.aminmax(image.detach()))
    slack = 1e-3  # interpolation and normalisation leave values a rounding outside [0, 1]
    if not (low >= -slack and high <= 1 + slack):
        raise ValueError(
            f"image: the colour jitter and gamma of this view setting expect intensities in [0, 1] "
            f"(they clamp to it), got values in [{low:.4g}, {high:.4g}]; rescale each image first, "
            "e.g. (x - x.min()) / (x.max() - x.min()), or use a setting without them (\"mild\")")


def gamma_correction(
    image: torch.Tensor, gamma_range: Tuple[float, float] = (0.5, 2.0), generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """``x ** g`` per sample with g uniform in `gamma_range`; `image` must be >= 0 (intensities
    in [0, 1]). (B, C, H, W)."""
    batch = image.shape[0]
    shape = (batch,) + (1,) * (image.dim() - 1)
    g = _uniform(batch, gamma_range[0], gamma_range[1], generator).reshape(shape)
    return image.clamp(min=0) ** g.to(device=image.device, dtype=image.dtype)


@dataclass
class TwoViews:
    """The two views of a batch and how they are aligned.

    original    : (B, C, H, W) view 1: the image after the shared transform (if any) and view
                  1's intensity changes
    transformed : (B, C, H, W) view 2: the image after the shared transform (if any), view 2's
                  intensity changes, and the warp (bilinear)
    params      : the AffineParams of the warp (view 1 frame -> view 2 frame)
    mask        : (B, 1, H, W) 1.0 where the warp between the views read inside its input (the
                  shared transform's padding is in both views alike and counts as valid)
    shared      : the AffineParams of the transform applied to both views first (data
                  augmentation; it needs no alignment), or None
    """

    original: torch.Tensor
    transformed: torch.Tensor
    params: AffineParams
    mask: torch.Tensor
    shared: Optional[AffineParams] = None

    def align(self, maps: torch.Tensor) -> torch.Tensor:
        """Bring maps computed from view 1 (B, F, H', W') into view 2's frame: the same warp,
        nearest-neighbour, at the maps' own resolution."""
        return warp(maps, self.params.theta, mode="nearest")

    def mask_like(self, maps: torch.Tensor) -> torch.Tensor:
        """The validity mask (B, 1, H', W') at the resolution of `maps`, in the dtype of `mask`."""
        if maps.dim() != 4 or maps.shape[0] != self.mask.shape[0]:
            raise ValueError(f"maps: expected a ({self.mask.shape[0]}, F, H', W') tensor (the views are 2-D), "
                             f"got shape {tuple(maps.shape)}")
        if tuple(maps.shape[2:]) == tuple(self.mask.shape[2:]):
            return self.mask.to(maps.device)
        return validity_mask(self.params.theta, maps.shape[2:], device=maps.device, dtype=self.mask.dtype)

    def labels_in_view2(self, labels: torch.Tensor) -> torch.Tensor:
        """A label map (B, H, W) of the untransformed images, carried into view 2's frame
        (nearest; padding gets label 0), e.g. to draw the ground truth next to p2."""
        theta = self.params.theta if self.shared is None else compose_theta(self.shared.theta, self.params.theta)
        return warp(labels[:, None], theta, mode="nearest")[:, 0]

    def to(self, device) -> "TwoViews":
        """The images and mask on `device` (the parameters stay where they are)."""
        return replace(self, original=self.original.to(device), transformed=self.transformed.to(device),
                       mask=self.mask.to(device))


# The named settings: keyword arguments of `TwoViewTransform` (see the module docstring).
VIEW_SETTINGS: Dict[str, Dict[str, Any]] = {
    "mild": dict(max_rotation=15.0, scale_range=(0.9, 1.1), max_translation=0.1, flip_prob=0.5,
                 brightness=0.1, contrast=0.2, noise_std=0.01),
    "authors": dict(
        # shared by both views: the loader's rotate / flip / crop
        shared_rotation=45.0, shared_flip_prob=0.5, shared_translation=0.05,
        # each view: colour jitter factors; no additive jitter, no noise
        brightness_factor=(0.5, 1.5), contrast_factor=(0.5, 1.5), brightness=0.0, contrast=0.0, noise_std=0.0,
        # view 2 only: gamma, then the warp between the views
        gamma_range=(0.5, 2.0), max_rotation=45.0, scale_range=(0.8, 1.3), max_translation=0.1,
        flip_prob=0.0, mirror_prob=0.9,
    ),
}


class TwoViewTransform:
    """Seeded two-view augmentation for BIMI pre-training on 2-D images (B, C, H, W).

    Optionally a geometric transform shared by both views first (`shared_*`; data
    augmentation). Then, per view, multiplicative colour jitter (`brightness_factor`,
    `contrast_factor`, when given), and for view 2 a gamma correction (`gamma_range`, when
    given) and the random affine warp (rotation, scale, translation, left-right flip
    `flip_prob`, one-axis mirror `mirror_prob`), bilinear; last, the additive intensity jitter
    and noise (`brightness`, `contrast`, `noise_std`) on each view's image. Intensity changes
    touch images only, never maps. The defaults are the ``"mild"`` setting; `named("authors")`
    gives the authors' setting (see the module docstring). Set `flip_prob=0` for images
    without left-right symmetry.
    """

    def __init__(
        self,
        max_rotation: float = 15.0,
        scale_range: Tuple[float, float] = (0.9, 1.1),
        max_translation: float = 0.1,
        flip_prob: float = 0.5,
        brightness: float = 0.1,
        contrast: float = 0.2,
        noise_std: float = 0.01,
        *,
        mirror_prob: float = 0.0,
        gamma_range: Optional[Tuple[float, float]] = None,
        brightness_factor: Optional[Tuple[float, float]] = None,
        contrast_factor: Optional[Tuple[float, float]] = None,
        shared_rotation: float = 0.0,
        shared_flip_prob: float = 0.0,
        shared_translation: float = 0.0,
    ):
        self.max_rotation = max_rotation
        self.scale_range = scale_range
        self.max_translation = max_translation
        self.flip_prob = flip_prob
        self.brightness = brightness
        self.contrast = contrast
        self.noise_std = noise_std
        self.mirror_prob = mirror_prob
        self.gamma_range = gamma_range
        self.brightness_factor = brightness_factor
        self.contrast_factor = contrast_factor
        self.shared_rotation = shared_rotation
        self.shared_flip_prob = shared_flip_prob
        self.shared_translation = shared_translation
        self.name = "custom"

    @classmethod
    def named(cls, name: str, **overrides) -> "TwoViewTransform":
        """The setting `name` of `VIEW_SETTINGS` ("mild" or "authors"), with `overrides`."""
        if name not in VIEW_SETTINGS:
            raise ValueError(f"name: expected one of {sorted(VIEW_SETTINGS)}, got {name!r}")
        transform = cls(**{**VIEW_SETTINGS[name], **overrides})
        transform.name = name if not overrides else f"{name} with {overrides}"
        return transform

    @property
    def has_shared(self) -> bool:
        return bool(self.shared_rotation or self.shared_flip_prob or self.shared_translation)

    def describe(self) -> str:
        """One line: what the views get."""
        parts = []
        if self.has_shared:
            parts.append(f"shared by both views: rotation ±{self.shared_rotation:g}°, mirror per axis p "
                         f"{self.shared_flip_prob:g}, shift ±{self.shared_translation:g}")
        if self.brightness_factor or self.contrast_factor:
            parts.append(f"per view: brightness × U{tuple(self.brightness_factor or (1, 1))}, "
                         f"contrast × U{tuple(self.contrast_factor or (1, 1))}")
        warp_text = (f"view 2: rotation ±{self.max_rotation:g}°, scale {self.scale_range[0]:g}-{self.scale_range[1]:g}, "
                     f"shift ±{self.max_translation:g}")
        if self.flip_prob:
            warp_text += f", left-right flip p {self.flip_prob:g}"
        if self.mirror_prob:
            warp_text += f", mirror on a random axis p {self.mirror_prob:g}"
        if self.gamma_range:
            warp_text = f"view 2: gamma U{tuple(self.gamma_range)}, " + warp_text[len("view 2: "):]
        parts.append(warp_text)
        if self.brightness or self.contrast or self.noise_std:
            parts.append(f"both views: brightness ±{self.brightness:g}, contrast ±{self.contrast:g}, "
                         f"noise {self.noise_std:g}")
        return f"{self.name}: " + "; ".join(parts)

    def sample(self, image: torch.Tensor, generator: Optional[torch.Generator] = None) -> AffineParams:
        """Draw the parameters of the warp between the views for a batch like `image` (no warping)."""
        return random_affine_params(
            image.shape[0],
            image.shape[2:],
            max_rotation=self.max_rotation,
            scale_range=self.scale_range,
            max_translation=self.max_translation,
            flip_prob=self.flip_prob,
            generator=generator,
            device=image.device,
            dtype=geometry_dtype(image.dtype),
            mirror_prob=self.mirror_prob,
        )

    def sample_shared(self, image: torch.Tensor, generator: Optional[torch.Generator] = None) -> AffineParams:
        """Draw the transform shared by both views (rotation, a mirror per axis, shift; no zoom)."""
        return random_affine_params(
            image.shape[0], image.shape[2:], max_rotation=self.shared_rotation, scale_range=(1.0, 1.0),
            max_translation=self.shared_translation, flip_prob=self.shared_flip_prob,
            vertical_flip_prob=self.shared_flip_prob, generator=generator, device=image.device,
            dtype=geometry_dtype(image.dtype),
        )

    def jitter(self, image: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """The additive intensity jitter and noise of one view (no-op when all are 0)."""
        if not (self.brightness or self.contrast or self.noise_std):
            return image
        return intensity_jitter(image, self.brightness, self.contrast, self.noise_std, generator)

    def _before_warp(self, image: torch.Tensor, generator, view: int) -> torch.Tensor:
        if self.brightness_factor or self.contrast_factor:
            image = colour_jitter(image, self.brightness_factor or (1.0, 1.0), self.contrast_factor or (1.0, 1.0), generator)
        if view == 2 and self.gamma_range:
            image = gamma_correction(image, self.gamma_range, generator)
        return image

    def __call__(self, image: torch.Tensor, generator: Optional[torch.Generator] = None) -> TwoViews:
        if image.dim() != 4:
            raise ValueError(f"image: expected a (B, C, H, W) tensor, got shape {tuple(image.shape)}")
        if not image.is_floating_point():  # the intensity changes need real values
            raise TypeError(f"image: expected a floating-point image, got {image.dtype} (convert it, e.g. "
                            "image.float() / 255)")
        if self.brightness_factor or self.contrast_factor or self.gamma_range:
            _check_unit_range(image)
        params = self.sample(image, generator)
        shared = None
        if self.has_shared:
            shared = self.sample_shared(image, generator)
            image = warp(image, shared.theta, mode="bilinear")
        original = self.jitter(self._before_warp(image, generator, view=1), generator)
        view2 = self._before_warp(image, generator, view=2)
        transformed = self.jitter(warp(view2, params.theta, mode="bilinear"), generator)
        mask = validity_mask(params.theta, image.shape[2:], device=image.device, dtype=image.dtype)
        return TwoViews(original=original, transformed=transformed, params=params, mask=mask, shared=shared)
