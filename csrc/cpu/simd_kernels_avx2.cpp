// The inner loops of the CPU kernels (simd_kernels.h) compiled for AVX2+FMA; cpu/joint.cpp and
// cpu/boundary.cpp call them only when the processor reports both (so the extension still runs on
// older x86-64 machines).
#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "../common/boundary_math.h"
#include "simd_kernels.h"

#if defined(BIMI_HAVE_AVX2_KERNELS)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

#define BIMI_CPU_ISA avx2
#define BIMI_CPU_ISA_IS_AVX2 1
#include "simd_kernels_impl.h"
#include "simd_boundary_impl.h"
#undef BIMI_CPU_ISA_IS_AVX2
#undef BIMI_CPU_ISA

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif
