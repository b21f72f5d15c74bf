// CUDA joint counts (docs/contract.md §3) and their backward.
//
// Forward: block (task, chunk) walks the spatial tiles of its chunk; per tile it loads the p1
// tile (its i channels) and the p2 window its cluster of offsets reaches (its j channels) into
// shared memory once, and each warp adds the products of one micro-tile of channels for a run of
// up to kRun offsets, lane by lane, in registers that live across the tiles. The lanes are summed
// with a fixed shuffle tree, each block writes its own partial J, and a second kernel adds the
// partials in chunk order: no atomics, the same result on every run. Backward: block (tile, i
// group) loads the window of the other map once per cluster and channel run and accumulates
// kTileRows x kMicro outputs per lane; the p2 gradient is the same kernel with the maps swapped,
// the offsets negated and G read transposed. Both gradients: one read of each map (plus halo),
// one write of each gradient. The per-thread steps live in joint_tiles.h, shared with the host
// emulation test (tests/emulate_joint.cpp); the launch plan in joint_plan.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <map>
#include <mutex>
#include <utility>
#include <vector>

#include "../common/host_checks.h"
#include "common.cuh"
#include "joint_plan.h"

namespace bimi {
namespace cuda {
namespace {

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMaxWarps* kWarp)
    joint_forward_kernel(const __grid_constant__ JointForwardArgs<scalar_t, acc_t> args,
                         const __grid_constant__ OffsetTable table) {
  constexpr int kRun = JointConfig<acc_t>::kRun;
  extern __shared__ __align__(16) unsigned char shared_raw[];
  acc_t* shared = reinterpret_cast<acc_t*>(shared_raw);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, warps = blockDim.x / kWarp;
  const ForwardBlock block = forward_block(args, table, blockIdx.x, blockIdx.y);
  const ForwardWarp<kRun> w = forward_warp<kRun>(args, table, block, warp);
  acc_t acc[kRun][kMicro][kMicro];
#pragma unroll
  for (int m = 0; m < kRun; ++m)
#pragma unroll
    for (int i = 0; i < kMicro; ++i)
#pragma unroll
      for (int j = 0; j < kMicro; ++j) acc[m][i][j] = acc_t(0);

  for (int64_t t = block.tile_begin; t < block.tile_end; ++t) {
    forward_load(args, table, block, tile_at(args.v, t), warp, warps, lane, shared);
    __syncthreads();
    if (w.active) forward_accumulate<kRun>(w, shared, shared + forward_tile_elements(args), lane, acc);
    __syncthreads();  // the next tile overwrites shared memory
  }
  if (!w.active) return;  // warp-uniform: every lane of a warp that sums below is here
#pragma unroll
  for (int m = 0; m < kRun; ++m)
#pragma unroll
    for (int i = 0; i < kMicro; ++i)
#pragma unroll
      for (int j = 0; j < kMicro; ++j) {
        const acc_t total = warp_sum(acc[m][i][j]);
        if (lane == 0) forward_store(args, w, block.chunk, m, i, j, total);
      }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kBackwardWarps* kWarp)
    joint_backward_kernel(const __grid_constant__ JointBackwardArgs<scalar_t, acc_t> args,
                          const __grid_constant__ OffsetTable table) {
  extern __shared__ __align__(16) unsigned char shared_raw[];
  acc_t* shared = reinterpret_cast<acc_t*>(shared_raw);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, warps = blockDim.x / kWarp;
  const BackwardWarp w = backward_warp(args, blockIdx.x, blockIdx.y, warp);
  acc_t acc[kTileRows][kMicro];
#pragma unroll
  for (int r = 0; r < kTileRows; ++r)
#pragma unroll
    for (int i = 0; i < kMicro; ++i) acc[r][i] = acc_t(0);
  for (int32_t c = 0; c < table.clusters; ++c) {
    for (int64_t j0 = 0; j0 < args.v.channels; j0 += JointConfig<acc_t>::kWindowChannels) {
      __syncthreads();  // every warp is done with the previous window
      backward_load(args, table, w.tile, c, j0, warp, warps, lane, shared);
      __syncthreads();
      backward_accumulate(args, table, w, c, j0, lane, shared, acc);
    }
  }
  backward_store(args, w, lane, acc);
}

// Rows, columns and planes are int32 inside a tile's arithmetic (offsets and window corners);
// a spatial size must leave room for a tile and a window past it.
void check_extents(const Volume& v) {
  constexpr int64_t limit = std::numeric_limits<int32_t>::max() - 2 * kMaxWindow;
  TORCH_CHECK(v.depth < limit && v.height < limit && v.width < limit,
              "bimi_C (cuda): each spatial size must be below ", limit);
}

// The dynamic shared memory one block of `kernel` may use on the current device: all the device
// allows a block (with the opt-in above 48 KB) less the kernel's own static shared memory. The
// planner sizes its windows to this figure and every launch is checked against it, so the two can
// never disagree. The kernel's limit is set to it on the first call per kernel and device, so
// later launches (a hot loop, a CUDA graph capture) make no driver call.
template <typename Kernel>
size_t dynamic_shared_limit(Kernel kernel) {
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, size_t> limits;
  const std::lock_guard<std::mutex> lock(mutex);
  const std::pair<const void*, int> key{reinterpret_cast<const void*>(kernel), c10::cuda::current_device()};
  auto limit = limits.find(key);
  if (limit == limits.end()) {
    cudaFuncAttributes attributes;
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
    const size_t optin = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
    const size_t dynamic = optin - std::min(optin, attributes.sharedSizeBytes);
    // set whatever the figure: a kernel's default allows 48 KB less its static memory, not 48 KB
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(dynamic)));
    limit = limits.emplace(key, dynamic).first;
  }
  return limit->second;
}

