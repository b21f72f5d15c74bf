// CUDA boundary cross-correlation term (SPEC §5): CC(U(p), E) of one cluster map and its backward.
//
// One thread per pixel throughout. Forward: U (uncertainty) per pixel, per-sample min and max,
// the normalised map, then each pixel's window sums and clamped NCC (common/boundary_math.h),
// summed per block in a fixed tree and the block sums added in block order (no atomics).
// Backward: each window centre's coefficients of S(UE), S(U), S(U^2) as three maps, then per
// pixel the window sums of those maps give dL/dU, times dU/dp for every cluster.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../common/boundary_math.h"
#include "../common/host_checks.h"
#include "common.cuh"

namespace bimi {
namespace cuda {
namespace {

// Window radii: 2-D maps have no extent along z.
struct Window {
  int64_t rz, r;
  double count;  // window^ndim
};

template <typename scalar_t, typename acc_t>
__global__ void uncertainty_kernel(const scalar_t* __restrict__ p, Volume v, acc_t* __restrict__ u) {
  const int64_t voxels = v.voxels();
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= v.batch * voxels) return;
  const int64_t b = index / voxels, s = index % voxels;
  acc_t total = 0;
  for (int64_t k = 0; k < v.channels; ++k)
    total += plogp(static_cast<acc_t>(p[(b * v.channels + k) * voxels + s]));
  u[index] = -total;
}

template <typename acc_t>
__global__ void normalize_kernel(acc_t* __restrict__ u, const acc_t* __restrict__ u_range, Volume v) {
  const int64_t voxels = v.voxels();
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= v.batch * voxels) return;
  const int64_t b = index / voxels;
  const acc_t lo = u_range[2 * b], hi = u_range[2 * b + 1];
  u[index] = (u[index] - lo) / minmax_denominator(lo, hi);
}

// The five window sums around pixel (z, y, x) of sample b, in a fixed order.
template <typename acc_t>
__device__ WindowSums<acc_t> window_sums(const acc_t* __restrict__ u, const acc_t* __restrict__ e,
                                         const Volume& v, const Window& w, int64_t z, int64_t y,
                                         int64_t x) {
  WindowSums<acc_t> s{0, 0, 0, 0, 0};
  for (int64_t tz = -w.rz; tz <= w.rz; ++tz)
    for (int64_t ty = -w.r; ty <= w.r; ++ty)
      for (int64_t tx = -w.r; tx <= w.r; ++tx) {
        if (!v.inside(z + tz, y + ty, x + tx)) continue;
        const int64_t i = v.voxel_index(z + tz, y + ty, x + tx);
        const acc_t uu = u[i], ee = e[i];
        s.u += uu;
        s.e += ee;
        s.uu += uu * uu;
        s.ee += ee * ee;
        s.ue += uu * ee;
      }
  return s;
}

template <typename acc_t>
__global__ void ncc_partials_kernel(const acc_t* __restrict__ u, const acc_t* __restrict__ edge,
                                    Volume v, Window w, acc_t* __restrict__ partials) {
  __shared__ acc_t scratch[kThreads];
  const int64_t voxels = v.voxels();
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  acc_t value = 0;
  if (index < v.batch * voxels) {
    const int64_t b = index / voxels, s = index % voxels;
    const int64_t x = s % v.width, y = (s / v.width) % v.height, z = s / (v.width * v.height);
    const WindowSums<acc_t> sums = window_sums(u + b * voxels, edge + b * voxels, v, w, z, y, x);
    value = window_ncc(window_stats(sums, static_cast<acc_t>(w.count)));
  }
  const acc_t total = block_sum(value, scratch);
  if (threadIdx.x == 0) partials[blockIdx.x] = total;
}

// cc = -(sum of the block partials, in block order) / N, in one block.
template <typename acc_t>
__global__ void ncc_total_kernel(const acc_t* __restrict__ partials, int64_t parts, int64_t count,
                                 acc_t* __restrict__ cc) {
  __shared__ acc_t scratch[kThreads];
  acc_t value = 0;
  for (int64_t c = threadIdx.x; c < parts; c += kThreads) value += partials[c];
  const acc_t total = block_sum(value, scratch);
  if (threadIdx.x == 0) *cc = -(total / static_cast<acc_t>(count));
}

// Each window centre's dL/dS(UE), dL/dS(U), dL/dS(U^2), as three (B, voxels) maps.
template <typename acc_t>
__global__ void coefficients_kernel(const acc_t* __restrict__ u, const acc_t* __restrict__ edge,
                                    const acc_t* __restrict__ grad_cc, Volume v, Window w,
                                    acc_t* __restrict__ coefficients) {
  const int64_t voxels = v.voxels();
  const int64_t total = v.batch * voxels;
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= total) return;
  const int64_t b = index / voxels, s = index % voxels;
  const int64_t x = s % v.width, y = (s / v.width) % v.height, z = s / (v.width * v.height);
  const acc_t scale = -grad_cc[0] / static_cast<acc_t>(total);
  const WindowSums<acc_t> sums = window_sums(u + b * voxels, edge + b * voxels, v, w, z, y, x);
  const WindowCoefficients<acc_t> c =
      window_coefficients(window_stats(sums, static_cast<acc_t>(w.count)), scale);
  coefficients[index] = c.ue;
  coefficients[total + index] = c.u;
  coefficients[2 * total + index] = c.uu;
}

