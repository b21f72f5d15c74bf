// Which build of the inner loops (kernels.h) runs: AVX2+FMA where the processor has both, the
// baseline build elsewhere or when BIMI_CPU_ISA=generic.
#include <cstdlib>
#include <cstring>

#include "kernels.h"

namespace bimi::cpu {
namespace {

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

}  // namespace

template <typename acc_t>
CpuKernels<acc_t> selected_kernels() {
#if defined(BIMI_HAVE_AVX2_KERNELS)
  if (use_avx2()) return avx2::isa_kernels<acc_t>();
#endif
  return generic::isa_kernels<acc_t>();
}

const char* selected_isa_name() { return use_avx2() ? "avx2" : "generic"; }

template CpuKernels<float> selected_kernels<float>();
template CpuKernels<double> selected_kernels<double>();

}  // namespace bimi::cpu
