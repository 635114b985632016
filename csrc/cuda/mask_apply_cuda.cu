// mask_apply_ on CUDA: weight[i] = mask[i] ? weight[i] : 0, in place.
// One grid-stride pass, O(numel), memory bound.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../sparsemom.h"
#include "elementwise.cuh"

namespace sparsemom {
namespace {

template <typename scalar_t>
__global__ void mask_apply_kernel(scalar_t* __restrict__ weight, const bool* __restrict__ mask,
                                  int64_t n) {
  SPARSEMOM_GRID_STRIDE_LOOP(i, n) { weight[i] = mask[i] ? weight[i] : scalar_t(0); }
}

void mask_apply_cuda(const at::Tensor& weight, const at::Tensor& mask) {
  check_mask_apply_args(weight, mask);
  const c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor work = weight.contiguous();
  const at::Tensor mask_c = mask.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, work.scalar_type(), "mask_apply_cuda", [&] {
    cuda::launch_elementwise(work.numel(), mask_apply_kernel<scalar_t>, work.data_ptr<scalar_t>(),
                             mask_c.data_ptr<bool>(), work.numel());
  });
  write_back(weight, work);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsemom, CUDA, m) { m.impl("mask_apply_", &mask_apply_cuda); }

}  // namespace sparsemom
