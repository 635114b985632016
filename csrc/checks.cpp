// Argument validation shared by the CPU and CUDA implementations: one place
// decides what is a valid call, and nothing is written before it has passed.
#include "sparsemom.h"

#include <ATen/MemoryOverlap.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/zeros.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>
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

// ------------------------------------------------------------------ sparse matmul

namespace {

void check_index_vector(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.defined(), name, " must be a tensor, got None");
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt, name, " must be int32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.layout() == at::kStrided, name, " must be a dense (strided) tensor, got ",
                    t.layout());
  TORCH_CHECK_VALUE(t.dim() == 1, name, " must be 1-D, got shape ", t.sizes());
}

void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref,
                       const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, " must be on the device of ", ref_name, " (",
                    ref.device(), "), got ", t.device());
}

void check_structure(const at::Tensor& row_ptr, const at::Tensor& col_idx) {
  check_index_vector(row_ptr, "row_ptr");
  check_index_vector(col_idx, "col_idx");
  TORCH_CHECK_VALUE(row_ptr.numel() >= 1, "row_ptr must have n_rows + 1 >= 1 entries, got 0");
  check_same_device(col_idx, "col_idx", row_ptr, "row_ptr");
  TORCH_CHECK_VALUE(col_idx.numel() <= std::numeric_limits<int32_t>::max(),
                    "col_idx: at most 2^31 - 1 nonzeros are supported, got ", col_idx.numel());
}

void check_dense_2d(const at::Tensor& t, const char* name) {
  check_weight_like(t, name);
  TORCH_CHECK_VALUE(t.dim() == 2, name, " must be 2-D (batch, features), got shape ", t.sizes());
}

// Two dense (batch, features) operands of one dtype, device and batch size (`b` is checked
// against `a`).
void check_batch_operands(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name) {
  check_dense_2d(a, a_name);
  check_dense_2d(b, b_name);
  TORCH_CHECK_TYPE(b.scalar_type() == a.scalar_type(), b_name, " must have the dtype of ", a_name, " (",
                   a.scalar_type(), "), got ", b.scalar_type());
  check_same_device(b, b_name, a, a_name);
  TORCH_CHECK_VALUE(b.size(0) == a.size(0), b_name, " must have the batch size of ", a_name, " (", a.size(0),
                    "), got shape ", b.sizes());
}

}  // namespace

void check_mask_matches_csr_args(const at::Tensor& mask, const at::Tensor& row_ptr, const at::Tensor& col_idx) {
  TORCH_CHECK_VALUE(mask.defined(), "mask must be a tensor, got None");
  TORCH_CHECK_TYPE(mask.scalar_type() == at::kBool, "mask must be a bool tensor, got ", mask.scalar_type());
  TORCH_CHECK_VALUE(mask.layout() == at::kStrided && mask.dim() == 2,
                    "mask must be a dense 2-D tensor (n_rows, n_cols), got shape ", mask.sizes());
  check_structure(row_ptr, col_idx);
  check_same_device(row_ptr, "row_ptr", mask, "mask");
  TORCH_CHECK_VALUE(row_ptr.numel() == mask.size(0) + 1, "row_ptr must have mask.size(0) + 1 = ",
                    mask.size(0) + 1, " entries, got ", row_ptr.numel());
  TORCH_CHECK_VALUE(mask.size(1) <= std::numeric_limits<int32_t>::max(),
                    "mask: at most 2^31 - 1 columns are supported, got ", mask.size(1));
}

void check_csr_spmm_args(const at::Tensor& x, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                         const at::Tensor& values, const std::optional<at::Tensor>& value_perm,
                         const std::optional<at::Tensor>& bias) {
  check_dense_2d(x, "x");
  check_structure(row_ptr, col_idx);
  check_same_device(row_ptr, "row_ptr", x, "x");
  check_weight_like(values, "values");
  TORCH_CHECK_VALUE(values.dim() == 1, "values must be 1-D (nnz), got shape ", values.sizes());
  TORCH_CHECK_TYPE(values.scalar_type() == x.scalar_type(), "values must have the dtype of x (",
                   x.scalar_type(), "), got ", values.scalar_type());
  check_same_device(values, "values", x, "x");
  TORCH_CHECK_VALUE(values.numel() == col_idx.numel(), "values must have one entry per nonzero (",
                    "col_idx has ", col_idx.numel(), "), got ", values.numel());
  if (value_perm.has_value()) {
    check_index_vector(*value_perm, "value_perm");
    check_same_device(*value_perm, "value_perm", x, "x");
    TORCH_CHECK_VALUE(value_perm->numel() == col_idx.numel(),
                      "value_perm must have one entry per nonzero (col_idx has ", col_idx.numel(),
                      "), got ", value_perm->numel());
  }
  if (bias.has_value()) {
    check_weight_like(*bias, "bias");
    TORCH_CHECK_TYPE(bias->scalar_type() == x.scalar_type(), "bias must have the dtype of x (",
                     x.scalar_type(), "), got ", bias->scalar_type());
    check_same_device(*bias, "bias", x, "x");
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->numel() == row_ptr.numel() - 1,
                      "bias must have shape (n_rows,) = (", row_ptr.numel() - 1, ",), got ",
                      bias->sizes());
  }
}

