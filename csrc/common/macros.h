// Host/device qualifiers shared by the CPU and CUDA builds of the tile math.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define BIMI_HD __host__ __device__ __forceinline__
#else
#define BIMI_HD inline
#endif
