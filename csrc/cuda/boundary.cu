// CUDA boundary cross-correlation term (docs/contract.md §5): CC(U(p), E) of one cluster map and
// its backward.
//
// One thread per voxel; the per-voxel steps live in boundary_voxels.h (shared with the host
// emulation test, tests/emulate_boundary.cpp) and the window math in common/boundary_math.h
// (shared with the CPU kernels). Forward: U of every voxel with each block's min and max of its
// part of a sample, the per-sample range from the parts, U normalised in place, then each window's
// clamped NCC summed per block in a fixed tree and the block sums added in block order (no
// atomics, the same result on every run). Backward: U again, normalised with the saved range, each
// window centre's coefficients of S(UE), S(U), S(U^2), then per voxel the window sums of those give
// dL/dU, times dU/dp for every cluster. Temporaries: U (B, *S) in the forward; U and the three
// coefficient maps (4 x (B, *S)) in the backward, all in the accumulation dtype.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

#include "../common/host_checks.h"
#include "boundary_voxels.h"
#include "common.cuh"

namespace bimi {
namespace cuda {
namespace {

// Block (sample b, part): U of the part's voxels into u; with part_lo/part_hi, the part's min and
// max of U (min and max are exact, so the tree order does not matter for the result).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    uncertainty_kernel(const scalar_t* __restrict__ p, Volume v, int64_t parts, acc_t* __restrict__ u,
                       acc_t* __restrict__ part_lo, acc_t* __restrict__ part_hi) {
  const int64_t b = blockIdx.x / parts, part = blockIdx.x % parts;
  const int64_t base = b * v.voxels();
  const int64_t end = base + range_part_begin(v, parts, part + 1);
  acc_t lo = std::numeric_limits<acc_t>::infinity(), hi = -std::numeric_limits<acc_t>::infinity();
  for (int64_t index = base + range_part_begin(v, parts, part) + threadIdx.x; index < end; index += blockDim.x) {
    const acc_t value = uncertainty_at<scalar_t, acc_t>(p, v, index);
    u[index] = value;
    lo = lower_of(lo, value);
    hi = higher_of(hi, value);
  }
  if (part_lo == nullptr) return;  // the same for every thread of the block
  __shared__ acc_t scratch_lo[kThreads], scratch_hi[kThreads];
  block_min_max(lo, hi, scratch_lo, scratch_hi);
  if (threadIdx.x == 0) {
    part_lo[blockIdx.x] = scratch_lo[0];
    part_hi[blockIdx.x] = scratch_hi[0];
  }
}

// u_range[b] = [min, max] over the parts of sample b: one thread per sample.
template <typename acc_t>
__global__ void range_kernel(const acc_t* __restrict__ part_lo, const acc_t* __restrict__ part_hi,
                             int64_t batch, int64_t parts, acc_t* __restrict__ u_range) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b < batch) sample_range_of_parts(part_lo, part_hi, b, parts, u_range);
}

template <typename acc_t>
__global__ void normalize_kernel(acc_t* __restrict__ u, const acc_t* __restrict__ u_range, Volume v) {
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= v.batch * v.voxels()) return;
  u[index] = normalized(u[index], u_range, index / v.voxels());
}

template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    ncc_partials_kernel(const acc_t* __restrict__ u, const acc_t* __restrict__ edge, Volume v, BoxWindow w,
                        acc_t* __restrict__ partials) {
  __shared__ acc_t scratch[kThreads];
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const acc_t value = index < v.batch * v.voxels() ? ncc_at(u, edge, v, w, index) : acc_t(0);
  const acc_t total = block_sum(value, scratch);
  if (threadIdx.x == 0) partials[blockIdx.x] = total;
}

// cc = -(sum of the block partials) / N, in one block: thread t adds partials t, t + kThreads, ...
// in order, then a fixed tree; in double, rounded to acc_t once: a map of 2^31 pixels has 2^23
// partials, and float32 threads adding 2^15 of them each drifted by ~4e-5 of the sum.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    ncc_total_kernel(const acc_t* __restrict__ partials, int64_t parts, int64_t count, acc_t* __restrict__ cc) {
  __shared__ double scratch[kThreads];
  double value = 0;
  for (int64_t c = threadIdx.x; c < parts; c += kThreads) value += static_cast<double>(partials[c]);
  const double total = block_sum(value, scratch);
  if (threadIdx.x == 0) *cc = static_cast<acc_t>(-(total / static_cast<double>(count)));
}

template <typename acc_t>
__global__ void coefficients_kernel(const acc_t* __restrict__ u, const acc_t* __restrict__ edge,
                                    const acc_t* __restrict__ grad_cc, Volume v, BoxWindow w,
                                    acc_t* __restrict__ coefficients) {
  const int64_t total = v.batch * v.voxels();
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= total) return;
  // CC = -mean(ncc): dL/d(ncc) of every window is -dL/dCC / N
  const acc_t scale = -grad_cc[0] / static_cast<acc_t>(total);
  coefficients_at(u, edge, v, w, scale, index, coefficients);
}

template <typename scalar_t, typename acc_t>
__global__ void gradient_kernel(const scalar_t* __restrict__ p, const acc_t* __restrict__ u,
                                const acc_t* __restrict__ edge, const acc_t* __restrict__ u_range,
                                const acc_t* __restrict__ coefficients, Volume v, BoxWindow w,
                                scalar_t* __restrict__ grad_p) {
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= v.batch * v.voxels()) return;
  gradient_at(p, u, edge, u_range, coefficients, v, w, index, grad_p);
}