template <typename scalar_t, typename acc_t>
__global__ void boundary_gradient_kernel(const scalar_t* __restrict__ p, const acc_t* __restrict__ u,
                                         const acc_t* __restrict__ edge,
                                         const acc_t* __restrict__ u_range,
                                         const acc_t* __restrict__ coefficients, Volume v, Window w,
                                         scalar_t* __restrict__ grad_p) {
  const int64_t voxels = v.voxels();
  const int64_t total = v.batch * voxels;
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= total) return;
  const int64_t b = index / voxels, s = index % voxels;
  const int64_t x = s % v.width, y = (s / v.width) % v.height, z = s / (v.width * v.height);
  const acc_t* c_ue = coefficients + b * voxels;
  const acc_t* c_u = coefficients + total + b * voxels;
  const acc_t* c_uu = coefficients + 2 * total + b * voxels;
  acc_t sum_ue = 0, sum_u = 0, sum_uu = 0;
  for (int64_t tz = -w.rz; tz <= w.rz; ++tz)
    for (int64_t ty = -w.r; ty <= w.r; ++ty)
      for (int64_t tx = -w.r; tx <= w.r; ++tx) {
        if (!v.inside(z + tz, y + ty, x + tx)) continue;
        const int64_t i = v.voxel_index(z + tz, y + ty, x + tx);
        sum_ue += c_ue[i];
        sum_u += c_u[i];
        sum_uu += c_uu[i];
      }
  const acc_t grad_u =
      normalized_uncertainty_gradient(edge[index], u[index], sum_ue, sum_u, sum_uu) /
      minmax_denominator(u_range[2 * b], u_range[2 * b + 1]);
  for (int64_t k = 0; k < v.channels; ++k) {
    const int64_t i = (b * v.channels + k) * voxels + s;
    grad_p[i] = static_cast<scalar_t>(grad_u * uncertainty_derivative(static_cast<acc_t>(p[i])));
  }
}

Window window_of(const at::Tensor& p, int64_t window) {
  const bool is_3d = p.dim() == 5;
  Window w;
  w.r = window / 2;
  w.rz = is_3d ? window / 2 : 0;
  w.count = is_3d ? double(window * window * window) : double(window * window);
  return w;
}

