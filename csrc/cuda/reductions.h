// The block size of the CUDA voxel kernels and the NaN-sticky min and max of their range
// reductions, in plain C++ (BIMI_HD) so that the host emulations (tests/emulate_*.cpp) run the
// kernels' own definitions. The device-only reductions (barriers, shuffles) are in common.cuh.
#pragma once

#include "../common/macros.h"

namespace bimi {
namespace cuda {

constexpr int kThreads = 256;

// The smaller (larger) of a running bound and a value, NaN once either is NaN, as torch's
// amin/amax (the reference): fmin-style comparisons would skip a NaN and give a finite loss for
// a NaN input (docs/contract.md §8). NaN-sticky both ways, so any order of a reduction gives the
// same result.
template <typename acc_t>
BIMI_HD acc_t lower_of(acc_t bound, acc_t value) {
  return (value < bound || value != value) ? value : bound;
}
template <typename acc_t>
BIMI_HD acc_t higher_of(acc_t bound, acc_t value) {
  return (value > bound || value != value) ? value : bound;
}

}  // namespace cuda
}  // namespace bimi
