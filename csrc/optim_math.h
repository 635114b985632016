// Per-element arithmetic of the fused masked optimizer steps, shared verbatim
// by the CPU loops and the CUDA kernels so both backends compute the same thing.
// Follows torch.optim's single-tensor SGD/Adam order of operations in opmath
// precision (float for fp32/fp16/bf16, double for fp64). Values are rounded to
// the storage type where they are stored (optimizer state, the parameter) and
// read back from it as torch.optim does; other intermediates (decayed gradient,
// Adam's denominator) stay in opmath, as in torch's fused implementations, so
// for fp16/bf16 the result is slightly more accurate than the single-tensor path.
#pragma once

#include <c10/macros/Macros.h>

#include "inline_bits.h"

#include <cmath>
#include <cstdint>

namespace sparsemom {

// Hyper-parameters of one fused SGD step; same meaning as torch.optim.SGD.
struct SgdHyper {
  double lr;
  double momentum;
  double dampening;
  double weight_decay;
  bool nesterov;
  bool maximize;
  // First step of a fresh momentum buffer: torch.optim.SGD sets buf = grad
  // (after weight decay) instead of buf = momentum * buf + (1 - dampening) * grad.
  bool init_momentum_buffer;
};

// Hyper-parameters of one fused Adam/AdamW step; same meaning as torch.optim.Adam.
struct AdamHyper {
  double lr;
  double beta1;
  double beta2;
  double eps;
  double weight_decay;
  bool decoupled_weight_decay;  // AdamW
  bool maximize;
  int64_t step;  // 1-based step count after the increment, as in torch.optim
};

// Step constants in the precision of the arithmetic, computed once on the host.
template <typename opmath_t>
struct SgdCoeffs {
  opmath_t lr;
  opmath_t momentum;
  opmath_t one_minus_dampening;
  opmath_t weight_decay;
  bool nesterov;
  bool maximize;
  bool init_momentum_buffer;
};

template <typename opmath_t>
struct AdamCoeffs {
  opmath_t weight_decay;       // L2 (Adam): added to the gradient
  opmath_t decay_factor;       // AdamW: param *= 1 - lr * weight_decay
  bool decoupled_weight_decay;
  bool maximize;
  opmath_t lerp_weight;        // 1 - beta1
  opmath_t beta2;
  opmath_t one_minus_beta2;
  opmath_t step_size;          // lr / (1 - beta1^step)
  opmath_t bias_correction2_sqrt;
  opmath_t eps;
};

// Derived constants are computed in double, as torch.optim does in Python, and
// then rounded once to the arithmetic's precision.
template <typename opmath_t>
SgdCoeffs<opmath_t> make_sgd_coeffs(const SgdHyper& h) {
  return {static_cast<opmath_t>(h.lr),           static_cast<opmath_t>(h.momentum),
          static_cast<opmath_t>(1.0 - h.dampening), static_cast<opmath_t>(h.weight_decay),
          h.nesterov,                            h.maximize,
          h.init_momentum_buffer};
}

template <typename opmath_t>
AdamCoeffs<opmath_t> make_adam_coeffs(const AdamHyper& h) {
  const double step = static_cast<double>(h.step);
  const double bias_correction1 = 1.0 - std::pow(h.beta1, step);
  const double bias_correction2 = 1.0 - std::pow(h.beta2, step);
  return {static_cast<opmath_t>(h.weight_decay),
          static_cast<opmath_t>(1.0 - h.lr * h.weight_decay),
          h.decoupled_weight_decay,
          h.maximize,
          static_cast<opmath_t>(1.0 - h.beta1),
          static_cast<opmath_t>(h.beta2),
          static_cast<opmath_t>(1.0 - h.beta2),
          static_cast<opmath_t>(h.lr / bias_correction1),
          static_cast<opmath_t>(std::sqrt(bias_correction2)),
          static_cast<opmath_t>(h.eps)};
}

// One SGD element: returns the new parameter (0 where `active` is false) and
// updates *buf when momentum is on (buf != nullptr). The buffer of an inactive
// position is updated like any other: sparse momentum grows from it.
template <typename scalar_t, typename opmath_t>
C10_HOST_DEVICE SPARSEMOM_FORCE_INLINE scalar_t sgd_element(scalar_t param, scalar_t grad, scalar_t* buf,
                                            bool active, const SgdCoeffs<opmath_t>& c) {
  opmath_t p = static_cast<opmath_t>(param);
  opmath_t g = static_cast<opmath_t>(grad);
  if (c.maximize) g = -g;
  if (c.weight_decay != opmath_t(0)) g = g + c.weight_decay * p;
  if (buf != nullptr) {
    // torch.optim stores the buffer in the parameter's dtype and reads it back.
    const scalar_t b = c.init_momentum_buffer
                           ? static_cast<scalar_t>(g)
                           : static_cast<scalar_t>(static_cast<opmath_t>(*buf) * c.momentum +
                                                   c.one_minus_dampening * g);
    *buf = b;
    g = c.nesterov ? g + c.momentum * static_cast<opmath_t>(b) : static_cast<opmath_t>(b);
  }
  p = p - c.lr * g;
  return active ? static_cast<scalar_t>(p) : scalar_t(0);
}

// One Adam/AdamW element: returns the new parameter (0 where `active` is false)
// and updates the moments (and the running max of the second moment when
// max_exp_avg_sq != nullptr, i.e. amsgrad).
template <typename scalar_t, typename opmath_t>
C10_HOST_DEVICE SPARSEMOM_FORCE_INLINE scalar_t adam_element(scalar_t param, scalar_t grad, scalar_t* exp_avg,
                                             scalar_t* exp_avg_sq, scalar_t* max_exp_avg_sq,
                                             bool active, const AdamCoeffs<opmath_t>& c) {
  using std::sqrt;
  opmath_t p = static_cast<opmath_t>(param);
  opmath_t g = static_cast<opmath_t>(grad);
  if (c.maximize) g = -g;
  if (c.decoupled_weight_decay) {
    p = p * c.decay_factor;
  } else if (c.weight_decay != opmath_t(0)) {
    g = g + c.weight_decay * p;
  }
  // exp_avg.lerp_(grad, 1 - beta1), with ATen's two-sided lerp formula.
  const opmath_t m0 = static_cast<opmath_t>(*exp_avg);
  const opmath_t w = c.lerp_weight;
  const scalar_t m = static_cast<scalar_t>(w < opmath_t(0.5) ? m0 + w * (g - m0)
                                                             : g - (g - m0) * (opmath_t(1) - w));
  *exp_avg = m;
  // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
  const scalar_t v = static_cast<scalar_t>(static_cast<opmath_t>(*exp_avg_sq) * c.beta2 +
                                           c.one_minus_beta2 * g * g);
  *exp_avg_sq = v;
  opmath_t second = static_cast<opmath_t>(v);
  if (max_exp_avg_sq != nullptr) {
    const opmath_t vmax = static_cast<opmath_t>(*max_exp_avg_sq);
    // torch.maximum: the larger one, NaN if either is NaN.
    second = (vmax != vmax || vmax > second) ? vmax : second;
    *max_exp_avg_sq = static_cast<scalar_t>(second);
  }
  const opmath_t denom = sqrt(second) / c.bias_correction2_sqrt + c.eps;
  p = p - c.step_size * (static_cast<opmath_t>(m) / denom);
  return active ? static_cast<scalar_t>(p) : scalar_t(0);
}

}  // namespace sparsemom
