// Which build of the inner loops (kernels.h) runs: AVX2+FMA where the processor has both, the
// baseline build elsewhere or when BIMI_CPU_ISA=generic.
#include <cctype>
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "kernels.h"

namespace bimi::cpu {
namespace {

// BIMI_CPU_ISA, read on every call (a test or a user may set it after import): unset or empty,
// the best build the processor runs; "generic" (any case), the baseline; anything else is an
// error rather than a silent default (a typo would otherwise measure the wrong build).
bool generic_requested() {
  const char* requested = std::getenv("BIMI_CPU_ISA");
  if (requested == nullptr) return false;
  std::string value;
  for (const char* c = requested; *c != '\0'; ++c) value += static_cast<char>(std::tolower(static_cast<unsigned char>(*c)));
  if (value.empty()) return false;
  if (value == "generic") return true;
  throw std::invalid_argument("BIMI_CPU_ISA: expected 'generic' (the baseline build of the CPU loops) or unset/empty "
                              "(the best build this processor runs), got '" + std::string(requested) + "'");
}

bool use_avx2() {
  const bool generic = generic_requested();  // checked on every processor and build
#if defined(BIMI_HAVE_AVX2_KERNELS)
  static const bool supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return supported && !generic;
#else
  (void)generic;
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
