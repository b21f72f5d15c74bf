// Helpers shared by the CUDA kernels: launch sizes, the accumulation type and fixed-order block and
// warp reductions (no atomics: every reduction gives the same result on every run).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <type_traits>

#include "../common/geometry.h"
#include "../common/numerics.h"
#include "reductions.h"  // kThreads, lower_of, higher_of

namespace bimi {
namespace cuda {

using bimi::acc_type_t;  // the one definition: common/numerics.h

inline int64_t blocks_for(int64_t items, int64_t threads = kThreads) {
  return ceil_div(items, threads);
}

// Sum of one value per thread over a block of kThreads threads, in a fixed tree order; the
// result is valid in thread 0. `scratch` holds kThreads values of shared memory.
template <typename acc_t>
__device__ acc_t block_sum(acc_t value, acc_t* scratch) {
  scratch[threadIdx.x] = value;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) scratch[threadIdx.x] += scratch[threadIdx.x + stride];
    __syncthreads();
  }
  return scratch[0];
}

// Sum over the 32 lanes of a warp by a fixed butterfly (every lane gets the same total, the same
// on every run). Every lane of the warp must call it.
template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t value) {
#pragma unroll
  for (int mask = 16; mask >= 1; mask /= 2) value += __shfl_xor_sync(0xffffffffu, value, mask);
  return value;
}

// The min and max of one value pair per thread over a block of kThreads threads (a tree in
// shared memory, NaN-sticky as lower_of); valid in scratch_lo[0] and scratch_hi[0] for every
// thread afterwards.
template <typename acc_t>
__device__ void block_min_max(acc_t lo, acc_t hi, acc_t* scratch_lo, acc_t* scratch_hi) {
  scratch_lo[threadIdx.x] = lo;
  scratch_hi[threadIdx.x] = hi;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) {
      scratch_lo[threadIdx.x] = lower_of(scratch_lo[threadIdx.x], scratch_lo[threadIdx.x + stride]);
      scratch_hi[threadIdx.x] = higher_of(scratch_hi[threadIdx.x], scratch_hi[threadIdx.x + stride]);
    }
    __syncthreads();
  }
}

// out[e] = sum over c of partials[c * size + e], c ascending: the second, fixed-order stage of
// every reduction (no atomics, so the result is the same on every run).
template <typename acc_t>
__global__ void sum_partials_kernel(const acc_t* __restrict__ partials, int64_t parts, int64_t size,
                                    acc_t* __restrict__ out) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= size) return;
  acc_t total = 0;
  for (int64_t c = 0; c < parts; ++c) total += partials[c * size + e];
  out[e] = total;
}

}  // namespace cuda
}  // namespace bimi
