// CPU edge map of the boundary term (docs/contract.md §5): wrap-around backward differences
// along each spatial dim, sqrt of the sum of their squares, mean over the image's channels,
// min-max per sample (+1e-6 in the denominator), to the power gamma. The image is already at the
// maps' size.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../common/boundary_math.h"
#include "../common/host_checks.h"
#include "kernels.h"

namespace bimi::cpu {
namespace {

// image: (B, C, D, H, W) as one volume per channel, in the accumulation dtype; edge: (B, D*H*W).
template <typename acc_t>
void edge_map(const acc_t* image, const Volume& v, bool is_3d, acc_t gamma, acc_t* edge) {
  const EdgeRowKernels<acc_t> k = selected_kernels<acc_t>().edge;
  const int64_t voxels = v.voxels();
  at::parallel_for(0, v.batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      acc_t* magnitude = edge + b * voxels;
      std::fill(magnitude, magnitude + voxels, acc_t(0));
      for (int64_t c = 0; c < v.channels; ++c) {
        const acc_t* channel = image + (b * v.channels + c) * voxels;
        for (int64_t z = 0; z < v.depth; ++z)
          for (int64_t y = 0; y < v.height; ++y) {
            const acc_t* row = channel + v.voxel_index(z, y, 0);
            const acc_t* above = channel + v.voxel_index(z, (y + v.height - 1) % v.height, 0);
            const acc_t* before = is_3d ? channel + v.voxel_index((z + v.depth - 1) % v.depth, y, 0) : nullptr;
            k.magnitude(row, above, before, v.width, magnitude + v.voxel_index(z, y, 0));
          }
      }
      acc_t lo, hi;
      k.channel_mean_range(magnitude, voxels, static_cast<acc_t>(v.channels), &lo, &hi);
      k.normalized_power(magnitude, voxels, lo, minmax_denominator(lo, hi), gamma, magnitude);
    }
  });
}

at::Tensor edge_map_cpu(const at::Tensor& image_in, double gamma) {
  TORCH_CHECK(image_in.dim() == 4 || image_in.dim() == 5,
              "bimi_C: expected a (B, C, H, W) or (B, C, D, H, W) image, got shape ", image_in.sizes());
  check_float_map(image_in, "image");
  TORCH_CHECK(gamma > 0, "bimi_C: gamma must be > 0, got ", gamma);
  const auto acc_type = accumulation_type(image_in.scalar_type());
  const at::Tensor image = image_in.to(acc_type).contiguous();
  const Volume v = volume_of(image);
  std::vector<int64_t> shape = image.sizes().vec();
  shape[1] = 1;
  at::Tensor edge = at::empty(shape, image.options());
  AT_DISPATCH_FLOATING_TYPES(acc_type, "bimi_edge_map_cpu", [&] {
    edge_map<scalar_t>(image.data_ptr<scalar_t>(), v, image.dim() == 5, static_cast<scalar_t>(gamma),
                       edge.data_ptr<scalar_t>());
  });
  return edge;
}

}  // namespace

TORCH_LIBRARY_IMPL(bimi_C, CPU, m) { m.impl("edge_map", &edge_map_cpu); }

}  // namespace bimi::cpu
