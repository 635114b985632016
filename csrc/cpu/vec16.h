// The 16-lane float vector of each CPU ISA the kernels are compiled for, shared by
// the kernel files (csr_cpu.cpp, csr_conv_cpu.cpp). Each is 16 float lanes with the same
// per-lane arithmetic (one rounding per fused multiply-add) and the same reduction tree
// (lanes i and i + 8, then i + 4, i + 2, i + 1), which is what makes the ISAs agree to
// the bit. A kernel file includes its kernel body once per ISA, inside
// SPARSEMOM_BEGIN_TARGET(isa) ... SPARSEMOM_END_TARGET and a namespace of its own with
// `using V = vec16::isa_<name>::V;`, so the body is compiled for that ISA.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "../inline_bits.h"
#include "cpu_isa.h"

#if SPARSEMOM_HAVE_X86_ISA_VARIANTS
#if defined(__clang__)
#define SPARSEMOM_BEGIN_TARGET(isa) \
  _Pragma(SPARSEMOM_PRAGMA_STR(clang attribute push(__attribute__((target(isa))), apply_to = function)))
#define SPARSEMOM_END_TARGET _Pragma("clang attribute pop")
#else
#define SPARSEMOM_BEGIN_TARGET(isa) \
  _Pragma("GCC push_options") _Pragma(SPARSEMOM_PRAGMA_STR(GCC target(isa)))
#define SPARSEMOM_END_TARGET _Pragma("GCC pop_options")
#endif
#define SPARSEMOM_PRAGMA_STR(...) #__VA_ARGS__
#endif

namespace sparsemom::vec16 {

namespace isa_default {
// Portable: 16 scalar lanes of T (float32; csr_conv_cpu.cpp also takes float64).
template <typename T>
struct Lanes {
  using Scalar = T;
  T lane[16];
  static SPARSEMOM_FORCE_INLINE Lanes zero() { return broadcast(T(0)); }
  static SPARSEMOM_FORCE_INLINE Lanes broadcast(T x) {
    Lanes r;
    for (int i = 0; i < 16; ++i) r.lane[i] = x;
    return r;
  }
  static SPARSEMOM_FORCE_INLINE Lanes load(const T* p) { return load_partial(p, 16); }
  static SPARSEMOM_FORCE_INLINE Lanes load_partial(const T* p, int n) {
    Lanes r;
    for (int i = 0; i < 16; ++i) r.lane[i] = i < n ? p[i] : T(0);
    return r;
  }
  SPARSEMOM_FORCE_INLINE void store(T* p) const { store_partial(p, 16); }
  SPARSEMOM_FORCE_INLINE void store_partial(T* p, int n) const {
    for (int i = 0; i < n; ++i) p[i] = lane[i];
  }
  static SPARSEMOM_FORCE_INLINE Lanes fma(const Lanes& a, const Lanes& b, const Lanes& c) {
    Lanes r;
    for (int i = 0; i < 16; ++i) r.lane[i] = std::fma(a.lane[i], b.lane[i], c.lane[i]);
    return r;
  }
  SPARSEMOM_FORCE_INLINE T reduce() const {
    T s[8];
    for (int i = 0; i < 8; ++i) s[i] = lane[i] + lane[i + 8];
    for (int i = 0; i < 4; ++i) s[i] = s[i] + s[i + 4];
    for (int i = 0; i < 2; ++i) s[i] = s[i] + s[i + 2];
    return s[0] + s[1];
  }
  // The lane sums of v[0..3], each as reduce() takes it.
  static SPARSEMOM_FORCE_INLINE void reduce4(const Lanes* v, T* out) {
    for (int q = 0; q < 4; ++q) out[q] = v[q].reduce();
  }
};
using V = Lanes<float>;
}  // namespace isa_default

#if SPARSEMOM_HAVE_X86_ISA_VARIANTS
// Sum of the 8 lanes of s as the tree above: (i, i+4), (i, i+2), (i, i+1).
#define SPARSEMOM_REDUCE8(s)                                                          \
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1)); \
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));                            \
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));

