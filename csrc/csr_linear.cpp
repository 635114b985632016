// csr_linear: the differentiable sparse layer op. Its forward is csr_spmm
// through the dispatcher (so every backend's kernel serves it); its backward
// (ops.py, register_autograd) is csr_spmm on the cached transpose for the
// input's gradient and csr_sddmm for the values' gradient.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <optional>

namespace sparsemom {
namespace {

at::Tensor csr_linear(const at::Tensor& x, const at::Tensor& values, const std::optional<at::Tensor>& bias,
                      const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& col_ptr,
                      const at::Tensor& row_idx, const at::Tensor& perm) {
  static const auto spmm =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("sparsemom::csr_spmm", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const std::optional<at::Tensor>&, const std::optional<at::Tensor>&)>();
  // The transposed structure is only read by the backward; it must still agree
  // with the forward's, or the gradients would belong to another matrix.
  TORCH_CHECK_VALUE(col_ptr.dim() == 1 && row_idx.dim() == 1 && perm.dim() == 1 &&
                        row_idx.numel() == col_idx.numel() && perm.numel() == col_idx.numel(),
                    "row_idx and perm must have one entry per nonzero (", col_idx.numel(),
                    ") and col_ptr must be 1-D; pass the result of csr_transpose(row_ptr, col_idx, "
                    "in_features)");
  TORCH_CHECK_VALUE(x.dim() == 2 && col_ptr.numel() == x.size(1) + 1,
                    "col_ptr must have in_features + 1 = x.size(1) + 1 entries, got ", col_ptr.numel(),
                    " for x of shape ", x.sizes());
  return spmm.call(x, row_ptr, col_idx, values, std::nullopt, bias);
}

// transpose_contiguous, the layout change csr_linear's inputs go through, on
// devices without a kernel of their own (the CPU has a blocked one, csr_cpu.cpp).
at::Tensor transpose_contiguous(const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() == 2, "x must be 2-D, got shape ", x.sizes());
  return x.t().clone(at::MemoryFormat::Contiguous);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsemom, CompositeExplicitAutograd, m) {
  m.impl("csr_linear", &csr_linear);
  m.impl("transpose_contiguous", &transpose_contiguous);
}

}  // namespace sparsemom
