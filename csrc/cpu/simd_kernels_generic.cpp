// The inner loops of the CPU kernels (simd_kernels.h) for the baseline x86-64 (or any other) ISA.
#include <cmath>
#include <cstdint>
#include <limits>

#include "../common/boundary_math.h"
#include "simd_kernels.h"

#define BIMI_CPU_ISA generic
#include "simd_kernels_impl.h"
#include "simd_boundary_impl.h"
#undef BIMI_CPU_ISA
