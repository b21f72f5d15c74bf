// CUDA joint counts (SPEC §3) and their backward, every offset in one pass over the pixels.
//
// Forward: the pixels are cut into row segments of kSegment pixels, the segments into a number
// of chunks fixed by the shape. Block (chunk c, offset o, pair group) loads each segment of p1
// and the matching segment of p2 shifted by d_o into shared memory (masked, in the accumulation
// dtype, zeros outside the image) and each thread accumulates its K x K pairs in registers. The
// per-chunk partials are summed in chunk order by a second kernel: no atomics, bitwise
// reproducible. Backward: one thread per (pixel, block of 4 output channels) sums over offsets
// and channels in a fixed order; the p2 gradient is the same kernel with the roles swapped, G
// transposed and the offsets negated.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../common/host_checks.h"
#include "common.cuh"

namespace bimi {
namespace cuda {
namespace {

constexpr int kSegment = 64;        // pixels of one image row per shared-memory tile
constexpr int kSegmentStride = kSegment + 1;  // padded: threads reading different channels hit different banks
constexpr int kPairsPerThread = 8;  // K x K pairs one thread accumulates
constexpr int64_t kPairsPerBlock = int64_t(kThreads) * kPairsPerThread;
constexpr int64_t kMaxChunks = 1024;
constexpr int64_t kPartialBudget = int64_t(1) << 24;  // elements of the partials buffer
constexpr int kBackwardChannels = 4;

template <typename scalar_t, typename acc_t>
__global__ void joint_forward_partials_kernel(const scalar_t* __restrict__ p1,
                                              const scalar_t* __restrict__ p2,
                                              const scalar_t* __restrict__ mask, Volume v,
                                              const int64_t* __restrict__ offsets,
                                              int64_t num_offsets, int64_t segments, int64_t chunks,
                                              acc_t* __restrict__ partials) {
  extern __shared__ unsigned char shared_raw[];
  acc_t* first_tile = reinterpret_cast<acc_t*>(shared_raw);  // K x kSegmentStride
  const int64_t k_count = v.channels;
  acc_t* second_tile = first_tile + k_count * kSegmentStride;

  const int64_t chunk = blockIdx.x;
  const int64_t o = blockIdx.y;
  const int64_t pair0 = static_cast<int64_t>(blockIdx.z) * kPairsPerBlock;
  const int64_t pairs = k_count * k_count;
  const int64_t dz = offsets[3 * o], dy = offsets[3 * o + 1], dx = offsets[3 * o + 2];
  const int64_t voxels = v.voxels();
  const int64_t segments_per_row = ceil_div(v.width, kSegment);

  acc_t acc[kPairsPerThread];
#pragma unroll
  for (int q = 0; q < kPairsPerThread; ++q) acc[q] = acc_t(0);

  const int64_t seg_end = chunk_begin(segments, chunks, chunk + 1);
  for (int64_t seg = chunk_begin(segments, chunks, chunk); seg < seg_end; ++seg) {
    const int64_t row = seg / segments_per_row;
    const int64_t x0 = (seg % segments_per_row) * kSegment;
    const int64_t b = row / (v.depth * v.height);
    const int64_t z = (row / v.height) % v.depth;
    const int64_t y = row % v.height;
    __syncthreads();  // the previous segment's tiles are no longer read
    for (int64_t e = threadIdx.x; e < k_count * kSegment; e += blockDim.x) {
      const int64_t k = e / kSegment;
      const int64_t x = e % kSegment;
      const int64_t xx = x0 + x;
      acc_t a = 0, s = 0;
      if (xx < v.width) {
        const int64_t i1 = v.voxel_index(z, y, xx);
        a = static_cast<acc_t>(p1[(b * k_count + k) * voxels + i1]);
        if (mask != nullptr) a *= static_cast<acc_t>(mask[b * voxels + i1]);
        if (v.inside(z + dz, y + dy, xx + dx)) {
          const int64_t i2 = v.voxel_index(z + dz, y + dy, xx + dx);
          s = static_cast<acc_t>(p2[(b * k_count + k) * voxels + i2]);
          if (mask != nullptr) s *= static_cast<acc_t>(mask[b * voxels + i2]);
        }
      }
      first_tile[k * kSegmentStride + x] = a;
      second_tile[k * kSegmentStride + x] = s;
    }
    __syncthreads();
#pragma unroll
    for (int q = 0; q < kPairsPerThread; ++q) {
      const int64_t pair = pair0 + static_cast<int64_t>(q) * kThreads + threadIdx.x;
      if (pair < pairs) {
        const acc_t* a = first_tile + (pair / k_count) * kSegmentStride;
        const acc_t* s = second_tile + (pair % k_count) * kSegmentStride;
        acc_t dot = 0;
        for (int x = 0; x < kSegment; ++x) dot += a[x] * s[x];
        acc[q] += dot;
      }
    }
  }
#pragma unroll
  for (int q = 0; q < kPairsPerThread; ++q) {
    const int64_t pair = pair0 + static_cast<int64_t>(q) * kThreads + threadIdx.x;
    if (pair < pairs) partials[(chunk * num_offsets + o) * pairs + pair] = acc[q];
  }
}

// out[b, i, s] = m[s] sum_o sum_j g[o, i, j] m[s+d_o] second[b, j, s + d_o], for 4 channels i.
template <typename scalar_t, typename acc_t>
__global__ void joint_backward_first_kernel(const scalar_t* __restrict__ second,
                                            const scalar_t* __restrict__ mask, Volume v,
                                            const int64_t* __restrict__ offsets, int64_t num_offsets,
                                            const acc_t* __restrict__ g, scalar_t* __restrict__ out) {
  const int64_t voxels = v.voxels();
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= v.batch * voxels) return;
  const int64_t k_count = v.channels;
  const int64_t b = index / voxels;
  const int64_t s = index % voxels;
  const int64_t x = s % v.width;
  const int64_t y = (s / v.width) % v.height;
  const int64_t z = s / (v.width * v.height);
  const int64_t i0 = static_cast<int64_t>(blockIdx.y) * kBackwardChannels;

