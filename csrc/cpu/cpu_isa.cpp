#include "cpu_isa.h"

#include <cstdlib>
#include <cstring>

namespace sparsemom::cpu {

Isa detected_isa() {
#if SPARSEMOM_HAVE_X86_ISA_VARIANTS
  static const Isa isa = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq")) {
      return Isa::kAvx512;
    }
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
    return Isa::kDefault;
  }();
  return isa;
#else
  return Isa::kDefault;
#endif
}

Isa active_isa() {
  static const Isa isa = [] {
    Isa best = detected_isa();
    const char* cap = std::getenv("SPARSEMOM_CPU_ISA");
    if (cap == nullptr || *cap == '\0') return best;
    Isa wanted = best;
    if (std::strcmp(cap, "default") == 0) wanted = Isa::kDefault;
    else if (std::strcmp(cap, "avx2") == 0) wanted = Isa::kAvx2;
    else if (std::strcmp(cap, "avx512") == 0) wanted = Isa::kAvx512;
    // An unknown value keeps the best ISA; build_info() shows what is in use.
    return static_cast<int>(wanted) < static_cast<int>(best) ? wanted : best;
  }();
  return isa;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "default";
  }
}

}  // namespace sparsemom::cpu