// A planned block's shared memory against that limit (the planner's windows keep it within).
void check_shared_memory(size_t bytes, int64_t limit) {
  TORCH_CHECK(static_cast<int64_t>(bytes) <= limit, "bimi_C (cuda): a joint-count block needs ", bytes,
              " bytes of shared memory, this GPU allows ", limit);
}

const at::Tensor& checked_cuda_first_map(const at::Tensor& p1, const at::Tensor& p2,
                                         const std::optional<at::Tensor>& mask) {
  check_joint_inputs(p1, p2, mask);
  TORCH_CHECK(p1.is_cuda(), "bimi_C (cuda): p1 must be a CUDA tensor");
  return p1;
}

// The checked inputs of one joint-count call (forward or backward), on its device for the
// call's lifetime: contiguous maps, the mask in the maps' dtype, the volume and the offsets.
struct JointCall {
  const c10::cuda::CUDAGuard guard;
  const at::Tensor p1, p2, mask;
  const Volume v;
  const std::vector<Offset3> offsets;
  const int64_t num_offsets;
  const int64_t k;  // channels

  JointCall(const at::Tensor& p1_in, const at::Tensor& p2_in, at::IntArrayRef flat_offsets,
            const std::optional<at::Tensor>& mask_in)
      : guard(checked_cuda_first_map(p1_in, p2_in, mask_in).device()),
        p1(p1_in.contiguous()),
        p2(p2_in.contiguous()),
        mask(mask_like(mask_in, p1)),
        v(volume_of(p1)),
        offsets(parse_offsets(p1, flat_offsets)),
        num_offsets(static_cast<int64_t>(offsets.size())),
        k(v.channels) {
    check_extents(v);
  }
};

