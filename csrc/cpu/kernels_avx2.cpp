// The inner loops of the CPU kernels (kernels.h, simd/) compiled for AVX2+FMA (16 vector
// registers); selected_kernels() picks them when the processor reports both but not AVX-512F+VL
// (so the extension still runs on older x86-64 machines), or when BIMI_CPU_ISA=avx2. The rules
// this depends on are in csrc/README.md.
#include "simd/external_headers.h"  // every outside header before the target region

#if defined(BIMI_HAVE_AVX2_KERNELS)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

#define BIMI_CPU_ISA avx2
#define BIMI_CPU_ISA_IS_AVX2 1
#define BIMI_CPU_VECTOR_REGISTERS 16
#include "simd/isa_kernels.h"

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif
