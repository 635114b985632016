// csr_linear and masked_linear: the differentiable sparse layer ops. Their
// forward is csr_spmm through the dispatcher (so every backend's kernel serves
// it) on the input made feature-major once; csr_linear's backward is csr_spmm on
// the cached transpose for the input's gradient and csr_sddmm for the values',
// or csr_linear_backward (the two fused on the CPU) when both are wanted;
// masked_linear's weight gradient is dense (exact sparse momentum grows from it).
// The autograd is C++ (registered for the Autograd key), not Python's: that cost
// about 120 us of host time per layer call, more than the kernels of a
// 128 x 4096 -> 4096 layer at 90% sparsity on a GPU.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "dispatch_ops.h"
#include "sparsemom.h"

namespace sparsemom {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptionalTensor = std::optional<at::Tensor>;


at::Tensor call_csr_spmm(const at::Tensor& x, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                         const at::Tensor& values, const OptionalTensor& value_perm,
                         const OptionalTensor& bias) {
  static const auto op =
      find_op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                         const OptionalTensor&, const OptionalTensor&)>("sparsemom::csr_spmm");
  return op.call(x, row_ptr, col_idx, values, value_perm, bias);
}

at::Tensor call_csr_sddmm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& row_ptr,
                          const at::Tensor& col_idx) {
  static const auto op =
      find_op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&)>(
          "sparsemom::csr_sddmm");
  return op.call(a, b, row_ptr, col_idx);
}

std::tuple<at::Tensor, at::Tensor> call_csr_linear_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& values, const at::Tensor& row_ptr,
    const at::Tensor& col_idx, const at::Tensor& col_ptr, const at::Tensor& row_idx, const at::Tensor& perm) {
  static const auto op =
      find_op<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                 const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                 const at::Tensor&, const at::Tensor&)>(
          "sparsemom::csr_linear_backward");
  return op.call(grad, x, values, row_ptr, col_idx, col_ptr, row_idx, perm);
}

at::Tensor call_masked_linear(const at::Tensor& x, const at::Tensor& weight, const OptionalTensor& bias,
                              const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& col_ptr,
                              const at::Tensor& row_idx, const at::Tensor& perm, const at::Tensor& flat_index) {
  static const auto op =
      find_op<at::Tensor(const at::Tensor&, const at::Tensor&, const OptionalTensor&, const at::Tensor&,
                         const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                         const at::Tensor&)>("sparsemom::masked_linear");
  return op.call(x, weight, bias, row_ptr, col_idx, col_ptr, row_idx, perm, flat_index);
}


at::Tensor call_csr_linear(const at::Tensor& x, const at::Tensor& values, const OptionalTensor& bias,
                           const at::Tensor& row_ptr, const at::Tensor& col_idx,
                           const at::Tensor& col_ptr, const at::Tensor& row_idx,
                           const at::Tensor& perm) {
  static const auto op =
      find_op<at::Tensor(const at::Tensor&, const at::Tensor&, const OptionalTensor&,
                         const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                         const at::Tensor&)>("sparsemom::csr_linear");
  return op.call(x, values, bias, row_ptr, col_idx, col_ptr, row_idx, perm);
}

// 2-D `t` with the same values stored feature-major (its transpose contiguous),
// the layout the kernels read their dense operands in. A csr layer's output
// already is feature-major, so stacked sparse layers (through elementwise ops)
// copy nothing; anything else goes through the blocked transpose (on the CPU
// about 2.5x faster than .t().contiguous() for 128 x 4096).
bool is_feature_major(const at::Tensor& t) { return t.t().is_contiguous(); }

at::Tensor feature_major(const at::Tensor& t) {
  return is_feature_major(t) ? t : call_transpose_contiguous(t).t();
}

// A gradient of the input, computed feature-major, in the layout the input came
// in: a row-major input gets a row-major gradient, which the layer below reads
// without the slow strided copy autograd would otherwise make.
at::Tensor in_layout_of_input(const at::Tensor& grad_x, bool input_was_feature_major) {
  if (!grad_x.defined() || input_was_feature_major) return grad_x;
  return call_transpose_contiguous(grad_x.t());
}

