// Which build of the vectorised loops (simd_kernels.h) runs: AVX2+FMA where the processor has
// both, the baseline build elsewhere or when BIMI_CPU_ISA=generic.
#include <cstdlib>
#include <cstring>

#include "simd_kernels.h"

namespace bimi {
namespace cpu {

bool use_avx2() {
#if defined(BIMI_HAVE_AVX2_KERNELS)
  static const bool supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const char* requested = std::getenv("BIMI_CPU_ISA");
  if (requested != nullptr && std::strcmp(requested, "generic") == 0) return false;
  return supported;
#else
  return false;
#endif
}

}  // namespace cpu
}  // namespace bimi