  acc_t acc[kBackwardChannels];
#pragma unroll
  for (int q = 0; q < kBackwardChannels; ++q) acc[q] = acc_t(0);
  for (int64_t o = 0; o < num_offsets; ++o) {
    const int64_t zz = z + offsets[3 * o], yy = y + offsets[3 * o + 1], xx = x + offsets[3 * o + 2];
    if (!v.inside(zz, yy, xx)) continue;
    const int64_t s2 = v.voxel_index(zz, yy, xx);
    const acc_t m2 = mask != nullptr ? static_cast<acc_t>(mask[b * voxels + s2]) : acc_t(1);
    const acc_t* go = g + (o * k_count + i0) * k_count;
    for (int64_t j = 0; j < k_count; ++j) {
      acc_t value = static_cast<acc_t>(second[(b * k_count + j) * voxels + s2]);
      if (mask != nullptr) value *= m2;
#pragma unroll
      for (int q = 0; q < kBackwardChannels; ++q)
        if (i0 + q < k_count) acc[q] += go[q * k_count + j] * value;
    }
  }
  const acc_t m1 = mask != nullptr ? static_cast<acc_t>(mask[b * voxels + s]) : acc_t(1);
#pragma unroll
  for (int q = 0; q < kBackwardChannels; ++q) {
    if (i0 + q < k_count) {
      const acc_t value = mask != nullptr ? acc[q] * m1 : acc[q];
      out[(b * k_count + i0 + q) * voxels + s] = static_cast<scalar_t>(value);
    }
  }
}

at::Tensor offsets_on_device(const std::vector<Offset3>& offsets, const at::Device& device) {
  std::vector<int64_t> flat;
  for (const Offset3& d : offsets) {
    flat.push_back(d.dz);
    flat.push_back(d.dy);
    flat.push_back(d.dx);
  }
  return at::tensor(flat, at::TensorOptions().dtype(at::kLong)).to(device);
}

at::Tensor joint_counts_cuda(const at::Tensor& p1_in, const at::Tensor& p2_in,
                             at::IntArrayRef flat_offsets, const std::optional<at::Tensor>& mask_in) {
  check_joint_inputs(p1_in, p2_in, mask_in);
  const c10::cuda::CUDAGuard guard(p1_in.device());
  const at::Tensor p1 = p1_in.contiguous();
  const at::Tensor p2 = p2_in.contiguous();
  const at::Tensor mask = mask_like(mask_in, p1);
  const Volume v = volume_of(p1);
  const std::vector<Offset3> offsets = parse_offsets(p1, flat_offsets);
  const int64_t num_offsets = static_cast<int64_t>(offsets.size());
  const int64_t k = v.channels;
  const auto acc_options = p1.options().dtype(accumulation_type(p1.scalar_type()));
  at::Tensor joint = at::empty({num_offsets, k, k}, acc_options);
  if (v.batch * v.voxels() == 0) return joint.zero_();
  const at::Tensor device_offsets = offsets_on_device(offsets, p1.device());

  const int64_t segments = v.batch * v.depth * v.height * ceil_div(v.width, kSegment);
  const int64_t chunks = std::max<int64_t>(
      1, std::min({segments, kMaxChunks, kPartialBudget / (num_offsets * k * k)}));
  const int64_t pair_groups = ceil_div(k * k, kPairsPerBlock);
  at::Tensor partials = at::empty({chunks, num_offsets, k, k}, acc_options);
  const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>(num_offsets),
                  static_cast<unsigned>(pair_groups));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p1.scalar_type(), "bimi_joint_counts_cuda", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const size_t shared_bytes = 2 * k * kSegmentStride * sizeof(acc_t);
    auto kernel = joint_forward_partials_kernel<scalar_t, acc_t>;
    if (shared_bytes > 48 * 1024) {
      const int optin = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
      TORCH_CHECK(shared_bytes <= static_cast<size_t>(optin), "bimi_C: K = ", k,
                  " needs more shared memory than this GPU has per block");
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(shared_bytes)));
    }
    kernel<<<grid, kThreads, shared_bytes, stream>>>(
        p1.data_ptr<scalar_t>(), p2.data_ptr<scalar_t>(),
        mask.defined() ? mask.data_ptr<scalar_t>() : nullptr, v, device_offsets.data_ptr<int64_t>(),
        num_offsets, segments, chunks, partials.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t size = num_offsets * k * k;
    sum_partials_kernel<acc_t><<<blocks_for(size), kThreads, 0, stream>>>(
        partials.data_ptr<acc_t>(), chunks, size, joint.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return joint;
}

std::tuple<at::Tensor, at::Tensor> joint_counts_backward_cuda(
    const at::Tensor& grad_joint_in, const at::Tensor& p1_in, const at::Tensor& p2_in,
    at::IntArrayRef flat_offsets, const std::optional<at::Tensor>& mask_in) {
  check_joint_inputs(p1_in, p2_in, mask_in);
  const c10::cuda::CUDAGuard guard(p1_in.device());
  const at::Tensor p1 = p1_in.contiguous();
  const at::Tensor p2 = p2_in.contiguous();
  const at::Tensor mask = mask_like(mask_in, p1);
  const Volume v = volume_of(p1);
  const std::vector<Offset3> offsets = parse_offsets(p1, flat_offsets);
  const int64_t num_offsets = static_cast<int64_t>(offsets.size());
  const int64_t k = v.channels;
  const auto acc_type = accumulation_type(p1.scalar_type());
  TORCH_CHECK(grad_joint_in.sizes() == at::IntArrayRef({num_offsets, k, k}),
              "bimi_C: grad_J must be (|O|, K, K), got ", grad_joint_in.sizes());
  const at::Tensor g = grad_joint_in.to(acc_type).contiguous();
  const at::Tensor g_transposed = g.transpose(1, 2).contiguous();
  std::vector<Offset3> negated(offsets.size());
  for (size_t o = 0; o < offsets.size(); ++o)
    negated[o] = Offset3{-offsets[o].dz, -offsets[o].dy, -offsets[o].dx};
  at::Tensor grad_p1 = at::empty_like(p1);
  at::Tensor grad_p2 = at::empty_like(p2);
  if (v.batch * v.voxels() == 0) return {grad_p1, grad_p2};
  const at::Tensor device_offsets = offsets_on_device(offsets, p1.device());
  const at::Tensor device_negated = offsets_on_device(negated, p1.device());
  const dim3 grid(static_cast<unsigned>(blocks_for(v.batch * v.voxels())),
                  static_cast<unsigned>(ceil_div(k, kBackwardChannels)));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p1.scalar_type(), "bimi_joint_counts_backward_cuda", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const scalar_t* m = mask.defined() ? mask.data_ptr<scalar_t>() : nullptr;
    joint_backward_first_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
        p2.data_ptr<scalar_t>(), m, v, device_offsets.data_ptr<int64_t>(), num_offsets,
        g.data_ptr<acc_t>(), grad_p1.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    joint_backward_first_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
        p1.data_ptr<scalar_t>(), m, v, device_negated.data_ptr<int64_t>(), num_offsets,
        g_transposed.data_ptr<acc_t>(), grad_p2.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_p1, grad_p2};
}

}  // namespace

TORCH_LIBRARY_IMPL(bimi_C, CUDA, m) {
  m.impl("joint_counts", &joint_counts_cuda);
  m.impl("joint_counts_backward", &joint_counts_backward_cuda);
}

}  // namespace cuda
}  // namespace bimi