void check_transposed_structure(const at::Tensor& x, const at::Tensor& col_idx, const at::Tensor& col_ptr,
                                const at::Tensor& row_idx, const at::Tensor& perm) {
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
  TORCH_CHECK_TYPE(perm.scalar_type() == at::kInt, "perm must be int32, got ", perm.scalar_type());
  // Checked here, before the forward, so a bad perm fails before any gradient is accumulated.
  check_permutation_once(perm, "perm");
}

at::Tensor csr_linear(const at::Tensor& x, const at::Tensor& values, const std::optional<at::Tensor>& bias,
                      const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& col_ptr,
                      const at::Tensor& row_idx, const at::Tensor& perm) {
  check_transposed_structure(x, col_idx, col_ptr, row_idx, perm);
  return call_csr_spmm(feature_major(x), row_ptr, col_idx, used_values(values, col_idx), std::nullopt, bias);
}

// The active weights of a dense `weight` at its mask's nonzeros, in CSR order.
at::Tensor gather_active(const at::Tensor& weight, const at::Tensor& flat_index) {
  return weight.reshape({-1}).index_select(0, flat_index);
}

void check_masked_linear_args(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& row_ptr,
                              const at::Tensor& col_idx, const at::Tensor& flat_index) {
  TORCH_CHECK_VALUE(weight.dim() == 2 && row_ptr.numel() == weight.size(0) + 1,
                    "weight must be 2-D (out_features, in_features) with row_ptr of out_features + 1 "
                    "entries, got weight of shape ", weight.sizes(), " and ", row_ptr.numel(), " row_ptr entries");
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(1) == weight.size(1), "x must be (batch, in_features = ",
                    weight.size(1), "), got shape ", x.sizes());
  TORCH_CHECK_VALUE(flat_index.dim() == 1 && flat_index.scalar_type() == at::kLong &&
                        flat_index.numel() == col_idx.numel(),
                    "flat_index must be int64 with one entry per nonzero (", col_idx.numel(), "), got ",
                    flat_index.scalar_type(), " of shape ", flat_index.sizes());
}

at::Tensor masked_linear(const at::Tensor& x, const at::Tensor& weight, const OptionalTensor& bias,
                         const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& col_ptr,
                         const at::Tensor& row_idx, const at::Tensor& perm, const at::Tensor& flat_index) {
  check_masked_linear_args(x, weight, row_ptr, col_idx, flat_index);
  check_transposed_structure(x, col_idx, col_ptr, row_idx, perm);
  return call_csr_spmm(feature_major(x), row_ptr, col_idx, gather_active(weight, flat_index), std::nullopt,
                       bias);
}

// csr_linear_backward on devices without a fused kernel (the CPU has one,
// csr_cpu.cpp): the two kernels it stands for.
std::tuple<at::Tensor, at::Tensor> csr_linear_backward(const at::Tensor& grad, const at::Tensor& x,
                                                       const at::Tensor& values, const at::Tensor& row_ptr,
                                                       const at::Tensor& col_idx, const at::Tensor& col_ptr,
                                                       const at::Tensor& row_idx, const at::Tensor& perm) {
  check_csr_linear_backward_args(grad, x, values, row_ptr, col_idx, col_ptr, row_idx, perm);
  return {call_csr_spmm(grad, col_ptr, row_idx, used_values(values, col_idx), perm, std::nullopt),
          pad_to_slots(call_csr_sddmm(grad, x, row_ptr, col_idx), values.sym_numel())};
}

// transpose_contiguous, the layout change the layer ops' inputs go through, on
// devices without a kernel of their own (the CPU has a blocked one, csr_cpu.cpp).
at::Tensor transpose_contiguous(const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() == 2, "x must be 2-D, got shape ", x.sizes());
  return x.t().clone(at::MemoryFormat::Contiguous);
}

