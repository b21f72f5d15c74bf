"""Spatial tiles shared by the joint-count and boundary kernels: the host-side geometry and the
@triton.jit helpers that decode a tile, test pixels and partners, and address the maps.

A tile is a TILE_D x TILE_H x TILE_W box (powers of two) of one sample; 2-D maps are 3-D ones
with D = 1 (and TILE_D = 1). Pixel p of a tile sits at (z0 + p // (TILE_H TILE_W),
y0 + p // TILE_W % TILE_H, x0 + p % TILE_W), so the pixels along x are consecutive lanes
(coalesced loads) and the partners that an offset or a box window reaches from a tile are the
neighbouring tiles' pixels, which the L1/L2 caches still hold.

Index arithmetic: a sample's base address is always formed in 64 bits (`sample_pointer`); within
a sample, offsets and coordinates are 32-bit unless the launcher found that one can pass 2^31
(`needs_wide_index`), then the kernels are compiled with WIDE=True and every per-element offset
and tile coordinate is 64-bit (a sample run flat, as (1, 1, N), has x up to N).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence, Tuple

import triton
import triton.language as tl

INT32_LIMIT = 2**31


def next_power_of_2(value: int) -> int:
    return 1 << max(0, int(value) - 1).bit_length()


class Tile(NamedTuple):
    """Tile shape (powers of two) and how many tiles cover each spatial dim."""

    depth: int
    height: int
    width: int
    tiles_z: int
    tiles_y: int
    tiles_x: int

    @property
    def pixels(self) -> int:
        return self.depth * self.height * self.width

    @property
    def per_sample(self) -> int:
        return self.tiles_z * self.tiles_y * self.tiles_x


def make_tile(dims: Tuple[int, int, int], pixels: int, min_pixels: int = 16,
              max_width: int = 64, max_height_3d: int = 8) -> Tile:
    """The tile of about `pixels` pixels for a (D, H, W) sample: as wide as the sample allows
    (up to `max_width`, for coalesced rows), then as tall (up to `max_height_3d` in a volume,
    so that a tile spans slices too), then as deep; at least `min_pixels` pixels (tl.dot's
    minimum on a GPU), the surplus masked off."""
    depth, height, width = (int(v) for v in dims)
    pixels = max(next_power_of_2(pixels), next_power_of_2(min_pixels))
    tile_w = min(next_power_of_2(width), max_width, pixels)
    tile_h = min(next_power_of_2(height), pixels // tile_w)
    if depth > 1:
        tile_h = min(tile_h, max_height_3d)
    tile_d = min(next_power_of_2(depth), pixels // (tile_w * tile_h))
    while tile_d * tile_h * tile_w < min_pixels:  # a sample smaller than the minimum
        tile_w *= 2
    return Tile(
        tile_d, tile_h, tile_w,
        triton.cdiv(depth, tile_d), triton.cdiv(height, tile_h), triton.cdiv(width, tile_w),
    )


def with_tile_shape(dims: Tuple[int, int, int], shape: Sequence[int]) -> Tile:
    """A tile of an explicit (TILE_D, TILE_H, TILE_W) shape (tests, tuning)."""
    tile_d, tile_h, tile_w = (int(v) for v in shape)
    for name, value in zip(("depth", "height", "width"), (tile_d, tile_h, tile_w)):
        if value < 1 or value & (value - 1):
            raise ValueError(f"tile {name}: expected a power of two, got {value}")
    if tile_d * tile_h * tile_w < 16:  # tl.dot's smallest dimension on a GPU (make_tile's minimum)
        raise ValueError(f"tile: expected at least 16 pixels, got {tile_d} x {tile_h} x {tile_w}")
    depth, height, width = dims
    if depth == 1 and tile_d != 1:  # a 2-D map (depth 1): the kernels test no z bound there
        raise ValueError(f"tile depth: expected 1 for a 2-D map (or a volume of depth 1), got {tile_d}")
    return Tile(tile_d, tile_h, tile_w,
                triton.cdiv(depth, tile_d), triton.cdiv(height, tile_h), triton.cdiv(width, tile_w))


# Positions the kernels form before masking them run up to one run, tile or block (a power of two
# of a few thousand pixels at most) past the extent they are tested against (`s < N`, `x < W`): a
# 32-bit position must have that much room below 2^31, or it wraps to a negative value that
# passes the test.
INDEX_HEADROOM = 2**16


def needs_wide_index(*extents: int) -> bool:
    """True when an offset within a sample (the largest of `extents`, in elements), or a position
    up to INDEX_HEADROOM past it, can pass 2^31: the kernels then compute per-element offsets in
    64 bits."""
    return max(int(v) for v in extents) > INT32_LIMIT - INDEX_HEADROOM


def map_extent(channels: int, channel_stride: int, spatial_pixels: int) -> int:
    """One past the largest element offset within one sample of a map whose C channels sit
    `channel_stride` elements apart and whose spatial dims are dense."""
    return (int(channels) - 1) * int(channel_stride) + int(spatial_pixels)


# ------------------------------------------------------------------------------------------------
# @triton.jit helpers
# ------------------------------------------------------------------------------------------------
@triton.jit
def grid_position():
    """(this program's index on grid axis 0, its index on axis 1, the programs on axis 1). Axis 0
    carries the batch (or a chunk of partner rows): it allows 2^31 - 1 programs, axis 1 at most
    65535, so the programs per sample go there."""
    return tl.program_id(0), tl.program_id(1), tl.num_programs(1)


@triton.jit
def channel_offsets(k, stride_k, WIDE: tl.constexpr):
    """Offsets of channels k for a channel stride, in 64 bits where one can pass 2^31 (WIDE)."""
    if WIDE:
        offsets = k.to(tl.int64) * stride_k
    else:
        offsets = k * stride_k
    return offsets


@triton.jit
def channel_axis(K, K_PAD: tl.constexpr, stride_k, WIDE: tl.constexpr):
    """The channel index k (0 .. K_PAD - 1, a power of two), which of them are real (k < K), and
    their offsets for a channel stride."""
    k = tl.arange(0, K_PAD)
    return k, k < K, channel_offsets(k, stride_k, WIDE)


@triton.jit
def run_pixels(run, N, BLOCK: tl.constexpr, WIDE: tl.constexpr):
    """The pixels (flat offsets in a sample) of run `run` of BLOCK consecutive ones, in 64 bits
    where they can pass 2^31 (WIDE), and which of them lie inside the sample's N."""
    if WIDE:
        s = tl.cast(run, tl.int64) * BLOCK + tl.arange(0, BLOCK)
    else:
        s = run * BLOCK + tl.arange(0, BLOCK)
    return s, s < N


@triton.jit
def sample_pointer(ptr, b, stride_b):
    """Base address of sample b: the product in 64 bits whatever the types of b and stride_b."""
    return ptr + tl.cast(b, tl.int64) * stride_b


@triton.jit
def tile_origin(tile, tiles_z, tiles_y, tiles_x,
                TILE_D: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr):
    """(b, z0, y0, x0) of a tile; tiles are numbered x fastest, then y, z, and the sample."""
    tile_x = tile % tiles_x
    rest = tile // tiles_x
    tile_y = rest % tiles_y
    rest = rest // tiles_y
    tile_z = rest % tiles_z
    return rest // tiles_z, tile_z * TILE_D, tile_y * TILE_H, tile_x * TILE_W


@triton.jit
def tile_pixels(TILE_D: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr):
    """The (dz, dy, dx) of each pixel of a tile from its origin, x fastest."""
    p = tl.arange(0, TILE_D * TILE_H * TILE_W)
    return p // (TILE_H * TILE_W), (p // TILE_W) % TILE_H, p % TILE_W


@triton.jit
def plane_size(H, W, WIDE: tl.constexpr):
    """H W, in 64 bits where a (z, y, x) offset can pass 2^31 (WIDE)."""
    if WIDE:
        return tl.cast(H, tl.int64) * W
    else:
        return H * W


@triton.jit
def pixel_offset(z, y, x, H, W, WIDE: tl.constexpr):
    """Offset of pixel (z, y, x) in a dense (D, H, W) block: (z H + y) W + x."""
    if WIDE:
        return (z.to(tl.int64) * H + y) * W + x
    else:
        return (z * H + y) * W + x


@triton.jit
def pixel_inside(z, y, x, D, H, W, IS_3D: tl.constexpr):
    """Which pixels of a tile lie in the sample (the last tiles of a dim overhang it)."""
    inside = (y < H) & (x < W)
    if IS_3D:
        inside = inside & (z < D)
    return inside


@triton.jit
def tile_geometry(tile, tiles_z, tiles_y, tiles_x, D, H, W,
                  TILE_D: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr,
                  IS_3D: tl.constexpr, WIDE: tl.constexpr):
    """Everything a kernel needs of one tile: its sample b and origin (z0, y0, x0), its pixels'
    coordinates, their offsets s within the sample and which of them lie in the sample. WIDE:
    the coordinates too are 64-bit (a sample run flat, as (1, 1, N), has x up to N)."""
    if WIDE:
        tile = tl.cast(tile, tl.int64)
    b, z0, y0, x0 = tile_origin(tile, tiles_z, tiles_y, tiles_x, TILE_D, TILE_H, TILE_W)
    tz, ty, tx = tile_pixels(TILE_D, TILE_H, TILE_W)
    z = z0 + tz
    y = y0 + ty
    x = x0 + tx
    s = pixel_offset(z, y, x, H, W, WIDE)
    return b, z0, y0, x0, z, y, x, s, pixel_inside(z, y, x, D, H, W, IS_3D)


@triton.jit
def tile_is_interior(z0, y0, x0, D, H, W, halo_z, halo_y, halo_x,
                     TILE_D: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr,
                     IS_3D: tl.constexpr):
    """True when the tile and everything within the halo around it lie in the sample: then no
    pixel or partner needs a bounds test."""
    interior = (y0 >= halo_y) & (y0 + TILE_H + halo_y <= H)
    interior = interior & (x0 >= halo_x) & (x0 + TILE_W + halo_x <= W)
    if IS_3D:
        interior = interior & (z0 >= halo_z) & (z0 + TILE_D + halo_z <= D)
    return interior


@triton.jit
def coordinate_in_range(coordinate, lo, hi):
    """(rows, pixels) test lo[r] <= coordinate[p] < hi[r]."""
    return (coordinate[None, :] >= lo[:, None]) & (coordinate[None, :] < hi[:, None])
