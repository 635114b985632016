// Fused masked SGD and Adam/AdamW steps on CPU: one streaming pass over
// param, grad, optimizer state and mask, O(numel), instead of the 5-15 passes
// torch.optim + weight.mul_(mask) make. The arithmetic is in ../optim_math.h.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "../optim_math.h"
#include "../sparsemom.h"
#include "cpu_isa.h"

namespace sparsemom {
namespace {

constexpr int64_t kGrainSize = 1 << 15;

template <typename scalar_t>
struct SgdArgs {
  using value_type = scalar_t;
  using opmath_t = at::opmath_type<scalar_t>;
  scalar_t* param;
  const scalar_t* grad;
  scalar_t* buf;    // nullptr: no momentum
  const bool* mask;  // nullptr: every position active
  SgdCoeffs<opmath_t> coeffs;
};

// The optional arguments become template flags so each loop is branch-free;
// pointers are copied into __restrict__ locals (GCC ignores restrict on struct
// members) and ivdep tells the vectoriser the arrays do not overlap, which the
// run-time alias checks it would otherwise emit for 5-6 arrays give up on.
template <bool kHasBuf, bool kHasMask, typename Args>
SPARSEMOM_FORCE_INLINE void sgd_loop(const Args& a, int64_t begin, int64_t end) {
  using scalar_t = typename Args::value_type;
  scalar_t* __restrict__ param = a.param;
  const scalar_t* __restrict__ grad = a.grad;
  scalar_t* __restrict__ buf = a.buf;
  const bool* __restrict__ mask = a.mask;
  const auto coeffs = a.coeffs;
#pragma GCC ivdep
  for (int64_t i = begin; i < end; ++i) {
    param[i] = sgd_element(param[i], grad[i], kHasBuf ? buf + i : nullptr,
                           kHasMask ? mask[i] : true, coeffs);
  }
}

template <typename Args>
SPARSEMOM_FORCE_INLINE void sgd_range(const Args& a, int64_t begin, int64_t end) {
  if (a.buf != nullptr) {
    a.mask != nullptr ? sgd_loop<true, true>(a, begin, end) : sgd_loop<true, false>(a, begin, end);
  } else {
    a.mask != nullptr ? sgd_loop<false, true>(a, begin, end) : sgd_loop<false, false>(a, begin, end);
  }
}
SPARSEMOM_DEFINE_ISA_VARIANTS(sgd_range)

template <typename scalar_t>
struct AdamArgs {
  using value_type = scalar_t;
  using opmath_t = at::opmath_type<scalar_t>;
  scalar_t* param;
  const scalar_t* grad;
  scalar_t* exp_avg;
  scalar_t* exp_avg_sq;
  scalar_t* max_exp_avg_sq;  // nullptr: no amsgrad
  const bool* mask;          // nullptr: every position active
  AdamCoeffs<opmath_t> coeffs;
};

template <bool kAmsgrad, bool kHasMask, typename Args>
SPARSEMOM_FORCE_INLINE void adam_loop(const Args& a, int64_t begin, int64_t end) {
  using scalar_t = typename Args::value_type;
  scalar_t* __restrict__ param = a.param;
  const scalar_t* __restrict__ grad = a.grad;
  scalar_t* __restrict__ exp_avg = a.exp_avg;
  scalar_t* __restrict__ exp_avg_sq = a.exp_avg_sq;
  scalar_t* __restrict__ max_exp_avg_sq = a.max_exp_avg_sq;
  const bool* __restrict__ mask = a.mask;
  const auto coeffs = a.coeffs;
#pragma GCC ivdep
  for (int64_t i = begin; i < end; ++i) {
    param[i] = adam_element(param[i], grad[i], exp_avg + i, exp_avg_sq + i,
                            kAmsgrad ? max_exp_avg_sq + i : nullptr, kHasMask ? mask[i] : true,
                            coeffs);
  }
}

template <typename Args>
SPARSEMOM_FORCE_INLINE void adam_range(const Args& a, int64_t begin, int64_t end) {
  if (a.max_exp_avg_sq != nullptr) {
    a.mask != nullptr ? adam_loop<true, true>(a, begin, end) : adam_loop<true, false>(a, begin, end);
  } else {
    a.mask != nullptr ? adam_loop<false, true>(a, begin, end) : adam_loop<false, false>(a, begin, end);
  }
}
SPARSEMOM_DEFINE_ISA_VARIANTS(adam_range)

void fused_sgd_step_cpu(const at::Tensor& param, const at::Tensor& grad,
                        const std::optional<at::Tensor>& momentum_buffer,
                        const std::optional<at::Tensor>& mask, double lr, double momentum,
                        double dampening, double weight_decay, bool nesterov, bool maximize,
                        bool init_momentum_buffer) {
  const SgdHyper h{lr, momentum, dampening, weight_decay, nesterov, maximize, init_momentum_buffer};
  check_sgd_args(param, grad, momentum_buffer, mask, h);
  const at::Tensor param_w = param.contiguous();
  const at::Tensor grad_c = grad.contiguous();
  // Without momentum torch.optim keeps no buffer: a given one is left untouched.
  const at::Tensor buf_w = momentum != 0.0 ? contiguous_or_undefined(momentum_buffer) : at::Tensor();
  const at::Tensor mask_c = contiguous_or_undefined(mask);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param.scalar_type(), "fused_sgd_step_cpu", [&] {
    using Args = SgdArgs<scalar_t>;
    using opmath_t = typename Args::opmath_t;
    const SgdCoeffs<opmath_t> coeffs = make_sgd_coeffs<opmath_t>(h);
    const Args args{param_w.data_ptr<scalar_t>(), grad_c.data_ptr<scalar_t>(),
                    data_or_null<scalar_t>(buf_w), data_or_null<bool>(mask_c), coeffs};
    const auto range = pick_sgd_range<Args>();
    at::parallel_for(0, param_w.numel(), kGrainSize,
                     [&](int64_t begin, int64_t end) { range(args, begin, end); });
  });
  write_back(param, param_w);
  if (momentum_buffer.has_value()) write_back(*momentum_buffer, buf_w);
}

void fused_adam_step_cpu(const at::Tensor& param, const at::Tensor& grad,
                         const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                         const std::optional<at::Tensor>& max_exp_avg_sq,
                         const std::optional<at::Tensor>& mask, double lr, double beta1,
                         double beta2, double eps, double weight_decay,
                         bool decoupled_weight_decay, bool maximize, int64_t step) {
  const AdamHyper h{lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay, maximize, step};
  check_adam_args(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, mask, h);
  const at::Tensor param_w = param.contiguous();
  const at::Tensor grad_c = grad.contiguous();
  const at::Tensor exp_avg_w = exp_avg.contiguous();
  const at::Tensor exp_avg_sq_w = exp_avg_sq.contiguous();
  const at::Tensor max_w = contiguous_or_undefined(max_exp_avg_sq);
  const at::Tensor mask_c = contiguous_or_undefined(mask);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param.scalar_type(), "fused_adam_step_cpu", [&] {
    using Args = AdamArgs<scalar_t>;
    using opmath_t = typename Args::opmath_t;
    const AdamCoeffs<opmath_t> coeffs = make_adam_coeffs<opmath_t>(h);
    const Args args{param_w.data_ptr<scalar_t>(), grad_c.data_ptr<scalar_t>(),
                    exp_avg_w.data_ptr<scalar_t>(), exp_avg_sq_w.data_ptr<scalar_t>(),
                    data_or_null<scalar_t>(max_w), data_or_null<bool>(mask_c), coeffs};
    const auto range = pick_adam_range<Args>();
    at::parallel_for(0, param_w.numel(), kGrainSize,
                     [&](int64_t begin, int64_t end) { range(args, begin, end); });
  });
  write_back(param, param_w);
  write_back(exp_avg, exp_avg_w);
  write_back(exp_avg_sq, exp_avg_sq_w);
  if (max_exp_avg_sq.has_value()) write_back(*max_exp_avg_sq, max_w);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsemom, CPU, m) {
  m.impl("fused_sgd_step_", &fused_sgd_step_cpu);
  m.impl("fused_adam_step_", &fused_adam_step_cpu);
}

}  // namespace sparsemom
