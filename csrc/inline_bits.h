// Small helpers shared by the CPU and CUDA kernels; light on purpose (nvcc
// compiles it).
#pragma once

#include <cstdint>

// Per-element functions must inline into the CPU loops: a call per element keeps
// GCC from vectorising them (they exceed its default inline budget).
#if defined(__CUDACC__)
#define SPARSEMOM_FORCE_INLINE __forceinline__
#else
#define SPARSEMOM_FORCE_INLINE __attribute__((always_inline)) inline
#endif

namespace sparsemom {

// The unsigned integer type of a given width: float values are handled as their
// bit patterns (masking by AND, radix keys).
template <int kBytes>
struct BitsOfSize;
template <>
struct BitsOfSize<2> { using type = uint16_t; };
template <>
struct BitsOfSize<4> { using type = uint32_t; };
template <>
struct BitsOfSize<8> { using type = uint64_t; };

}  // namespace sparsemom
