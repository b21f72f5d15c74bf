// Which build of the inner loops (kernels.h) runs: the best one the processor runs (AVX-512F+VL,
// then AVX2+FMA, then the baseline), or the one BIMI_CPU_ISA names.
#include <cctype>
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "kernels.h"

namespace bimi::cpu {
namespace {

enum class Isa { kGeneric, kAvx2, kAvx512 };

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "generic";
  }
}

bool supported(Isa isa) {
#if defined(BIMI_HAVE_AVX2_KERNELS) && defined(BIMI_HAVE_AVX512_KERNELS)
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  static const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl");
  if (isa == Isa::kAvx512) return avx512;
  if (isa == Isa::kAvx2) return avx2;
#else
  if (isa != Isa::kGeneric) return false;
#endif
  return true;
}

// BIMI_CPU_ISA, read on every call (a test or a user may set it after import): unset or empty,
// the best build the processor runs; "generic", "avx2" or "avx512" (any case), that build, and an
// error if this processor or this build of the extension cannot run it; anything else is an error
// rather than a silent default (a typo would otherwise measure the wrong build).
Isa selected_isa() {
  const char* requested = std::getenv("BIMI_CPU_ISA");
  std::string value;
  for (const char* c = requested ? requested : ""; *c != '\0'; ++c)
    value += static_cast<char>(std::tolower(static_cast<unsigned char>(*c)));
  if (value.empty()) {
    for (Isa isa : {Isa::kAvx512, Isa::kAvx2})
      if (supported(isa)) return isa;
    return Isa::kGeneric;
  }
  for (Isa isa : {Isa::kGeneric, Isa::kAvx2, Isa::kAvx512}) {
    if (value != isa_name(isa)) continue;
    if (!supported(isa))
      throw std::invalid_argument("BIMI_CPU_ISA=" + std::string(requested) + ": this processor (or this build of "
                                  "the extension) cannot run that build of the CPU loops; unset it for the best "
                                  "build it runs");
    return isa;
  }
  throw std::invalid_argument("BIMI_CPU_ISA: expected 'generic' (the baseline build of the CPU loops), 'avx2', "
                              "'avx512' or unset/empty (the best build this processor runs), got '" +
                              std::string(requested) + "'");
}

}  // namespace

template <typename acc_t>
CpuKernels<acc_t> selected_kernels() {
  switch (selected_isa()) {
#if defined(BIMI_HAVE_AVX2_KERNELS) && defined(BIMI_HAVE_AVX512_KERNELS)
    case Isa::kAvx512: return avx512::isa_kernels<acc_t>();
    case Isa::kAvx2: return avx2::isa_kernels<acc_t>();
#endif
    default: return generic::isa_kernels<acc_t>();
  }
}

// The name the dispatched table carries, so that a wrong case above shows (the AVX-512 and AVX2
// builds give the same results: only the name tells them apart in a test).
const char* selected_isa_name() { return selected_kernels<float>().isa; }

template CpuKernels<float> selected_kernels<float>();
template CpuKernels<double> selected_kernels<double>();

}  // namespace bimi::cpu
