"""Two aligned views of a batch of 2-D images, from a known, seeded random transform.

The BIMI loss compares the cluster maps of two views pixel to pixel (SPEC §2, §7), so the
caller must bring them into one frame. The convention of this package:

- view 1 is the untransformed image (intensity jitter only); the network's output for it
  (decoder features or cluster probabilities) is then *warped* with the view's transform,
  nearest-neighbour, so no feature or probability is blended: that warped map gives `p1`;
- view 2 is the transformed image (bilinear warp, then intensity jitter); the network's output
  for it gives `p2` directly, already in the transformed frame;
- the loss gets `image = view 2` and `mask` = the pixels the warp did not pad.

Typical use::

    make_views = TwoViewTransform()
    gen = torch.Generator().manual_seed(0)
    views = make_views(images, generator=gen)            # images (B, C, H, W)
    f1 = decoder(views.original)                         # (B, F, H', W'), any H', W'
    f2 = decoder(views.transformed)
    p1 = head(views.align(f1)).softmax(1)                 # f1 warped into view 2's frame (nearest)
    p2 = head(f2).softmax(1)
    loss = BIMILoss()(p1, p2, image=views.transformed, mask=views.mask_like(p2))

Shapes: images and maps are (B, C, H, W); `theta` is (B, 2, 3); masks are (B, 1, H, W), 1.0 on
valid pixels and 0.0 on the padding. The transform is the same for every channel of a sample
and independent between samples. All randomness comes from the `torch.Generator` passed in
(a CPU generator; the parameters are moved to the images' device), so a seed gives the same
views on every run and device.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

__all__ = [
    "AffineParams",
    "TwoViews",
    "TwoViewTransform",
    "affine_theta",
    "random_affine_params",
    "intensity_jitter",
    "validity_mask",
    "warp",
]


@dataclass
class AffineParams:
    """One random affine transform per sample (all tensors have a leading batch dim B).

    rotation    : (B,) radians (see `affine_theta` for the direction)
    scale       : (B,) zoom factor (> 1 enlarges the content)
    translation : (B, 2) shift of the content as a fraction of the image (x, y), in [-1, 1]
    flip        : (B,) bool, mirror left-right (along W) before rotating
    theta       : (B, 2, 3) the matrix for `F.affine_grid` (output -> input, normalised
                  coordinates, align_corners=False) that does all of the above
    """

    rotation: torch.Tensor
    scale: torch.Tensor
    translation: torch.Tensor
    flip: torch.Tensor
    theta: torch.Tensor


def _uniform(n: int, low: float, high: float, generator: Optional[torch.Generator]) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)


def affine_theta(
    rotation: torch.Tensor,
    scale: torch.Tensor,
    translation: torch.Tensor,
    flip: torch.Tensor,
    size: Sequence[int],
) -> torch.Tensor:
    """The (B, 2, 3) `F.affine_grid` matrix (output -> input, normalised coordinates,
    align_corners=False) of given transforms: mirror left-right where `flip` (B,) is True, then
    rotate by `rotation` (B,) radians (positive turns the content from the +x axis (right)
    towards the +y axis (down), i.e. clockwise as displayed with row 0 at the top), zoom by
    `scale` (B,), shift by `translation` (B, 2) = (x, y) fractions of the image size. Rotation
    and zoom are about the image centre and done in pixel space (rigid on non-square images).
    Computed in float64."""
    height, width = int(size[0]), int(size[1])
    rotation, scale = rotation.to(torch.float64).cpu(), scale.to(torch.float64).cpu()
    translation, flip = translation.to(torch.float64).cpu(), flip.cpu().bool()
    batch = rotation.shape[0]
    # Output pixel p samples the input at A p + t. Content turned by +r and zoomed by s means
    # sampling at R(-r) p / s; the mirror, applied to the content first, is applied last here.
    cos, sin = torch.cos(rotation), torch.sin(rotation)
    inverse_rotation = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], -2)
    mirror = torch.ones(batch, 2, dtype=torch.float64)
    mirror[:, 0] = torch.where(flip, -1.0, 1.0)
    a_pixels = mirror[:, :, None] * inverse_rotation / scale[:, None, None]
    # Normalised coordinates are pixels / (W/2, H/2): A_norm = D^-1 A_pix D with D = diag(W, H).
    half = torch.tensor([width / 2, height / 2], dtype=torch.float64)
    a_normalised = a_pixels * half[None, None, :] / half[None, :, None]
    # A content shift of +t (fraction of the size; the normalised span is 2) samples at -2t.
    shift = -2 * torch.einsum("bij,bj->bi", a_normalised, translation)
    return torch.cat([a_normalised, shift[:, :, None]], dim=2)


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
) -> AffineParams:
    """Draw `batch` random affine transforms for images of spatial size `size` = (H, W).

    Rotation is uniform in [-max_rotation, max_rotation] degrees, scale uniform in
    `scale_range`, translation uniform in [-max_translation, max_translation] of the image size
    per axis, and a left-right flip with probability `flip_prob`. The rotation is done in pixel
    space, so it stays rigid on non-square images. Draws on the CPU from `generator`.
    """
    if len(size) != 2:
        raise ValueError(f"size: expected (H, W), got {tuple(size)!r}")
    if not 0.0 <= flip_prob <= 1.0:
        raise ValueError(f"flip_prob: expected a probability in [0, 1], got {flip_prob!r}")
    low, high = scale_range
    if not 0 < low <= high:
        raise ValueError(f"scale_range: expected 0 < low <= high, got {scale_range!r}")
    height, width = int(size[0]), int(size[1])
    rotation = _uniform(batch, -max_rotation, max_rotation, generator) * math.pi / 180
    scale = _uniform(batch, low, high, generator)
    translation = torch.stack(
        [_uniform(batch, -max_translation, max_translation, generator) for _ in range(2)], dim=1
    )
    flip = torch.rand(batch, generator=generator, dtype=torch.float64) < flip_prob

    theta = affine_theta(rotation, scale, translation, flip, (height, width))
    as_out = dict(device=device, dtype=dtype)
    return AffineParams(
        rotation=rotation.to(**as_out),
        scale=scale.to(**as_out),
        translation=translation.to(**as_out),
        flip=flip.to(device=device),
        theta=theta.to(**as_out),
    )


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
    work_dtype = x.dtype if x.is_floating_point() else torch.float32
    grid = F.affine_grid(theta.to(device=x.device, dtype=work_dtype), list(x.shape), align_corners=False)
    out = F.grid_sample(x.to(work_dtype), grid, mode=mode, padding_mode="zeros", align_corners=False)
    return out if x.is_floating_point() else out.round().to(x.dtype)


def validity_mask(theta: torch.Tensor, size: Sequence[int], device=None, dtype=torch.float32) -> torch.Tensor:
    """(B, 1, H, W): 1.0 where a warp with `theta` reads only inside the input, 0.0 where it
    padded (any padded neighbour of a bilinear read counts as padded, so the mask is valid for
    both bilinear and nearest warps)."""
    height, width = int(size[0]), int(size[1])
    grid = F.affine_grid(
        theta.to(device=device, dtype=torch.float32), [theta.shape[0], 1, height, width], align_corners=False
    )
    # Pixel centres lie in [-1 + 1/W, 1 - 1/W]; a bilinear read there touches only inside pixels.
    limit = torch.tensor([1 - 1 / width, 1 - 1 / height], device=grid.device) + 1e-6
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
    noise = torch.randn(image.shape, generator=generator, dtype=torch.float64) * noise_std
    as_image = dict(device=image.device, dtype=image.dtype)
    return (
        image * c.reshape(shape).to(**as_image)
        + (b * spread).reshape(shape).to(**as_image)
        + noise.to(**as_image) * spread.reshape(shape).to(**as_image)
    )


@dataclass
class TwoViews:
    """The two views of a batch and how they are aligned.

    original    : (B, C, H, W) view 1, the untransformed image (intensity jitter only)
    transformed : (B, C, H, W) view 2, the warped (bilinear) and jittered image
    params      : the AffineParams of the warp (view 1 frame -> view 2 frame)
    mask        : (B, 1, H, W) 1.0 where view 2 is not padding
    """

    original: torch.Tensor
    transformed: torch.Tensor
    params: AffineParams
    mask: torch.Tensor

    def align(self, maps: torch.Tensor) -> torch.Tensor:
        """Bring maps computed from view 1 (B, F, H', W') into view 2's frame: the same warp,
        nearest-neighbour, at the maps' own resolution."""
        return warp(maps, self.params.theta, mode="nearest")

    def mask_like(self, maps: torch.Tensor) -> torch.Tensor:
        """The validity mask (B, 1, H', W') at the resolution of `maps`."""
        if tuple(maps.shape[2:]) == tuple(self.mask.shape[2:]):
            return self.mask.to(maps.device)
        return validity_mask(self.params.theta, maps.shape[2:], device=maps.device)