SPARSEMOM_BEGIN_TARGET("avx2,fma")
namespace isa_avx2 {
// Two 8-lane halves: lanes 0-7 and 8-15 of the 16-lane vector.
struct V {
  using Scalar = float;
  __m256 lo, hi;
  static SPARSEMOM_FORCE_INLINE __m256i lanes_below(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static SPARSEMOM_FORCE_INLINE V zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
  static SPARSEMOM_FORCE_INLINE V broadcast(float x) { return {_mm256_set1_ps(x), _mm256_set1_ps(x)}; }
  static SPARSEMOM_FORCE_INLINE V load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
  static SPARSEMOM_FORCE_INLINE V load_partial(const float* p, int n) {
    return {_mm256_maskload_ps(p, lanes_below(n)), _mm256_maskload_ps(p + 8, lanes_below(n - 8))};
  }
  SPARSEMOM_FORCE_INLINE void store(float* p) const {
    _mm256_storeu_ps(p, lo);
    _mm256_storeu_ps(p + 8, hi);
  }
  SPARSEMOM_FORCE_INLINE void store_partial(float* p, int n) const {
    _mm256_maskstore_ps(p, lanes_below(n), lo);
    _mm256_maskstore_ps(p + 8, lanes_below(n - 8), hi);
  }
  static SPARSEMOM_FORCE_INLINE V fma(const V& a, const V& b, const V& c) {
    return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
  }
  SPARSEMOM_FORCE_INLINE float reduce() const {
    const __m256 s = _mm256_add_ps(lo, hi);
    SPARSEMOM_REDUCE8(s)
  }
  static SPARSEMOM_FORCE_INLINE void reduce4(const V* v, float* out) {
    for (int q = 0; q < 4; ++q) out[q] = v[q].reduce();
  }
};
}  // namespace isa_avx2
SPARSEMOM_END_TARGET

// GCC 12 reports the undefined-vector placeholders inside its own AVX-512 intrinsic
// headers as (maybe-)uninitialized once they are inlined (a false positive: those
// lanes are never read); kernel files silence it around their AVX-512 bodies too.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
SPARSEMOM_BEGIN_TARGET("avx512f,avx512vl,avx512dq,avx2,fma")
namespace isa_avx512 {
struct V {
  using Scalar = float;
  __m512 v;
  static SPARSEMOM_FORCE_INLINE __mmask16 lanes_below(int n) {
    return static_cast<__mmask16>((1u << n) - 1u);
  }
  static SPARSEMOM_FORCE_INLINE V zero() { return {_mm512_setzero_ps()}; }
  static SPARSEMOM_FORCE_INLINE V broadcast(float x) { return {_mm512_set1_ps(x)}; }
  static SPARSEMOM_FORCE_INLINE V load(const float* p) { return {_mm512_loadu_ps(p)}; }
  static SPARSEMOM_FORCE_INLINE V load_partial(const float* p, int n) {
    // mask_loadu from zeros, not maskz_loadu: the latter trips a false
    // -Wmaybe-uninitialized inside GCC 12's own header.
    return {_mm512_mask_loadu_ps(_mm512_setzero_ps(), lanes_below(n), p)};
  }
  SPARSEMOM_FORCE_INLINE void store(float* p) const { _mm512_storeu_ps(p, v); }
  SPARSEMOM_FORCE_INLINE void store_partial(float* p, int n) const {
    _mm512_mask_storeu_ps(p, lanes_below(n), v);
  }
  static SPARSEMOM_FORCE_INLINE V fma(const V& a, const V& b, const V& c) {
    return {_mm512_fmadd_ps(a.v, b.v, c.v)};
  }
  SPARSEMOM_FORCE_INLINE float reduce() const {
    const __m256 s = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
    SPARSEMOM_REDUCE8(s)
  }
  // Four reductions at once, the same tree on the same lanes (so the same bits as
  // reduce()), in 15 vector instructions instead of 4 x 8. 128-bit lanes are named
  // L0..L3; each step halves the partial sums per vector and doubles the vectors per
  // register.
  static SPARSEMOM_FORCE_INLINE void reduce4(const V* v, float* out) {
    // Lanes i + (i + 8): (a, b) -> [a.L0 + a.L2, a.L1 + a.L3, b.L0 + b.L2, b.L1 + b.L3].
    const __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(v[0].v, v[1].v, 0x44),
                                    _mm512_shuffle_f32x4(v[0].v, v[1].v, 0xEE));
    const __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(v[2].v, v[3].v, 0x44),
                                    _mm512_shuffle_f32x4(v[2].v, v[3].v, 0xEE));
    // Lanes i + (i + 4): one 128-bit lane of 4 partial sums per vector, a b c d.
    const __m512 s4 = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xDD));
    // Then i + (i + 2) and i + (i + 1) within each 128-bit lane; the sums land in lanes 0, 4, 8, 12.
    const __m512 s2 = _mm512_add_ps(s4, _mm512_permute_ps(s4, 0xEE));
    const __m512 s1 = _mm512_add_ps(s2, _mm512_permute_ps(s2, 0x01));
    const __m512 sums = _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0), s1);
    _mm_storeu_ps(out, _mm512_castps512_ps128(sums));
  }
};
}  // namespace isa_avx512
SPARSEMOM_END_TARGET
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#undef SPARSEMOM_REDUCE8
#endif  // SPARSEMOM_HAVE_X86_ISA_VARIANTS

}  // namespace sparsemom::vec16