class CsrLinearFunction : public torch::autograd::Function<CsrLinearFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& values,
                            const OptionalTensor& bias, const at::Tensor& row_ptr,
                            const at::Tensor& col_idx, const at::Tensor& col_ptr,
                            const at::Tensor& row_idx, const at::Tensor& perm) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    // Made once, the feature-major input serves the forward and the SDDMM. (The op
    // below checks the arguments: its kernel, or under tracing its fake.)
    const at::Tensor xf = feature_major(x);
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    ctx->saved_data["x_feature_major"] = is_feature_major(x);
    ctx->save_for_backward({xf, values, row_ptr, col_idx, col_ptr, row_idx, perm});
    return call_csr_linear(xf, values, bias, row_ptr, col_idx, col_ptr, row_idx, perm);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    check_no_double_backward("csr_linear");
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &values = saved[1], &row_ptr = saved[2], &col_idx = saved[3],
                     &col_ptr = saved[4], &row_idx = saved[5], &perm = saved[6];
    // needs_input_grad counts tensor arguments only: the bias is the third when given.
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const bool want_x = ctx->needs_input_grad(0), want_values = ctx->needs_input_grad(1);
    const bool want_bias = has_bias && ctx->needs_input_grad(2);
    at::Tensor grad_x, grad_values, grad_bias;
    // Made once, the output gradient serves both kernels in the layout they read.
    const at::Tensor grad = (want_x || want_values) ? feature_major(grads[0]) : grads[0];
    if (want_x && want_values) {
      std::tie(grad_x, grad_values) =
          call_csr_linear_backward(grad, x, values, row_ptr, col_idx, col_ptr, row_idx, perm);
    } else if (want_x) {
      grad_x = call_csr_spmm(grad, col_ptr, row_idx, used_values(values, col_idx), perm, std::nullopt);
    } else if (want_values) {
      grad_values = pad_to_slots(call_csr_sddmm(grad, x, row_ptr, col_idx), values.sym_numel());
    }
    if (want_bias) grad_bias = grad.sum(0);
    grad_x = in_layout_of_input(grad_x, ctx->saved_data["x_feature_major"].toBool());
    return {grad_x, grad_values, grad_bias, {}, {}, {}, {}, {}};
  }
};

class MaskedLinearFunction : public torch::autograd::Function<MaskedLinearFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const OptionalTensor& bias, const at::Tensor& row_ptr,
                            const at::Tensor& col_idx, const at::Tensor& col_ptr,
                            const at::Tensor& row_idx, const at::Tensor& perm, const at::Tensor& flat_index) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    const at::Tensor xf = feature_major(x);
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    ctx->saved_data["x_feature_major"] = is_feature_major(x);
    ctx->save_for_backward({xf, weight, col_ptr, row_idx, perm, flat_index});
    return call_masked_linear(xf, weight, bias, row_ptr, col_idx, col_ptr, row_idx, perm, flat_index);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    check_no_double_backward("masked_linear");
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &col_ptr = saved[2], &row_idx = saved[3],
                     &perm = saved[4], &flat_index = saved[5];
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const bool want_x = ctx->needs_input_grad(0), want_weight = ctx->needs_input_grad(1);
    const bool want_bias = has_bias && ctx->needs_input_grad(2);
    at::Tensor grad_x, grad_weight, grad_bias;
    if (want_x) {
      const at::Tensor values = gather_active(weight, flat_index);
      grad_x = in_layout_of_input(call_csr_spmm(feature_major(grads[0]), col_ptr, row_idx, values, perm,
                                                std::nullopt),
                                  ctx->saved_data["x_feature_major"].toBool());
    }
    // Dense, as F.linear's: the momentum of every inactive weight is the growth signal.
    if (want_weight) grad_weight = grads[0].t().mm(x);
    if (want_bias) grad_bias = grads[0].sum(0);
    return {grad_x, grad_weight, grad_bias, {}, {}, {}, {}, {}, {}};
  }
};

