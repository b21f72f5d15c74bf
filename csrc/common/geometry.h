// Shapes and offsets as every kernel sees them: a (B, K, D, H, W) volume (2-D maps are D = 1)
// and offsets as (dz, dy, dx) triples. Shared by the CPU and CUDA kernels.
#pragma once

#include <cstdint>

#include "macros.h"

namespace bimi {

struct Volume {
  int64_t batch = 0;
  int64_t channels = 0;  // K
  int64_t depth = 1;     // D (1 for 2-D maps)
  int64_t height = 0;
  int64_t width = 0;

  BIMI_HD int64_t voxels() const { return depth * height * width; }
  BIMI_HD bool inside(int64_t z, int64_t y, int64_t x) const {
    return z >= 0 && z < depth && y >= 0 && y < height && x >= 0 && x < width;
  }
  // Index of voxel (z, y, x) within one channel of one sample.
  BIMI_HD int64_t voxel_index(int64_t z, int64_t y, int64_t x) const {
    return (z * height + y) * width + x;
  }
};

struct Offset3 {
  int64_t dz = 0, dy = 0, dx = 0;
};

// The [begin, end) slice of `total` items that chunk `chunk` of `chunks` owns. Chunks depend only
// on the shapes, never on the thread count, which keeps the reductions bitwise reproducible.
BIMI_HD int64_t chunk_begin(int64_t total, int64_t chunks, int64_t chunk) {
  return total * chunk / chunks;
}

BIMI_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace bimi
