// The numerics constants and the accumulation-type rule of the loss (docs/contract.md §8), for
// the CPU and CUDA kernels (compiled by nvcc too: no ATen here). The Python side takes the same
// values from bimi_kernels/numerics.py.
#pragma once

#include <type_traits>

namespace bimi {

constexpr double kEpsLogU = 1e-16;   // inside the log of the uncertainty map
constexpr double kEpsMinMax = 1e-6;  // denominator of the min-max normalisation
constexpr double kEpsCC = 1e-5;      // clamp of the cross term and the variances

// The accumulation type of a map's dtype: double stays double, float, half and bfloat16
// accumulate in float. host_checks.h's accumulation_type(ScalarType) derives the dtype from it.
template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

}  // namespace bimi
