// Host/device qualifiers shared by the CPU and CUDA builds of the tile math.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define BIMI_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// Forced: the CPU row loops (cpu/simd/boundary_rows.h) are vectorised only once this math is
// inlined into them, and GCC does not inline it on its own into functions built for AVX2.
#define BIMI_HD inline __attribute__((always_inline))
#else
#define BIMI_HD inline
#endif
