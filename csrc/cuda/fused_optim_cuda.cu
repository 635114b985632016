// Fused masked SGD and Adam/AdamW steps on CUDA: one grid-stride pass over
// param, grad, optimizer state and mask, O(numel), memory bound. The
// arithmetic is shared with the CPU path (../optim_math.h).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../optim_math.h"
#include "../sparsemom.h"
#include "elementwise.cuh"

namespace sparsemom {
namespace {

template <typename scalar_t, typename opmath_t>
__global__ void fused_sgd_step_kernel(scalar_t* __restrict__ param,
                                      const scalar_t* __restrict__ grad,
                                      scalar_t* __restrict__ buf, const bool* __restrict__ mask,
                                      SgdCoeffs<opmath_t> coeffs, int64_t n) {
  SPARSEMOM_GRID_STRIDE_LOOP(i, n) {
    param[i] = sgd_element(param[i], grad[i], buf ? buf + i : nullptr, mask ? mask[i] : true,
                           coeffs);
  }
}

template <typename scalar_t, typename opmath_t>
__global__ void fused_adam_step_kernel(scalar_t* __restrict__ param,
                                       const scalar_t* __restrict__ grad,
                                       scalar_t* __restrict__ exp_avg,
                                       scalar_t* __restrict__ exp_avg_sq,
                                       scalar_t* __restrict__ max_exp_avg_sq,
                                       const bool* __restrict__ mask,
                                       AdamCoeffs<opmath_t> coeffs, int64_t n) {
  SPARSEMOM_GRID_STRIDE_LOOP(i, n) {
    param[i] = adam_element(param[i], grad[i], exp_avg + i, exp_avg_sq + i,
                            max_exp_avg_sq ? max_exp_avg_sq + i : nullptr,
                            mask ? mask[i] : true, coeffs);
  }
}

void fused_sgd_step_cuda(const at::Tensor& param, const at::Tensor& grad,
                         const std::optional<at::Tensor>& momentum_buffer,
                         const std::optional<at::Tensor>& mask, double lr, double momentum,
                         double dampening, double weight_decay, bool nesterov, bool maximize,
                         bool init_momentum_buffer) {
  const SgdHyper h{lr, momentum, dampening, weight_decay, nesterov, maximize, init_momentum_buffer};
  check_sgd_args(param, grad, momentum_buffer, mask, h);
  const c10::cuda::CUDAGuard guard(param.device());
  const at::Tensor param_w = param.contiguous();
  const at::Tensor grad_c = grad.contiguous();
  // Without momentum torch.optim keeps no buffer: a given one is left untouched.
  const at::Tensor buf_w = momentum != 0.0 ? contiguous_or_undefined(momentum_buffer) : at::Tensor();
  const at::Tensor mask_c = contiguous_or_undefined(mask);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param.scalar_type(), "fused_sgd_step_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    cuda::launch_elementwise(param_w.numel(), fused_sgd_step_kernel<scalar_t, opmath_t>,
                             param_w.data_ptr<scalar_t>(), grad_c.data_ptr<scalar_t>(),
                             data_or_null<scalar_t>(buf_w), data_or_null<bool>(mask_c),
                             make_sgd_coeffs<opmath_t>(h), param_w.numel());
  });
  write_back(param, param_w);
  if (momentum_buffer.has_value()) write_back(*momentum_buffer, buf_w);
}

void fused_adam_step_cuda(const at::Tensor& param, const at::Tensor& grad,
                          const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                          const std::optional<at::Tensor>& max_exp_avg_sq,
                          const std::optional<at::Tensor>& mask, double lr, double beta1,
                          double beta2, double eps, double weight_decay,
                          bool decoupled_weight_decay, bool maximize, int64_t step) {
  const AdamHyper h{lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay, maximize, step};
  check_adam_args(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, mask, h);
  const c10::cuda::CUDAGuard guard(param.device());
  const at::Tensor param_w = param.contiguous();
  const at::Tensor grad_c = grad.contiguous();
  const at::Tensor exp_avg_w = exp_avg.contiguous();
  const at::Tensor exp_avg_sq_w = exp_avg_sq.contiguous();
  const at::Tensor max_w = contiguous_or_undefined(max_exp_avg_sq);
  const at::Tensor mask_c = contiguous_or_undefined(mask);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param.scalar_type(), "fused_adam_step_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    cuda::launch_elementwise(param_w.numel(), fused_adam_step_kernel<scalar_t, opmath_t>,
                             param_w.data_ptr<scalar_t>(), grad_c.data_ptr<scalar_t>(),
                             exp_avg_w.data_ptr<scalar_t>(), exp_avg_sq_w.data_ptr<scalar_t>(),
                             data_or_null<scalar_t>(max_w), data_or_null<bool>(mask_c),
                             make_adam_coeffs<opmath_t>(h), param_w.numel());
  });
  write_back(param, param_w);
  write_back(exp_avg, exp_avg_w);
  write_back(exp_avg_sq, exp_avg_sq_w);
  if (max_exp_avg_sq.has_value()) write_back(*max_exp_avg_sq, max_w);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsemom, CUDA, m) {
  m.impl("fused_sgd_step_", &fused_sgd_step_cuda);
  m.impl("fused_adam_step_", &fused_adam_step_cuda);
}

}  // namespace sparsemom
