// Run-time choice of the CPU vector ISA. The default build targets baseline
// x86-64 (portable wheels); kernels are compiled once per ISA with
// function-level target attributes and the best one the CPU supports is
// picked at run time. SPARSEMOM_CPU_ISA=default|avx2|avx512 caps the choice
// (for testing the fallbacks on a machine that has more).
#pragma once

#include <cstdint>

namespace sparsemom::cpu {

enum class Isa : int { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };

// Best ISA this CPU supports, ignoring SPARSEMOM_CPU_ISA.
Isa detected_isa();
// The ISA kernels use: detected_isa() capped by SPARSEMOM_CPU_ISA, read once.
Isa active_isa();
const char* isa_name(Isa isa);

// The one of three variants of a kernel that active_isa() selects.
template <typename Fn>
Fn pick_for_active_isa(Fn avx512, Fn avx2, Fn fallback) {
  switch (active_isa()) {
    case Isa::kAvx512:
      return avx512;
    case Isa::kAvx2:
      return avx2;
    default:
      return fallback;
  }
}

}  // namespace sparsemom::cpu

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SPARSEMOM_HAVE_X86_ISA_VARIANTS 1
#define SPARSEMOM_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c,bmi2")))
#define SPARSEMOM_TARGET_AVX2 __attribute__((target("avx2,fma,f16c,bmi2")))
#else
#define SPARSEMOM_HAVE_X86_ISA_VARIANTS 0
#define SPARSEMOM_TARGET_AVX512
#define SPARSEMOM_TARGET_AVX2
#endif

// Declares `name_avx512`, `name_avx2`, `name_default`, three copies of the
// range function `name(const Args&, int64_t begin, int64_t end)` compiled for
// each ISA, and `pick_##name()` returning the one active_isa() selects. The
// body must be visible (inline template) so each copy is vectorised for its ISA.
#define SPARSEMOM_DEFINE_ISA_VARIANTS(name)                                           \
  template <typename Args>                                                            \
  SPARSEMOM_TARGET_AVX512 void name##_avx512(const Args& a, int64_t b, int64_t e) {   \
    name(a, b, e);                                                                    \
  }                                                                                   \
  template <typename Args>                                                            \
  SPARSEMOM_TARGET_AVX2 void name##_avx2(const Args& a, int64_t b, int64_t e) {       \
    name(a, b, e);                                                                    \
  }                                                                                   \
  template <typename Args>                                                            \
  void name##_default(const Args& a, int64_t b, int64_t e) {                          \
    name(a, b, e);                                                                    \
  }                                                                                   \
  template <typename Args>                                                            \
  auto pick_##name() -> void (*)(const Args&, int64_t, int64_t) {                     \
    return ::sparsemom::cpu::pick_for_active_isa(&name##_avx512<Args>, &name##_avx2<Args>, \
                                                 &name##_default<Args>);              \
  }
