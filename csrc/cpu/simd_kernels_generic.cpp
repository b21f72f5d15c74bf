// The joint-count inner loops for the baseline x86-64 (or any other) ISA.
#include <cmath>
#include <cstdint>
#include <limits>

#include "simd_kernels.h"

#define BIMI_CPU_ISA generic
#include "simd_kernels_impl.h"
#undef BIMI_CPU_ISA
