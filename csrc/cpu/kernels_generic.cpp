// The inner loops of the CPU kernels (kernels.h, simd/) for the baseline x86-64 (or any other) ISA.
#define BIMI_CPU_ISA generic
#include "simd/isa_kernels.h"
