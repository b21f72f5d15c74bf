// Host-side argument checks and shape decoding shared by the CPU and CUDA op implementations.
// The Python layer (bimi_kernels.checks) has already given the user a readable error; these are
// the kernels' own guards for anyone calling torch.ops.bimi_C directly.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "geometry.h"
#include "numerics.h"

namespace bimi {

inline Volume volume_of(const at::Tensor& p) {
  TORCH_CHECK(p.dim() == 4 || p.dim() == 5,
              "bimi_C: expected a (B, K, H, W) or (B, K, D, H, W) map, got shape ", p.sizes());
  Volume v;
  v.batch = p.size(0);
  v.channels = p.size(1);
  v.depth = p.dim() == 5 ? p.size(2) : 1;
  v.height = p.size(-2);
  v.width = p.size(-1);
  return v;
}

inline void check_float_map(const at::Tensor& t, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "bimi_C: ", name,
              " must be float16, bfloat16, float32 or float64, got ", t.scalar_type());
}

// Flat offsets (n values per offset, n = spatial dims) as (dz, dy, dx) triples, any number of
// them (the CPU and CUDA kernels both walk the offsets in runs).
inline std::vector<Offset3> parse_offsets(const at::Tensor& p, at::IntArrayRef flat) {
  const int64_t n = p.dim() - 2;
  TORCH_CHECK(!flat.empty() && static_cast<int64_t>(flat.size()) % n == 0,
              "bimi_C: offsets must hold a multiple of ", n, " ints, got ", flat.size());
  const Volume v = volume_of(p);
  std::vector<Offset3> offsets(flat.size() / n);
  for (size_t o = 0; o < offsets.size(); ++o) {
    const int64_t* d = flat.data() + o * n;
    offsets[o] = n == 3 ? Offset3{d[0], d[1], d[2]} : Offset3{0, d[0], d[1]};
    // -size < d < size, not |d| < size: |INT64_MIN| does not exist (it would pass as negative)
    const Offset3& off = offsets[o];
    TORCH_CHECK(-v.depth < off.dz && off.dz < v.depth && -v.height < off.dy && off.dy < v.height &&
                    -v.width < off.dx && off.dx < v.width,
                "bimi_C: offset ", o, " does not fit the spatial size ", p.sizes().slice(2));
  }
  return offsets;
}

inline void check_joint_inputs(const at::Tensor& p1, const at::Tensor& p2,
                               const std::optional<at::Tensor>& mask) {
  check_float_map(p1, "p1");
  TORCH_CHECK(p1.sizes() == p2.sizes(), "bimi_C: p1 and p2 must have the same shape, got ",
              p1.sizes(), " and ", p2.sizes());
  TORCH_CHECK(p1.scalar_type() == p2.scalar_type(), "bimi_C: p1 and p2 must have the same dtype");
  TORCH_CHECK(p1.device() == p2.device(), "bimi_C: p1 and p2 must be on the same device");
  TORCH_CHECK(p1.size(1) >= 1, "bimi_C: K must be >= 1");
  if (mask.has_value()) {
    std::vector<int64_t> expected{p1.size(0)};
    for (int64_t d = 2; d < p1.dim(); ++d) expected.push_back(p1.size(d));
    TORCH_CHECK(mask->sizes() == at::IntArrayRef(expected), "bimi_C: mask must be (B, *S) = ",
                at::IntArrayRef(expected), ", got ", mask->sizes());
    TORCH_CHECK(mask->device() == p1.device(), "bimi_C: mask must be on the device of p1");
  }
}

inline void check_boundary_inputs(const at::Tensor& p, const at::Tensor& edge, int64_t window) {
  check_float_map(p, "p");
  const Volume v = volume_of(p);
  TORCH_CHECK(window >= 1 && window % 2 == 1, "bimi_C: window must be odd and >= 1, got ", window);
  std::vector<int64_t> expected{v.batch, 1};
  for (int64_t d = 2; d < p.dim(); ++d) expected.push_back(p.size(d));
  TORCH_CHECK(edge.sizes() == at::IntArrayRef(expected), "bimi_C: edge must be (B, 1, *S) = ",
              at::IntArrayRef(expected), ", got ", edge.sizes());
  TORCH_CHECK(edge.device() == p.device(), "bimi_C: edge must be on the device of p");
}

// The accumulation dtype of a floating map dtype: acc_type_t (numerics.h) at run time.
inline at::ScalarType accumulation_type(at::ScalarType t) {
  at::ScalarType acc = at::kFloat;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t, "bimi_accumulation_type", [&] {
    acc = c10::CppTypeToScalarType<acc_type_t<scalar_t>>::value;
  });
  return acc;
}

// The mask in p's dtype, contiguous, or an undefined tensor.
inline at::Tensor mask_like(const std::optional<at::Tensor>& mask, const at::Tensor& p) {
  if (!mask.has_value() || !mask->defined()) return at::Tensor();
  return mask->to(p.scalar_type()).contiguous();
}

}  // namespace bimi
