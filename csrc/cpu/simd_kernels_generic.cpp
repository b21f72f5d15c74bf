// The joint-count inner loops for the baseline x86-64 (or any other) ISA.
#include <cstdint>

#include "joint_kernels.h"

#define BIMI_CPU_ISA generic
#include "joint_kernels_impl.h"
#undef BIMI_CPU_ISA
