// Shared declarations of the sparsemom extension: argument validation used by
// every backend (so CPU and CUDA reject exactly the same inputs), and the
// helpers the backends share. Kernels live in cpu/ and cuda/; schemas in
// registration.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include "optim_math.h"

#include <cstdint>
#include <functional>
#include <initializer_list>
#include <optional>
#include <string>

namespace sparsemom {

// Validation shared by all backends. Each throws a c10::Error subclass
// (ValueError / TypeError in Python) naming the argument and what was expected,
// before any memory is written.
void check_mask_apply_args(const at::Tensor& weight, const at::Tensor& mask);
// mask_matches_csr: a 2-D bool mask and an int32 structure of its n_rows (contents are
// checked by the kernel, with check_csr_content_host).
void check_mask_matches_csr_args(const at::Tensor& mask, const at::Tensor& row_ptr, const at::Tensor& col_idx);
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

// Sparse matmul ops. A CSR structure is `row_ptr` (int32, n_rows + 1) and
// `col_idx` (int32, nnz) on one device; `values` (nnz) hold the nonzeros in
// that order. Shapes, dtypes and devices are checked here for every backend;
// the index contents (row_ptr starts at 0, never decreases, ends at nnz;
// 0 <= col_idx < n_cols; 0 <= value_perm < nnz) by check_csr_content, which
// reads them (the CPU kernels check host memory: row_ptr up front, col_idx and
// value_perm inside the pass they make anyway; the CUDA ops, where a read costs a
// host sync, once per structure through check_csr_content_once).
void check_csr_spmm_args(const at::Tensor& x, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                         const at::Tensor& values, const std::optional<at::Tensor>& value_perm,
                         const std::optional<at::Tensor>& bias);
void check_csr_sddmm_args(const at::Tensor& a, const at::Tensor& b, const at::Tensor& row_ptr,
                          const at::Tensor& col_idx);
// csr_linear_backward: the output gradient `grad` (batch, out_features), the input `x`
// (batch, in_features), `values` and both structures (CSR, and its csr_transpose).
void check_csr_linear_backward_args(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& values,
                                    const at::Tensor& row_ptr, const at::Tensor& col_idx,
                                    const at::Tensor& col_ptr, const at::Tensor& row_idx,
                                    const at::Tensor& perm);
// `perm` (int32, 1-D, nnz entries) holds each of 0 .. nnz-1 exactly once; the layer ops and
// csr_linear_backward read values and scatter gradients through it. The _once variant checks
// a given perm tensor (or contiguous slice of one buffer) once until it is written to.
void check_permutation(const at::Tensor& perm, const char* name);
void check_permutation_once(const at::Tensor& perm, const char* name);
void check_csr_transpose_args(const at::Tensor& row_ptr, const at::Tensor& col_idx, int64_t n_cols);
// Index contents with tensor ops (any device; one host sync). `value_perm` may be undefined.
void check_csr_content(const at::Tensor& row_ptr, const at::Tensor& col_idx, int64_t n_cols,
                       const at::Tensor& value_perm);
// check_csr_content once per structure (see memo_by_structure): what the CUDA ops call.
void check_csr_content_once(const at::Tensor& row_ptr, const at::Tensor& col_idx, int64_t n_cols,
                            const at::Tensor& value_perm);
// The tensor `compute()` returned for the same `tag`, `extra` and key `tensors` (undefined
// ones allowed), or a fresh one; a call that raises is not remembered. A key tensor matches
// the same memory (the same storage, held weakly so freed memory never matches, data
// pointer, sizes and strides) at the same version: itself or any alias sharing its version
// counter (a view, a detach). Any in-place write through one of them bumps the version and
// misses. Writes that bypass the version counter (through `.data`, numpy, DLPack, or an
// alias with a counter of its own) are not seen; inference tensors are never memoised.
at::Tensor memo_by_structure(const char* tag, std::initializer_list<at::Tensor> tensors,
                             int64_t extra, const std::function<at::Tensor()>& compute);
// The same on host memory, O(n_rows + nnz). `value_perm` may be nullptr.
void check_csr_content_host(const int32_t* row_ptr, int64_t n_rows, const int32_t* col_idx,
                            int64_t nnz, int64_t n_cols, const int32_t* value_perm);
// Its parts, for kernels that validate col_idx / value_perm in the pass they
// make anyway and call these only to raise the message once they found a bad entry.
// `name` is the argument's name in the messages (a transposed structure's col_ptr,
// row_idx and perm take the same checks).
void check_csr_row_ptr_host(const int32_t* row_ptr, int64_t n_rows, int64_t nnz,
                            const char* name = "row_ptr");
void check_csr_col_idx_host(const int32_t* col_idx, int64_t nnz, int64_t n_cols,
                            const char* name = "col_idx", const char* bound_name = "n_cols");
void check_value_perm_host(const int32_t* value_perm, int64_t nnz, const char* name = "value_perm");

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

// The layer ops take `values` with idle slots past the structure's nnz (a
// CsrLinear's fixed capacity): not read, and their gradient is 0. This is
// `grad_values` (nnz entries) as the gradient of all `slots` (csr_linear.cpp).
at::Tensor pad_to_slots(const at::Tensor& grad_values, const c10::SymInt& slots);
// The first nnz = col_idx.numel() entries of `values` (a csr layer keeps idle slots after them).
at::Tensor used_values(const at::Tensor& values, const at::Tensor& col_idx);
// Raises unless grad mode is off: the layer ops' backward kernels have no derivatives.
void check_no_double_backward(const char* op);

// The sparse convolution (csr_conv.cpp): the output length along one dimension, the
// batch-innermost layout its kernels read ((n, c, h, w) stored (c, h, w, n)), and the
// argument checks of its kernels.
int64_t conv_output_size(int64_t size, int64_t kernel, int64_t stride, int64_t padding);
at::Tensor batch_innermost(const at::Tensor& t);
void check_csr_conv2d_forward_args(const at::Tensor& x, const at::Tensor& values,
                                   const std::optional<at::Tensor>& bias, const at::Tensor& row_ptr,
                                   const at::Tensor& col_idx, at::IntArrayRef kernel_size,
                                   at::IntArrayRef stride, at::IntArrayRef padding);
void check_csr_conv2d_input_grad_args(const at::Tensor& grad_out, const at::Tensor& values,
                                      const at::Tensor& col_ptr, const at::Tensor& row_idx,
                                      const at::Tensor& perm, at::IntArrayRef input_size,
                                      at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                      at::IntArrayRef padding);
void check_csr_conv2d_weight_grad_args(const at::Tensor& grad_out, const at::Tensor& x,
                                       const at::Tensor& row_ptr, const at::Tensor& col_idx,
                                       at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                       at::IntArrayRef padding);

}  // namespace sparsemom
