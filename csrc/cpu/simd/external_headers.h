// Every header from outside csrc/cpu/simd that the SIMD headers use. Each SIMD header includes it
// first, and kernels_avx2.cpp and kernels_avx512.cpp include it before their target regions: an
// inline function first seen inside a region would be compiled for that target and could be the
// copy the linker keeps for the baseline build too (csrc/README.md).
#pragma once

#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "../../common/boundary_math.h"
#include "../../common/numerics.h"
#include "../kernels.h"