void check_csr_sddmm_args(const at::Tensor& a, const at::Tensor& b, const at::Tensor& row_ptr,
                          const at::Tensor& col_idx) {
  check_batch_operands(a, "a", b, "b");
  check_structure(row_ptr, col_idx);
  check_same_device(row_ptr, "row_ptr", a, "a");
  TORCH_CHECK_VALUE(a.size(1) == row_ptr.numel() - 1, "a must have n_rows = ", row_ptr.numel() - 1,
                    " columns (row_ptr has n_rows + 1 entries), got shape ", a.sizes());
}

void check_csr_linear_backward_args(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& values,
                                    const at::Tensor& row_ptr, const at::Tensor& col_idx,
                                    const at::Tensor& col_ptr, const at::Tensor& row_idx,
                                    const at::Tensor& perm) {
  check_batch_operands(grad, "grad", x, "x");
  check_structure(row_ptr, col_idx);
  check_index_vector(col_ptr, "col_ptr");
  check_index_vector(row_idx, "row_idx");
  check_index_vector(perm, "perm");
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{row_ptr, "row_ptr"},
                                {col_idx, "col_idx"}, {col_ptr, "col_ptr"}, {row_idx, "row_idx"},
                                {perm, "perm"}}) {
    check_same_device(t, name, grad, "grad");
  }
  TORCH_CHECK_VALUE(grad.size(1) == row_ptr.numel() - 1, "grad must have out_features = ",
                    row_ptr.numel() - 1, " columns (row_ptr has out_features + 1 entries), got shape ",
                    grad.sizes());
  TORCH_CHECK_VALUE(x.size(1) == col_ptr.numel() - 1, "x must have in_features = ", col_ptr.numel() - 1,
                    " columns (col_ptr has in_features + 1 entries), got shape ", x.sizes());
  TORCH_CHECK_VALUE(row_idx.numel() == col_idx.numel() && perm.numel() == col_idx.numel(),
                    "row_idx and perm must have one entry per nonzero (col_idx has ", col_idx.numel(),
                    "), got ", row_idx.numel(), " and ", perm.numel(),
                    "; pass the result of csr_transpose(row_ptr, col_idx, in_features)");
  check_weight_like(values, "values");
  TORCH_CHECK_VALUE(values.dim() == 1 && values.numel() >= col_idx.numel(),
                    "values must be 1-D with one entry per nonzero (", col_idx.numel(),
                    ") and possibly idle slots after them, got shape ", values.sizes());
  TORCH_CHECK_TYPE(values.scalar_type() == grad.scalar_type(), "values must have the dtype of grad (",
                   grad.scalar_type(), "), got ", values.scalar_type());
  check_same_device(values, "values", grad, "grad");
  check_permutation_once(perm, "perm");
}

void check_permutation(const at::Tensor& perm, const char* name) {
  const int64_t n = perm.numel();
  if (n == 0) return;
  const at::Tensor p = perm.to(at::kLong);
  const at::Tensor out_of_range = p.lt(0).logical_or(p.ge(n));
  if (out_of_range.any().item<bool>()) {
    const int64_t k = out_of_range.to(at::kInt).argmax().item<int64_t>();
    TORCH_CHECK_VALUE(false, name, " must be in [0, nnz = ", n, "), got ", name, "[", k, "]=",
                      p[k].item<int64_t>());
  }
  // In range, n entries are a permutation exactly when none repeats. A repeat leaves a
  // position unread (and, where gradients are scattered through it, unwritten).
  const at::Tensor repeated = p.bincount({}, n).index_select(0, p).gt(1);
  if (repeated.any().item<bool>()) {
    const int64_t k = repeated.to(at::kInt).argmax().item<int64_t>();
    TORCH_CHECK_VALUE(false, name, " must be a permutation of [0, nnz = ", n, ") (each position once), got ",
                      name, "[", k, "]=", p[k].item<int64_t>(), " more than once; pass the perm of "
                      "csr_transpose(row_ptr, col_idx, in_features)");
  }
}

void check_permutation_once(const at::Tensor& perm, const char* name) {
  // Keyed on perm's memory and version: a layer's slice of its fixed-capacity buffer, or
  // the alias of it a compiled backward gets, is found again until the buffer is written.
  memo_by_structure("permutation", {perm}, 0, [&] {
    check_permutation(perm, name);
    return at::Tensor();
  });
}

void check_csr_transpose_args(const at::Tensor& row_ptr, const at::Tensor& col_idx, int64_t n_cols) {
  check_structure(row_ptr, col_idx);
  TORCH_CHECK_VALUE(n_cols >= 0 && n_cols <= std::numeric_limits<int32_t>::max(),
                    "n_cols must be in [0, 2^31 - 1], got ", n_cols);
}

