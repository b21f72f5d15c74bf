// The inner loops of the CPU kernels (kernels.h, simd/) compiled for AVX-512F+VL on 32-byte
// vectors: the AVX2 build's source and intrinsics, with AVX-512VL's 32 vector registers (EVEX
// encoding) for larger register blocks of the joint counts' forward, and 256-bit vectors
// everywhere (setup.py's -mprefer-vector-width=256, which target attributes cannot set on every
// compiler), so it adds the same terms in the same order as the AVX2 build and agrees with it bit
// for bit. selected_kernels() picks it where the processor has AVX2, FMA, AVX-512F and AVX-512VL.
// The rules this depends on are in csrc/README.md.
#include "simd/external_headers.h"  // every outside header before the target region

#if defined(BIMI_HAVE_AVX512_KERNELS)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,avx512f,avx512vl"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,avx512f,avx512vl")
#endif

#define BIMI_CPU_ISA avx512
#define BIMI_CPU_ISA_IS_AVX2 1
#define BIMI_CPU_VECTOR_REGISTERS 32
#include "simd/isa_kernels.h"

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif
