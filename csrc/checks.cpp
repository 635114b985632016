// Argument validation shared by the CPU and CUDA implementations: one place
// decides what is a valid call, and nothing is written before it has passed.
#include "sparsemom.h"

#include <ATen/MemoryOverlap.h>

#include <cmath>
#include <initializer_list>
#include <utility>

namespace sparsemom {
namespace {

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void check_weight_like(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.defined(), name, " must be a tensor, got None");
  TORCH_CHECK_TYPE(is_supported_float(t.scalar_type()), name,
                   " must be float32, float64, float16 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.layout() == at::kStrided, name, " must be a dense (strided) tensor, got ",
                    t.layout());
}

void check_writable(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(at::has_internal_overlap(t) != at::MemOverlap::Yes, name,
                    " is updated in place, so it must not have overlapping memory "
                    "(for example an expand()ed tensor); pass a .clone()");
}

// `t` must match `ref` (named `ref_name`) in shape, device and, when
// `same_dtype`, in dtype.
void check_matches(const at::Tensor& t, const char* name, const at::Tensor& ref,
                   const char* ref_name, bool same_dtype) {
  TORCH_CHECK_VALUE(t.sizes() == ref.sizes(), name, " must have the shape of ", ref_name, " ",
                    ref.sizes(), ", got ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, " must be on the device of ", ref_name,
                    " (", ref.device(), "), got ", t.device());
  if (same_dtype) {
    TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), name, " must have the dtype of ",
                     ref_name, " (", ref.scalar_type(), "), got ", t.scalar_type());
  }
}

void check_mask(const std::optional<at::Tensor>& mask, const at::Tensor& weight,
                const char* weight_name) {
  if (!mask.has_value()) return;
  TORCH_CHECK_TYPE(mask->scalar_type() == at::kBool, "mask must be a bool tensor, got ",
                   mask->scalar_type());
  TORCH_CHECK_VALUE(mask->layout() == at::kStrided, "mask must be a dense (strided) tensor, got ",
                    mask->layout());
  check_matches(*mask, "mask", weight, weight_name, /*same_dtype=*/false);
}

void check_state(const at::Tensor& t, const char* name, const at::Tensor& param) {
  check_weight_like(t, name);
  check_matches(t, name, param, "param", /*same_dtype=*/true);
  check_writable(t, name);
}

// Kernels read every argument once and write the in-place ones; shared memory
// between two arguments would make the result depend on the order of the
// loop (and the CPU loops promise the compiler there is none).
void check_no_shared_memory(std::initializer_list<std::pair<const at::Tensor*, const char*>> args) {
  for (auto a = args.begin(); a != args.end(); ++a) {
    if (a->first == nullptr || !a->first->defined()) continue;
    for (auto b = a + 1; b != args.end(); ++b) {
      if (b->first == nullptr || !b->first->defined()) continue;
      const at::MemOverlapStatus status = at::get_overlap_status(*a->first, *b->first);
      TORCH_CHECK_VALUE(status != at::MemOverlapStatus::Full && status != at::MemOverlapStatus::Partial,
                        a->second, " and ", b->second, " must not share memory; pass a .clone()");
    }
  }
}

const at::Tensor* ptr_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? &*t : nullptr;
}

void check_finite_nonnegative(double v, const char* name) {
  TORCH_CHECK_VALUE(std::isfinite(v) && v >= 0.0, name, " must be finite and >= 0, got ", v);
}

}  // namespace

void check_mask_apply_args(const at::Tensor& weight, const at::Tensor& mask) {
  check_weight_like(weight, "weight");
  check_writable(weight, "weight");
  check_mask(mask, weight, "weight");
  check_no_shared_memory({{&weight, "weight"}, {&mask, "mask"}});
}

void check_sgd_args(const at::Tensor& param, const at::Tensor& grad,
                    const std::optional<at::Tensor>& momentum_buffer,
                    const std::optional<at::Tensor>& mask, const SgdHyper& h) {
  check_weight_like(param, "param");
  check_writable(param, "param");
  check_weight_like(grad, "grad");
  check_matches(grad, "grad", param, "param", /*same_dtype=*/true);
  check_mask(mask, param, "param");
  check_finite_nonnegative(h.lr, "lr");
  check_finite_nonnegative(h.momentum, "momentum");
  check_finite_nonnegative(h.weight_decay, "weight_decay");
  TORCH_CHECK_VALUE(std::isfinite(h.dampening), "dampening must be finite, got ", h.dampening);
  if (h.nesterov) {
    TORCH_CHECK_VALUE(h.momentum > 0.0 && h.dampening == 0.0,
                      "nesterov=True requires momentum > 0 and dampening == 0, got momentum=",
                      h.momentum, ", dampening=", h.dampening);
  }
  if (h.momentum != 0.0) {
    TORCH_CHECK_VALUE(momentum_buffer.has_value(),
                      "momentum_buffer must be a tensor when momentum != 0 (got None)");
  }
  if (momentum_buffer.has_value()) check_state(*momentum_buffer, "momentum_buffer", param);
  check_no_shared_memory({{&param, "param"},
                          {&grad, "grad"},
                          {ptr_or_null(momentum_buffer), "momentum_buffer"},
                          {ptr_or_null(mask), "mask"}});
}

void check_adam_args(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                     const at::Tensor& exp_avg_sq, const std::optional<at::Tensor>& max_exp_avg_sq,
                     const std::optional<at::Tensor>& mask, const AdamHyper& h) {
  check_weight_like(param, "param");
  check_writable(param, "param");
  check_weight_like(grad, "grad");
  check_matches(grad, "grad", param, "param", /*same_dtype=*/true);
  check_state(exp_avg, "exp_avg", param);
  check_state(exp_avg_sq, "exp_avg_sq", param);
  if (max_exp_avg_sq.has_value()) check_state(*max_exp_avg_sq, "max_exp_avg_sq", param);
  check_mask(mask, param, "param");
  check_finite_nonnegative(h.lr, "lr");
  check_finite_nonnegative(h.eps, "eps");
  check_finite_nonnegative(h.weight_decay, "weight_decay");
  TORCH_CHECK_VALUE(h.beta1 >= 0.0 && h.beta1 < 1.0, "beta1 must be in [0, 1), got ", h.beta1);
  TORCH_CHECK_VALUE(h.beta2 >= 0.0 && h.beta2 < 1.0, "beta2 must be in [0, 1), got ", h.beta2);
  TORCH_CHECK_VALUE(h.step >= 1, "step must be >= 1 (the count after this step), got ", h.step);
  check_no_shared_memory({{&param, "param"},
                          {&grad, "grad"},
                          {&exp_avg, "exp_avg"},
                          {&exp_avg_sq, "exp_avg_sq"},
                          {ptr_or_null(max_exp_avg_sq), "max_exp_avg_sq"},
                          {ptr_or_null(mask), "mask"}});
}

void check_selection_args(const at::Tensor& values, const char* values_name,
                          const at::Tensor& mask, int64_t k) {
  check_weight_like(values, values_name);
  TORCH_CHECK_VALUE(mask.defined(), "mask must be a tensor, got None");
  check_mask(mask, values, values_name);
  TORCH_CHECK_VALUE(k >= 0, "k must be >= 0, got k=", k);
}

void check_selection_k(int64_t k, int64_t available, const char* what) {
  TORCH_CHECK_VALUE(k <= available, "k must be at most the number of ", what, " (", available,
                    "), got k=", k);
}

}  // namespace sparsemom