BoxWindow window_of(const at::Tensor& p, int64_t window) {
  const bool is_3d = p.dim() == 5;
  BoxWindow w;
  w.r = window / 2;
  w.rz = is_3d ? window / 2 : 0;
  w.count = is_3d ? double(window) * window * window : double(window) * window;
  return w;
}

// Blocks of kThreads for one thread per voxel.
unsigned voxel_blocks(int64_t total) {
  const int64_t blocks = blocks_for(total);
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "bimi_C (cuda): the map is too large");
  return static_cast<unsigned>(blocks);
}

std::tuple<at::Tensor, at::Tensor> boundary_cc_cuda(const at::Tensor& p_in, const at::Tensor& edge_in,
                                                    int64_t window) {
  check_boundary_inputs(p_in, edge_in, window);
  TORCH_CHECK(p_in.is_cuda(), "bimi_C (cuda): p must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(p_in.device());
  const at::Tensor p = p_in.contiguous();
  const auto acc_type = accumulation_type(p.scalar_type());
  const at::Tensor edge = edge_in.to(acc_type).contiguous();
  const Volume v = volume_of(p);
  const BoxWindow w = window_of(p, window);
  const auto acc_options = p.options().dtype(acc_type);
  const int64_t total = v.batch * v.voxels();
  TORCH_CHECK(total > 0, "bimi_C: boundary_cc needs at least one voxel");
  const int64_t parts = range_parts(v);
  TORCH_CHECK(v.batch * parts <= std::numeric_limits<int32_t>::max(), "bimi_C (cuda): the map is too large");
  at::Tensor u = at::empty({v.batch, v.voxels()}, acc_options);
  at::Tensor part_range = at::empty({2, v.batch * parts}, acc_options);
  at::Tensor u_range = at::empty({v.batch, 2}, acc_options);
  at::Tensor cc = at::empty({}, acc_options);
  const unsigned blocks = voxel_blocks(total);
  at::Tensor partials = at::empty({blocks}, acc_options);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "bimi_boundary_cc_cuda", [&] {
    using acc_t = acc_type_t<scalar_t>;
    acc_t* part_lo = part_range.data_ptr<acc_t>();
    acc_t* part_hi = part_lo + v.batch * parts;
    uncertainty_kernel<scalar_t, acc_t><<<static_cast<unsigned>(v.batch * parts), kThreads, 0, stream>>>(
        p.data_ptr<scalar_t>(), v, parts, u.data_ptr<acc_t>(), part_lo, part_hi);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    range_kernel<acc_t><<<voxel_blocks(v.batch), kThreads, 0, stream>>>(part_lo, part_hi, v.batch, parts,
                                                                       u_range.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    normalize_kernel<acc_t><<<blocks, kThreads, 0, stream>>>(u.data_ptr<acc_t>(), u_range.data_ptr<acc_t>(), v);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    ncc_partials_kernel<acc_t><<<blocks, kThreads, 0, stream>>>(u.data_ptr<acc_t>(), edge.data_ptr<acc_t>(), v,
                                                                w, partials.data_ptr<acc_t>());
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
  TORCH_CHECK(p_in.is_cuda(), "bimi_C (cuda): p must be a CUDA tensor");
  TORCH_CHECK(grad_cc_in.numel() == 1, "bimi_C: grad_cc must hold one value, got shape ", grad_cc_in.sizes());
  const c10::cuda::CUDAGuard guard(p_in.device());
  const at::Tensor p = p_in.contiguous();
  const auto acc_type = accumulation_type(p.scalar_type());
  const at::Tensor edge = edge_in.to(acc_type).contiguous();
  // on p's device: a u_range or grad_cc elsewhere would be read through a foreign pointer
  const at::Tensor u_range = u_range_in.to(p.device(), acc_type).contiguous();
  const at::Tensor grad_cc = grad_cc_in.to(p.device(), acc_type).reshape({1}).contiguous();
  const Volume v = volume_of(p);
  TORCH_CHECK(u_range.sizes() == at::IntArrayRef({v.batch, 2}), "bimi_C: u_range must be (B, 2)");
  const BoxWindow w = window_of(p, window);
  const auto acc_options = p.options().dtype(acc_type);
  const int64_t total = v.batch * v.voxels();
  at::Tensor grad_p = at::empty_like(p);
  if (total == 0) return grad_p;
  const int64_t parts = range_parts(v);
  TORCH_CHECK(v.batch * parts <= std::numeric_limits<int32_t>::max(), "bimi_C (cuda): the map is too large");
  at::Tensor u = at::empty({v.batch, v.voxels()}, acc_options);
  at::Tensor coefficients = at::empty({3, total}, acc_options);
  const unsigned blocks = voxel_blocks(total);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "bimi_boundary_cc_backward_cuda", [&] {
    using acc_t = acc_type_t<scalar_t>;
    uncertainty_kernel<scalar_t, acc_t><<<static_cast<unsigned>(v.batch * parts), kThreads, 0, stream>>>(
        p.data_ptr<scalar_t>(), v, parts, u.data_ptr<acc_t>(), nullptr, nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    normalize_kernel<acc_t><<<blocks, kThreads, 0, stream>>>(u.data_ptr<acc_t>(), u_range.data_ptr<acc_t>(), v);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    coefficients_kernel<acc_t><<<blocks, kThreads, 0, stream>>>(u.data_ptr<acc_t>(), edge.data_ptr<acc_t>(),
                                                                grad_cc.data_ptr<acc_t>(), v, w,
                                                                coefficients.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    gradient_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, stream>>>(
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