class TransposeContiguousFunction : public torch::autograd::Function<TransposeContiguousFunction> {
 public:
  static at::Tensor forward(AutogradContext*, const at::Tensor& x) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_transpose_contiguous(x);
  }

  // The gradient contiguous in the input's shape: a row-major input's own
  // layout, which autograd would otherwise reach with a slow strided copy.
  static variable_list backward(AutogradContext*, variable_list grads) {
    return {call_transpose_contiguous(grads[0])};
  }
};

at::Tensor csr_linear_autograd(const at::Tensor& x, const at::Tensor& values,
                               const OptionalTensor& bias, const at::Tensor& row_ptr,
                               const at::Tensor& col_idx, const at::Tensor& col_ptr,
                               const at::Tensor& row_idx, const at::Tensor& perm) {
  return CsrLinearFunction::apply(x, values, bias, row_ptr, col_idx, col_ptr, row_idx, perm);
}

at::Tensor masked_linear_autograd(const at::Tensor& x, const at::Tensor& weight, const OptionalTensor& bias,
                                  const at::Tensor& row_ptr, const at::Tensor& col_idx,
                                  const at::Tensor& col_ptr, const at::Tensor& row_idx, const at::Tensor& perm,
                                  const at::Tensor& flat_index) {
  return MaskedLinearFunction::apply(x, weight, bias, row_ptr, col_idx, col_ptr, row_idx, perm, flat_index);
}

at::Tensor transpose_contiguous_autograd(const at::Tensor& x) {
  return TransposeContiguousFunction::apply(x);
}

}  // namespace

// The values of the structure's nonzeros: the first nnz, past which a CsrLinear
// keeps idle slots.
// Sizes are SymInts: under torch.compile the nnz is symbolic (it changes at every update).
at::Tensor used_values(const at::Tensor& values, const at::Tensor& col_idx) {
  const c10::SymInt nnz = col_idx.sym_numel();
  TORCH_CHECK_VALUE(values.dim() == 1 && values.sym_numel() >= nnz,
                    "values must be 1-D with one entry per nonzero (", nnz,
                    ") and possibly idle slots after them, got shape ", values.sym_sizes());
  // Narrowed even when there are no idle slots: under torch.compile a test of
  // nnz == capacity would be a guard, and a layer that fills its capacity would recompile.
  return values.narrow_symint(0, 0, nnz);
}

// The backward kernels have no derivatives of their own: a backward that builds a graph
// (create_graph=True: gradient penalties, Hessian-vector products) would get gradients
// that silently miss this layer's second-order terms, so it is refused.
void check_no_double_backward(const char* op) {
  TORCH_CHECK(!at::GradMode::is_enabled(), op,
              " has no double backward: its backward cannot build a graph (create_graph=True, "
              "torch.autograd.grad of a gradient). For gradient penalties or Hessian-vector products "
              "use SparseLinear with backend='dense'.");
}

at::Tensor pad_to_slots(const at::Tensor& grad_values, const c10::SymInt& slots) {
  // Always a new tensor, for the reason used_values always narrows; zeroed whole rather
  // than past nnz, because a tensor of the symbolic size slots - nnz would be assumed to
  // hold at least 2 entries (a guard: a layer within one slot of its capacity recompiled).
  at::Tensor out = at::zeros_symint({slots}, grad_values.options());
  out.narrow_symint(0, 0, grad_values.sym_numel()).copy_(grad_values);
  return out;
}

TORCH_LIBRARY_IMPL(sparsemom, CompositeExplicitAutograd, m) {
  m.impl("csr_linear", &csr_linear);
  m.impl("masked_linear", &masked_linear);
  m.impl("csr_linear_backward", &csr_linear_backward);
  m.impl("transpose_contiguous", &transpose_contiguous);
}

TORCH_LIBRARY_IMPL(sparsemom, Autograd, m) {
  m.impl("csr_linear", &csr_linear_autograd);
  m.impl("masked_linear", &masked_linear_autograd);
  m.impl("transpose_contiguous", &transpose_contiguous_autograd);
}

}  // namespace sparsemom
