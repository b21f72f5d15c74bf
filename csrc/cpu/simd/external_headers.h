// Every header from outside csrc/cpu/simd that the SIMD headers use. Each SIMD header includes it
// first, and kernels_avx2.cpp includes it before its AVX2 target region: an inline function first
// seen inside the region would be compiled for AVX2 and could be the copy the linker keeps for
// the baseline build too (csrc/README.md).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "../../common/boundary_math.h"
#include "../../common/numerics.h"
#include "../kernels.h"