std::tuple<at::Tensor, at::Tensor> boundary_cc_cuda(const at::Tensor& p_in, const at::Tensor& edge_in,
                                                    int64_t window) {
  check_boundary_inputs(p_in, edge_in, window);
  const c10::cuda::CUDAGuard guard(p_in.device());
  const at::Tensor p = p_in.contiguous();
  const auto acc_type = accumulation_type(p.scalar_type());
  const at::Tensor edge = edge_in.to(acc_type).contiguous();
  const Volume v = volume_of(p);
  const Window w = window_of(p, window);
  const auto acc_options = p.options().dtype(acc_type);
  const int64_t total = v.batch * v.voxels();
  TORCH_CHECK(total > 0, "bimi_C: boundary_cc needs at least one pixel");
  at::Tensor u = at::empty({v.batch, v.voxels()}, acc_options);
  at::Tensor cc = at::empty({}, acc_options);
  const int64_t blocks = blocks_for(total);
  at::Tensor partials = at::empty({blocks}, acc_options);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  at::Tensor u_range;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "bimi_boundary_cc_cuda", [&] {
    using acc_t = acc_type_t<scalar_t>;
    uncertainty_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, stream>>>(p.data_ptr<scalar_t>(), v,
                                                                         u.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    u_range = at::stack({u.amin(1), u.amax(1)}, 1).contiguous();
    normalize_kernel<acc_t><<<blocks, kThreads, 0, stream>>>(u.data_ptr<acc_t>(),
                                                             u_range.data_ptr<acc_t>(), v);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    ncc_partials_kernel<acc_t><<<blocks, kThreads, 0, stream>>>(
        u.data_ptr<acc_t>(), edge.data_ptr<acc_t>(), v, w, partials.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    ncc_total_kernel<acc_t><<<1, kThreads, 0, stream>>>(partials.data_ptr<acc_t>(), blocks, total,
                                                        cc.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {cc, u_range};
}

at::Tensor boundary_cc_backward_cuda(const at::Tensor& grad_cc_in, const at::Tensor& p_in,
                                     const at::Tensor& edge_in, const at::Tensor& u_range_in,
                                     int64_t window) {
  check_boundary_inputs(p_in, edge_in, window);
  const c10::cuda::CUDAGuard guard(p_in.device());
  const at::Tensor p = p_in.contiguous();
  const auto acc_type = accumulation_type(p.scalar_type());
  const at::Tensor edge = edge_in.to(acc_type).contiguous();
  const at::Tensor u_range = u_range_in.to(acc_type).contiguous();
  const at::Tensor grad_cc = grad_cc_in.to(p.device(), acc_type).reshape({1}).contiguous();
  const Volume v = volume_of(p);
  TORCH_CHECK(u_range.sizes() == at::IntArrayRef({v.batch, 2}), "bimi_C: u_range must be (B, 2)");
  const Window w = window_of(p, window);
  const auto acc_options = p.options().dtype(acc_type);
  const int64_t total = v.batch * v.voxels();
  at::Tensor grad_p = at::empty_like(p);
  if (total == 0) return grad_p;
  at::Tensor u = at::empty({v.batch, v.voxels()}, acc_options);
  at::Tensor coefficients = at::empty({3, total}, acc_options);
  const int64_t blocks = blocks_for(total);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "bimi_boundary_cc_backward_cuda", [&] {
    using acc_t = acc_type_t<scalar_t>;
    uncertainty_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, stream>>>(p.data_ptr<scalar_t>(), v,
                                                                         u.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    normalize_kernel<acc_t><<<blocks, kThreads, 0, stream>>>(u.data_ptr<acc_t>(),
                                                             u_range.data_ptr<acc_t>(), v);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    coefficients_kernel<acc_t><<<blocks, kThreads, 0, stream>>>(
        u.data_ptr<acc_t>(), edge.data_ptr<acc_t>(), grad_cc.data_ptr<acc_t>(), v, w,
        coefficients.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    boundary_gradient_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, stream>>>(
        p.data_ptr<scalar_t>(), u.data_ptr<acc_t>(), edge.data_ptr<acc_t>(), u_range.data_ptr<acc_t>(),
        coefficients.data_ptr<acc_t>(), v, w, grad_p.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_p;
}

}  // namespace

TORCH_LIBRARY_IMPL(bimi_C, CUDA, m) {
  m.impl("boundary_cc", &boundary_cc_cuda);
  m.impl("boundary_cc_backward", &boundary_cc_backward_cuda);
}

}  // namespace cuda
}  // namespace bimi