void check_csr_content(const at::Tensor& row_ptr, const at::Tensor& col_idx, int64_t n_cols,
                       const at::Tensor& value_perm) {
  const int64_t nnz = col_idx.numel();
  // One host transfer for every check: [first, last, min diff, min col, max col, min perm, max perm].
  std::vector<at::Tensor> parts{row_ptr.select(0, 0).to(at::kLong).reshape({1}),
                                row_ptr.select(0, -1).to(at::kLong).reshape({1})};
  parts.push_back(row_ptr.numel() > 1 ? row_ptr.diff().min().to(at::kLong).reshape({1})
                                      : at::zeros({1}, row_ptr.options().dtype(at::kLong)));
  if (nnz > 0) {
    parts.push_back(col_idx.min().to(at::kLong).reshape({1}));
    parts.push_back(col_idx.max().to(at::kLong).reshape({1}));
  }
  if (value_perm.defined() && nnz > 0) {
    parts.push_back(value_perm.min().to(at::kLong).reshape({1}));
    parts.push_back(value_perm.max().to(at::kLong).reshape({1}));
  }
  const at::Tensor host = at::cat(parts).cpu();
  const int64_t* h = host.data_ptr<int64_t>();
  TORCH_CHECK_VALUE(h[0] == 0, "row_ptr must start at 0, got row_ptr[0]=", h[0]);
  TORCH_CHECK_VALUE(h[1] == nnz, "row_ptr must end at nnz = col_idx.numel() = ", nnz,
                    ", got row_ptr[-1]=", h[1]);
  TORCH_CHECK_VALUE(h[2] >= 0, "row_ptr must be non-decreasing (a row cannot have a negative "
                    "number of nonzeros)");
  if (nnz > 0) {
    TORCH_CHECK_VALUE(h[3] >= 0 && h[4] < n_cols, "col_idx must be in [0, n_cols = ", n_cols,
                      "), got values in [", h[3], ", ", h[4], "]");
  }
  if (value_perm.defined() && nnz > 0) {
    TORCH_CHECK_VALUE(h[5] >= 0 && h[6] < nnz, "value_perm must be in [0, nnz = ", nnz,
                      "), got values in [", h[5], ", ", h[6], "]");
  }
}

void check_csr_row_ptr_host(const int32_t* row_ptr, int64_t n_rows, int64_t nnz, const char* name) {
  TORCH_CHECK_VALUE(row_ptr[0] == 0, name, " must start at 0, got ", name, "[0]=", row_ptr[0]);
  TORCH_CHECK_VALUE(row_ptr[n_rows] == nnz, name, " must end at nnz = ", nnz, ", got ", name, "[-1]=",
                    row_ptr[n_rows]);
  for (int64_t r = 0; r < n_rows; ++r) {
    TORCH_CHECK_VALUE(row_ptr[r + 1] >= row_ptr[r], name, " must be non-decreasing, got ", name, "[", r,
                      "]=", row_ptr[r], " > ", name, "[", r + 1, "]=", row_ptr[r + 1]);
  }
}

namespace {
// Raises naming the first entry of `index` (n entries) outside [0, bound).
// Unsigned compare: one branch catches negative and too-large entries; the
// scan has no early exit so it vectorises, and the message is built after.
void check_indices_below(const int32_t* index, int64_t n, int64_t bound, const char* name,
                         const char* bound_name) {
  const auto bound_u = static_cast<uint64_t>(bound);
  uint32_t bad = 0;
  for (int64_t k = 0; k < n; ++k) bad |= static_cast<uint32_t>(index[k]) >= bound_u;
  if (!bad) return;
  for (int64_t k = 0; k < n; ++k) {
    TORCH_CHECK_VALUE(index[k] >= 0 && index[k] < bound, name, " must be in [0, ", bound_name, " = ",
                      bound, "), got ", name, "[", k, "]=", index[k]);
  }
}
}  // namespace

void check_csr_col_idx_host(const int32_t* col_idx, int64_t nnz, int64_t n_cols, const char* name,
                            const char* bound_name) {
  check_indices_below(col_idx, nnz, n_cols, name, bound_name);
}

void check_value_perm_host(const int32_t* value_perm, int64_t nnz, const char* name) {
  check_indices_below(value_perm, nnz, nnz, name, "nnz");
}

void check_csr_content_host(const int32_t* row_ptr, int64_t n_rows, const int32_t* col_idx,
                            int64_t nnz, int64_t n_cols, const int32_t* value_perm) {
  check_csr_row_ptr_host(row_ptr, n_rows, nnz);
  check_csr_col_idx_host(col_idx, nnz, n_cols);
  if (value_perm != nullptr) check_value_perm_host(value_perm, nnz);
}

}  // namespace sparsemom