at::Tensor joint_counts_cuda(const at::Tensor& p1_in, const at::Tensor& p2_in,
                             at::IntArrayRef flat_offsets, const std::optional<at::Tensor>& mask_in) {
  const JointCall call(p1_in, p2_in, flat_offsets, mask_in);
  const auto acc_options = call.p1.options().dtype(accumulation_type(call.p1.scalar_type()));
  at::Tensor joint = at::empty({call.num_offsets, call.k, call.k}, acc_options);
  if (call.v.batch * call.v.voxels() == 0) return joint.zero_();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, call.p1.scalar_type(), "bimi_joint_counts_cuda", [&] {
    using acc_t = acc_type_t<scalar_t>;
    using Config = JointConfig<acc_t>;
    const auto kernel = joint_forward_kernel<scalar_t, acc_t>;
    const auto shared_limit = static_cast<int64_t>(dynamic_shared_limit(kernel));
    std::vector<JointLaunch> launches = plan_joint_launches(
        call.offsets, +1, forward_window_cap(call.k, Config::kGroupBlocks, sizeof(acc_t), shared_limit));
    const ForwardShape shape = forward_shape(launches, call.k, Config::kRun, Config::kGroupBlocks);
    const int64_t largest = set_forward_blocks(launches, shape, Config::kRun);
    TORCH_CHECK(largest <= std::numeric_limits<int32_t>::max(), "bimi_C (cuda): K = ", call.k,
                " is too large for the joint-count forward");
    const int64_t tiles = tile_count(call.v);
    const int64_t chunks = forward_chunks_for(call.offsets, call.k, Config::kRun, Config::kGroupBlocks, tiles);
    at::Tensor partials = chunks == 1 ? joint : at::empty({chunks, call.num_offsets, call.k, call.k}, acc_options);

    const JointForwardArgs<scalar_t, acc_t> args = forward_args(
        call.p1.data_ptr<scalar_t>(), call.p2.data_ptr<scalar_t>(),
        call.mask.defined() ? call.mask.data_ptr<scalar_t>() : nullptr, call.v, shape, call.num_offsets, tiles,
        chunks, partials.data_ptr<acc_t>());
    for (const JointLaunch& launch : launches) {
      const size_t shared_bytes = forward_shared_elements(shape, launch) * sizeof(acc_t);
      check_shared_memory(shared_bytes, shared_limit);
      const dim3 grid(static_cast<unsigned>(launch.table.block_begin[launch.table.clusters]),
                      static_cast<unsigned>(chunks));
      kernel<<<grid, shape.warps() * kWarp, shared_bytes, stream>>>(args, launch.table);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (chunks > 1) {
      const int64_t size = call.num_offsets * call.k * call.k;
      sum_partials_kernel<acc_t><<<blocks_for(size), kThreads, 0, stream>>>(
          partials.data_ptr<acc_t>(), chunks, size, joint.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return joint;
}

// The gradient of the map in the first role: `second` is the other map, G read transposed and
// the offsets negated for the p2 gradient (sign = -1).
template <typename scalar_t, typename acc_t>
void joint_backward_role(const at::Tensor& second, const at::Tensor& mask, const Volume& v,
                         const std::vector<Offset3>& offsets, int sign, const at::Tensor& g,
                         at::Tensor& out, cudaStream_t stream) {
  using Config = JointConfig<acc_t>;
  const auto kernel = joint_backward_kernel<scalar_t, acc_t>;
  const auto shared_limit = static_cast<int64_t>(dynamic_shared_limit(kernel));
  const std::vector<JointLaunch> launches = plan_joint_launches(
      offsets, sign, backward_window_cap(v.channels, Config::kWindowChannels, sizeof(acc_t), shared_limit));
  const int32_t warps = backward_warps(v.channels);
  const int64_t i_groups = backward_i_groups(v.channels);
  const int64_t tiles = tile_count(v);
  TORCH_CHECK(i_groups <= 65535 && tiles <= std::numeric_limits<int32_t>::max(),
              "bimi_C (cuda): K or the map is too large for one joint-count backward launch");
  // more than one table: the launches pass their raw sums on in the accumulation dtype
  at::Tensor carry;
  if (launches.size() > 1) carry = at::empty(out.sizes(), out.options().dtype(g.scalar_type()));

  JointBackwardArgs<scalar_t, acc_t> args;
  args.second = second.data_ptr<scalar_t>();
  args.mask = mask.defined() ? mask.data_ptr<scalar_t>() : nullptr;
  args.v = v;
  args.g = g.data_ptr<acc_t>();
  args.transpose_g = sign < 0;
  args.warps = warps;
  args.out = out.data_ptr<scalar_t>();
  for (size_t l = 0; l < launches.size(); ++l) {
    args.carry_in = l > 0 ? carry.data_ptr<acc_t>() : nullptr;
    args.carry_out = l + 1 < launches.size() ? carry.data_ptr<acc_t>() : nullptr;
    const size_t shared_bytes =
        backward_shared_elements(v.channels, Config::kWindowChannels, launches[l]) * sizeof(acc_t);
    check_shared_memory(shared_bytes, shared_limit);
    const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(i_groups));
    kernel<<<grid, warps * kWarp, shared_bytes, stream>>>(args, launches[l].table);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

std::tuple<at::Tensor, at::Tensor> joint_counts_backward_cuda(
    const at::Tensor& grad_joint_in, const at::Tensor& p1_in, const at::Tensor& p2_in,
    at::IntArrayRef flat_offsets, const std::optional<at::Tensor>& mask_in) {
  const JointCall call(p1_in, p2_in, flat_offsets, mask_in);
  TORCH_CHECK(grad_joint_in.device() == p1_in.device(), "bimi_C (cuda): grad_J must be on the device of p1");
  TORCH_CHECK(grad_joint_in.sizes() == at::IntArrayRef({call.num_offsets, call.k, call.k}),
              "bimi_C: grad_J must be (|O|, K, K), got ", grad_joint_in.sizes());
  const at::Tensor g = grad_joint_in.to(accumulation_type(call.p1.scalar_type())).contiguous();
  at::Tensor grad_p1 = at::empty_like(call.p1);
  at::Tensor grad_p2 = at::empty_like(call.p2);
  if (call.v.batch * call.v.voxels() == 0) return {grad_p1, grad_p2};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, call.p1.scalar_type(), "bimi_joint_counts_backward_cuda", [&] {
    using acc_t = acc_type_t<scalar_t>;
    joint_backward_role<scalar_t, acc_t>(call.p2, call.mask, call.v, call.offsets, +1, g, grad_p1, stream);
    joint_backward_role<scalar_t, acc_t>(call.p1, call.mask, call.v, call.offsets, -1, g, grad_p2, stream);
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
