// mask_apply_ on CPU: weight[i] = mask[i] ? weight[i] : 0, in place.
// One streaming pass, O(numel), split over threads in contiguous chunks.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>

#include "../inline_bits.h"
#include "../sparsemom.h"
#include "cpu_isa.h"

namespace sparsemom {
namespace {

// The weight is processed as unsigned integers of its width: AND-ing with an
// all-ones/all-zeros word gives +0 at inactive positions branch-free, which
// vectorises; a `mask ? w : 0` loop compiles to a branch per element that
// mispredicts on random masks.
template <typename scalar_t>
struct MaskApplyArgs {
  using bits_t = typename BitsOfSize<sizeof(scalar_t)>::type;
  bits_t* __restrict__ weight;
  // Read as bytes and compared with 0: a bool tensor viewed from uint8 may hold
  // other nonzero values, which count as true, as they do on CUDA.
  const uint8_t* __restrict__ mask;
};

template <typename Args>
SPARSEMOM_FORCE_INLINE void mask_apply_range(const Args& a, int64_t begin,
                                                            int64_t end) {
  using bits_t = typename Args::bits_t;
  for (int64_t i = begin; i < end; ++i) a.weight[i] &= -static_cast<bits_t>(a.mask[i] != 0);
}
SPARSEMOM_DEFINE_ISA_VARIANTS(mask_apply_range)

constexpr int64_t kGrainSize = 1 << 15;

void mask_apply_cpu(const at::Tensor& weight, const at::Tensor& mask) {
  check_mask_apply_args(weight, mask);
  const at::Tensor work = weight.contiguous();
  const at::Tensor mask_c = mask.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, work.scalar_type(), "mask_apply_cpu", [&] {
    using Args = MaskApplyArgs<scalar_t>;
    const Args args{reinterpret_cast<typename Args::bits_t*>(work.data_ptr<scalar_t>()),
                    reinterpret_cast<const uint8_t*>(mask_c.data_ptr<bool>())};
    const auto range = pick_mask_apply_range<Args>();
    at::parallel_for(0, work.numel(), kGrainSize,
                     [&](int64_t begin, int64_t end) { range(args, begin, end); });
  });
  write_back(weight, work);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsemom, CPU, m) { m.impl("mask_apply_", &mask_apply_cpu); }

}  // namespace sparsemom
