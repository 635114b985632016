// Shared declarations of the sparsemom extension: argument validation used by
// every backend (so CPU and CUDA reject exactly the same inputs), and the
// helpers the backends share. Kernels live in cpu/ and cuda/; schemas in
// registration.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include "optim_math.h"

#include <cstdint>
#include <optional>
#include <string>

namespace sparsemom {

// Validation shared by all backends. Each throws a c10::Error subclass
// (ValueError / TypeError in Python) naming the argument and what was expected,
// before any memory is written.
void check_mask_apply_args(const at::Tensor& weight, const at::Tensor& mask);
void check_sgd_args(const at::Tensor& param, const at::Tensor& grad,
                    const std::optional<at::Tensor>& momentum_buffer,
                    const std::optional<at::Tensor>& mask, const SgdHyper& hyper);
void check_adam_args(const at::Tensor& param, const at::Tensor& grad,
                     const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                     const std::optional<at::Tensor>& max_exp_avg_sq,
                     const std::optional<at::Tensor>& mask, const AdamHyper& hyper);
// Selection ops (magnitude_prune, momentum_grow, set_prune): `values` (called
// `values_name` in messages) of a float dtype, a bool `mask` of its shape and
// device, k >= 0.
void check_selection_args(const at::Tensor& values, const char* values_name,
                          const at::Tensor& mask, int64_t k);
// k against the number of candidates the selection has, counted by the
// kernel's first pass (`what`: e.g. "active positions in mask").
void check_selection_k(int64_t k, int64_t available, const char* what);

// Kernels work on dense memory. An in-place argument that is not contiguous is
// updated in a contiguous copy (`work = target.contiguous()`) and written back
// here; for a contiguous argument `work` is `target` itself and nothing is copied.
inline void write_back(const at::Tensor& target, const at::Tensor& work) {
  if (work.defined() && !work.is_same(target)) target.copy_(work);
}

// Raw pointer of an optional argument, nullptr when it was None.
template <typename T>
T* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

inline at::Tensor contiguous_or_undefined(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->contiguous() : at::Tensor();
}

}  // namespace sparsemom
