// The vectors of the CPU inner loops and their memory access: 32-byte GCC/Clang vector extension
// types (AVX2 registers in the AVX2 build, pairs of SSE2 registers in the baseline one), loads,
// stores, broadcasts, row tails, and lane reductions (sum, running min and max).
//
// The SIMD headers are compiled once per instruction set, inside namespace
// bimi::cpu::BIMI_CPU_ISA, by kernels_generic.cpp, kernels_avx2.cpp and kernels_avx512.cpp
// (csrc/README.md); the last two also define BIMI_CPU_ISA_IS_AVX2, which selects the few AVX2
// intrinsics below, and BIMI_CPU_VECTOR_REGISTERS, which sizes the register blocks.
#pragma once

#include "external_headers.h"

#if !defined(BIMI_CPU_ISA)
#error "BIMI_CPU_ISA must name the build (generic, avx2 or avx512) before a csrc/cpu/simd header is included"
#endif

// Full unrolling of loops over compile-time accumulator arrays, which keeps them in registers.
#if defined(__clang__)
#define BIMI_UNROLL _Pragma("unroll")
#else
#define BIMI_UNROLL _Pragma("GCC unroll 16")
#endif

#if !defined(BIMI_CPU_VECTOR_REGISTERS)
#define BIMI_CPU_VECTOR_REGISTERS 16
#endif

namespace bimi::cpu::BIMI_CPU_ISA {
namespace {

// Vector registers the register blocks may fill: 16 with AVX2, 32 with AVX-512VL (its EVEX
// encoding reaches ymm16-31 also for 32-byte vectors).
constexpr int kVectorRegisters = BIMI_CPU_VECTOR_REGISTERS;

template <typename acc_t>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(32)));
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(32)));
};

// The integer vector of the same lane count (comparison results, exponent bits).
template <typename acc_t>
struct IntVec;
template <>
struct IntVec<float> {
  typedef int32_t lane;
  typedef int32_t type __attribute__((vector_size(32)));
};
template <>
struct IntVec<double> {
  typedef int64_t lane;
  typedef int64_t type __attribute__((vector_size(32)));
};

template <typename acc_t>
inline typename Vec<acc_t>::type load(const acc_t* p) {
  typename Vec<acc_t>::type v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

template <typename acc_t>
inline void store(acc_t* p, const typename Vec<acc_t>::type& v) {
  __builtin_memcpy(p, &v, sizeof(v));
}

template <typename acc_t>
inline typename Vec<acc_t>::type broadcast(acc_t s) {
  typename Vec<acc_t>::type v = {};
  return v + s;
}

// One value loaded from memory into every lane. The AVX2 unit uses vbroadcastss/sd straight from
// memory: GCC lowers `v + s` to a scalar add plus a shuffle, two extra FP-pipe ops per use.
#if defined(BIMI_CPU_ISA_IS_AVX2)
inline Vec<float>::type broadcast_load(const float* p) { return _mm256_broadcast_ss(p); }
inline Vec<double>::type broadcast_load(const double* p) { return _mm256_broadcast_sd(p); }
#else
template <typename acc_t>
inline typename Vec<acc_t>::type broadcast_load(const acc_t* p) {
  return broadcast<acc_t>(*p);
}
#endif

// The pixels [x, x + L) of a row that may end inside the vector: full vectors are read in place,
// the last partial one through a zero-padded copy.
template <typename acc_t>
struct RowTail {
  static constexpr int64_t L = vector_lanes<acc_t>();
  acc_t values[L];
  RowTail(const acc_t* row, int64_t x, int64_t n) {
    for (int64_t l = 0; l < L; ++l) values[l] = x + l < n ? row[x + l] : acc_t(0);
  }
};

template <typename acc_t>
inline typename Vec<acc_t>::type load_part(const acc_t* row, int64_t x, int64_t n) {
  if (x + vector_lanes<acc_t>() <= n) return load(row + x);
  return load(RowTail<acc_t>(row, x, n).values);
}

template <typename acc_t>
inline void store_part(acc_t* row, int64_t x, int64_t n, const typename Vec<acc_t>::type& v) {
  constexpr int64_t L = vector_lanes<acc_t>();
  if (x + L <= n) return store(row + x, v);
  acc_t values[L];
  store(values, v);
  for (int64_t l = 0; x + l < n; ++l) row[x + l] = values[l];
}

// Lanes summed pairwise in a fixed order.
template <typename acc_t>
inline acc_t horizontal_sum(const typename Vec<acc_t>::type& v) {
  constexpr int lanes = static_cast<int>(vector_lanes<acc_t>());
  acc_t t[lanes];
  __builtin_memcpy(t, &v, sizeof(v));
  for (int width = lanes / 2; width > 0; width /= 2)
    for (int l = 0; l < width; ++l) t[l] += t[l + width];
  return t[0];
}

// Whether every lane of a comparison result is true (all bits set).
#if defined(BIMI_CPU_ISA_IS_AVX2)
inline bool all_lanes(const IntVec<float>::type& m) {
  return _mm256_movemask_ps(_mm256_castsi256_ps((__m256i)m)) == 0xff;
}
inline bool all_lanes(const IntVec<double>::type& m) {
  return _mm256_movemask_pd(_mm256_castsi256_pd((__m256i)m)) == 0xf;
}
#else
template <typename I>
inline bool all_lanes(const I& m) {
  constexpr int lanes = static_cast<int>(sizeof(I) / sizeof(m[0]));
  bool all = true;
  for (int l = 0; l < lanes; ++l) all &= m[l] != 0;
  return all;
}
#endif

// Min and max over vectors of values, then over single values (a row's tail). A NaN sticks: once
// one is seen the bound is NaN, as with torch's amin/amax (the reference); `v < low ? v : low`
// alone would skip it and give a finite loss for a NaN input (docs/contract.md §8).
template <typename acc_t>
struct RunningRange {
  using V = typename Vec<acc_t>::type;
  V low, high;
  acc_t lo, hi;

  // Written out: an implicit constructor would not get the AVX2 target of this unit.
  RunningRange()
      : low(broadcast<acc_t>(std::numeric_limits<acc_t>::infinity())),
        high(broadcast<acc_t>(-std::numeric_limits<acc_t>::infinity())),
        lo(std::numeric_limits<acc_t>::infinity()),
        hi(-std::numeric_limits<acc_t>::infinity()) {}

  void add(const V& v) {
    low = ((v < low) | (v != v)) ? v : low;
    high = ((v > high) | (v != v)) ? v : high;
  }
  void add(acc_t value) {
    lo = (value < lo || value != value) ? value : lo;
    hi = (value > hi || value != value) ? value : hi;
  }
  void result(acc_t* out_lo, acc_t* out_hi) const {
    constexpr int64_t L = vector_lanes<acc_t>();
    acc_t low_lanes[L], high_lanes[L];
    store(low_lanes, low);
    store(high_lanes, high);
    *out_lo = lo;
    *out_hi = hi;
    for (int64_t l = 0; l < L; ++l) {
      const acc_t l_lo = low_lanes[l], l_hi = high_lanes[l];
      *out_lo = (l_lo < *out_lo || l_lo != l_lo) ? l_lo : *out_lo;
      *out_hi = (l_hi > *out_hi || l_hi != l_hi) ? l_hi : *out_hi;
    }
  }
};

}  // namespace
}  // namespace bimi::cpu::BIMI_CPU_ISA
