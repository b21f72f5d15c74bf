// The table of one build's inner loops (CpuKernels of kernels.h), defined in namespace
// bimi::cpu::BIMI_CPU_ISA for float and double. Included once by each of kernels_generic.cpp,
// kernels_avx2.cpp and kernels_avx512.cpp: the per-ISA builds of the same source.
#pragma once

#include "boundary_rows.h"
#include "edge_rows.h"
#include "external_headers.h"
#include "joint_tiles.h"

namespace bimi::cpu::BIMI_CPU_ISA {

#define BIMI_CPU_ISA_NAME_(isa) #isa
#define BIMI_CPU_ISA_NAME(isa) BIMI_CPU_ISA_NAME_(isa)

template <typename acc_t>
CpuKernels<acc_t> isa_kernels() {
  return {BIMI_CPU_ISA_NAME(BIMI_CPU_ISA), joint_tile_kernels<acc_t>(), boundary_row_kernels<acc_t>(),
          edge_row_kernels<acc_t>()};
}

template CpuKernels<float> isa_kernels<float>();
template CpuKernels<double> isa_kernels<double>();

}  // namespace bimi::cpu::BIMI_CPU_ISA