class TwoViewTransform:
    """Seeded two-view augmentation for BIMI pre-training on 2-D images (B, C, H, W).

    Random affine (rotation, scale, translation) and left-right flip for view 2, bilinear;
    intensity jitter on both views' images only (never on maps). See the module docstring for
    how the views feed the loss. Set `flip_prob=0` for images without left-right symmetry.
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
    ):
        self.max_rotation = max_rotation
        self.scale_range = scale_range
        self.max_translation = max_translation
        self.flip_prob = flip_prob
        self.brightness = brightness
        self.contrast = contrast
        self.noise_std = noise_std

    def sample(self, image: torch.Tensor, generator: Optional[torch.Generator] = None) -> AffineParams:
        """Draw the affine parameters for a batch like `image` (no warping)."""
        return random_affine_params(
            image.shape[0],
            image.shape[2:],
            max_rotation=self.max_rotation,
            scale_range=self.scale_range,
            max_translation=self.max_translation,
            flip_prob=self.flip_prob,
            generator=generator,
            device=image.device,
            dtype=image.dtype if image.is_floating_point() else torch.float32,
        )

    def jitter(self, image: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return intensity_jitter(image, self.brightness, self.contrast, self.noise_std, generator)

    def __call__(self, image: torch.Tensor, generator: Optional[torch.Generator] = None) -> TwoViews:
        if image.dim() != 4:
            raise ValueError(f"image: expected a (B, C, H, W) tensor, got shape {tuple(image.shape)}")
        params = self.sample(image, generator)
        original = self.jitter(image, generator)
        transformed = self.jitter(warp(image, params.theta, mode="bilinear"), generator)
        mask = validity_mask(params.theta, image.shape[2:], device=image.device, dtype=image.dtype)
        return TwoViews(original=original, transformed=transformed, params=params, mask=mask)
