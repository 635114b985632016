// csr_conv2d, the differentiable sparse convolution, and the argument checks of
// the three kernels it is built on (one implementation for every device). The
// forward is csr_conv2d_forward on the input made batch innermost once (a csr
// conv's output already is, so stacked sparse convs copy nothing); the backward is
// csr_conv2d_input_grad on the cached transposed structure and
// csr_conv2d_weight_grad at the structure's nonzeros, both reading the output
// gradient made batch innermost once. The autograd is C++, as csr_linear's.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "dispatch_ops.h"
#include "sparsemom.h"

namespace sparsemom {

int64_t conv_output_size(int64_t size, int64_t kernel, int64_t stride, int64_t padding) {
  return (size + 2 * padding - kernel) / stride + 1;
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptionalTensor = std::optional<at::Tensor>;



at::Tensor call_forward(const at::Tensor& x, const at::Tensor& values, const OptionalTensor& bias,
                        const at::Tensor& row_ptr, const at::Tensor& col_idx, at::IntArrayRef kernel_size,
                        at::IntArrayRef stride, at::IntArrayRef padding) {
  static const auto op =
      find_op<at::Tensor(const at::Tensor&, const at::Tensor&, const OptionalTensor&, const at::Tensor&,
                         const at::Tensor&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef)>(
          "sparsemom::csr_conv2d_forward");
  return op.call(x, values, bias, row_ptr, col_idx, kernel_size, stride, padding);
}

at::Tensor call_input_grad(const at::Tensor& grad_out, const at::Tensor& values, const at::Tensor& col_ptr,
                           const at::Tensor& row_idx, const at::Tensor& perm, at::IntArrayRef input_size,
                           at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding) {
  static const auto op =
      find_op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                         const at::Tensor&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef)>(
          "sparsemom::csr_conv2d_input_grad");
  return op.call(grad_out, values, col_ptr, row_idx, perm, input_size, kernel_size, stride, padding);
}

at::Tensor call_weight_grad(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& row_ptr,
                            const at::Tensor& col_idx, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                            at::IntArrayRef padding) {
  static const auto op =
      find_op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                         at::IntArrayRef, at::IntArrayRef, at::IntArrayRef)>("sparsemom::csr_conv2d_weight_grad");
  return op.call(grad_out, x, row_ptr, col_idx, kernel_size, stride, padding);
}

at::Tensor call_csr_conv2d(const at::Tensor& x, const at::Tensor& values, const OptionalTensor& bias,
                           const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& col_ptr,
                           const at::Tensor& row_idx, const at::Tensor& perm, at::IntArrayRef kernel_size,
                           at::IntArrayRef stride, at::IntArrayRef padding) {
  static const auto op =
      find_op<at::Tensor(const at::Tensor&, const at::Tensor&, const OptionalTensor&, const at::Tensor&,
                         const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, at::IntArrayRef,
                         at::IntArrayRef, at::IntArrayRef)>("sparsemom::csr_conv2d");
  return op.call(x, values, bias, row_ptr, col_idx, col_ptr, row_idx, perm, kernel_size, stride, padding);
}

void check_pair(at::IntArrayRef pair, const char* name, int64_t minimum) {
  TORCH_CHECK_VALUE(pair.size() == 2 && pair[0] >= minimum && pair[1] >= minimum, name,
                    " must be a pair of ints >= ", minimum, ", got ", pair);
}

void check_geometry(at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding) {
  check_pair(kernel_size, "kernel_size", 1);
  check_pair(stride, "stride", 1);
  check_pair(padding, "padding", 0);
}

void check_float_4d(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 4, name, " must be 4-D (batch, channels, height, width), got shape ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name,
                   " must be float32 or float64 (the csr conv kernels' dtypes), got ", t.scalar_type());
}

void check_index(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK_VALUE(t.dim() == 1, name, " must be 1-D, got shape ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt, name, " must be int32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == like.device(), name, " must be on the device of the activations (", like.device(),
                    "), got ", t.device());
}

// The output size along each dimension, or a ValueError when the padded input is
// smaller than the kernel.
std::vector<int64_t> output_size(int64_t in_h, int64_t in_w, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                 at::IntArrayRef padding) {
  TORCH_CHECK_VALUE(in_h + 2 * padding[0] >= kernel_size[0] && in_w + 2 * padding[1] >= kernel_size[1],
                    "the padded input (", in_h + 2 * padding[0], " x ", in_w + 2 * padding[1],
                    ") must be at least the kernel size (", kernel_size[0], " x ", kernel_size[1], ")");
  return {conv_output_size(in_h, kernel_size[0], stride[0], padding[0]),
          conv_output_size(in_w, kernel_size[1], stride[1], padding[1])};
}

void check_no_cuda_kernels(const at::Tensor& x) {
  TORCH_CHECK_NOT_IMPLEMENTED(x.device().is_cpu() || x.device().is_meta(),
                              "csr_conv2d has CPU kernels only: there are no CUDA kernels of the sparse "
                              "convolution yet, got x on ", x.device(),
                              ". On a GPU use SparseConv2d (the mask layout: sparsify(model, layout=\"mask\")).");
}

}  // namespace

// `t` (n, c, h, w) stored batch innermost ((c, h, w, n) contiguous; as a view of that
// shape's permutation): itself when it already is, a contiguous t through the blocked
// transpose of its (n, c * h * w) view, anything else by a copy.
at::Tensor batch_innermost(const at::Tensor& t) {
  const at::Tensor view = t.permute({1, 2, 3, 0});
  if (view.is_contiguous()) return t;
  if (t.is_contiguous() && t.sym_numel() > 0) {
    return call_transpose_contiguous(t.reshape_symint({t.sym_size(0), -1}))
        .view_symint({t.sym_size(1), t.sym_size(2), t.sym_size(3), t.sym_size(0)})
        .permute({3, 0, 1, 2});
  }
  return view.contiguous().permute({3, 0, 1, 2});
}

void check_csr_conv2d_forward_args(const at::Tensor& x, const at::Tensor& values, const OptionalTensor& bias,
                                   const at::Tensor& row_ptr, const at::Tensor& col_idx, at::IntArrayRef kernel_size,
                                   at::IntArrayRef stride, at::IntArrayRef padding) {
  check_geometry(kernel_size, stride, padding);
  check_float_4d(x, "x");
  check_index(row_ptr, "row_ptr", x);
  check_index(col_idx, "col_idx", x);
  TORCH_CHECK_VALUE(row_ptr.numel() >= 1, "row_ptr must have out_channels + 1 >= 1 entries, got none");
  TORCH_CHECK_TYPE(values.scalar_type() == x.scalar_type(), "values must have the dtype of x (", x.scalar_type(),
                   "), got ", values.scalar_type());
  TORCH_CHECK_VALUE(values.dim() == 1 && values.numel() == col_idx.numel() && values.device() == x.device(),
                    "values must be 1-D with one entry per nonzero (", col_idx.numel(), ") on ", x.device(),
                    ", got shape ", values.sizes(), " on ", values.device());
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK_TYPE(bias->scalar_type() == x.scalar_type(), "bias must have the dtype of x (", x.scalar_type(),
                     "), got ", bias->scalar_type());
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->numel() == row_ptr.numel() - 1 && bias->device() == x.device(),
                      "bias must be 1-D with one entry per output channel (", row_ptr.numel() - 1, ") on ",
                      x.device(), ", got shape ", bias->sizes(), " on ", bias->device());
  }
  output_size(x.size(2), x.size(3), kernel_size, stride, padding);
}

void check_csr_conv2d_input_grad_args(const at::Tensor& grad_out, const at::Tensor& values, const at::Tensor& col_ptr,
                                      const at::Tensor& row_idx, const at::Tensor& perm, at::IntArrayRef input_size,
                                      at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding) {
  check_geometry(kernel_size, stride, padding);
  check_float_4d(grad_out, "grad_out");
  check_pair(input_size, "input_size", 0);
  check_index(col_ptr, "col_ptr", grad_out);
  check_index(row_idx, "row_idx", grad_out);
  check_index(perm, "perm", grad_out);
  const int64_t taps = kernel_size[0] * kernel_size[1];
  TORCH_CHECK_VALUE(col_ptr.numel() >= 1 && (col_ptr.numel() - 1) % taps == 0,
                    "col_ptr must have in_channels * kh * kw + 1 entries (kh * kw = ", taps, "), got ",
                    col_ptr.numel());
  TORCH_CHECK_VALUE(perm.numel() == row_idx.numel(), "perm must have one entry per nonzero (", row_idx.numel(),
                    "), got ", perm.numel());
  TORCH_CHECK_TYPE(values.scalar_type() == grad_out.scalar_type(), "values must have the dtype of grad_out (",
                   grad_out.scalar_type(), "), got ", values.scalar_type());
  TORCH_CHECK_VALUE(values.dim() == 1 && values.numel() >= row_idx.numel() && values.device() == grad_out.device(),
                    "values must be 1-D with at least one entry per nonzero (", row_idx.numel(), ") on ",
                    grad_out.device(), ", got shape ", values.sizes(), " on ", values.device());
  const std::vector<int64_t> out = output_size(input_size[0], input_size[1], kernel_size, stride, padding);
  TORCH_CHECK_VALUE(grad_out.size(2) == out[0] && grad_out.size(3) == out[1], "grad_out must be (batch, out_channels, ",
                    out[0], ", ", out[1], ") for an input of ", input_size[0], " x ", input_size[1], ", got shape ",
                    grad_out.sizes());
}

void check_csr_conv2d_weight_grad_args(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& row_ptr,
                                       const at::Tensor& col_idx, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                       at::IntArrayRef padding) {
  check_geometry(kernel_size, stride, padding);
  check_float_4d(x, "x");
  check_float_4d(grad_out, "grad_out");
  check_index(row_ptr, "row_ptr", x);
  check_index(col_idx, "col_idx", x);
  TORCH_CHECK_VALUE(row_ptr.numel() >= 1, "row_ptr must have out_channels + 1 >= 1 entries, got none");
  TORCH_CHECK_TYPE(grad_out.scalar_type() == x.scalar_type(), "grad_out must have the dtype of x (", x.scalar_type(),
                   "), got ", grad_out.scalar_type());
  TORCH_CHECK_VALUE(grad_out.device() == x.device(), "grad_out must be on the device of x (", x.device(), "), got ",
                    grad_out.device());
  const std::vector<int64_t> out = output_size(x.size(2), x.size(3), kernel_size, stride, padding);
  TORCH_CHECK_VALUE(grad_out.size(0) == x.size(0) && grad_out.size(1) == row_ptr.numel() - 1 &&
                        grad_out.size(2) == out[0] && grad_out.size(3) == out[1],
                    "grad_out must be (batch = ", x.size(0), ", out_channels = ", row_ptr.numel() - 1, ", ", out[0],
                    ", ", out[1], "), got shape ", grad_out.sizes());
}

namespace {

void check_transposed_conv_structure(const at::Tensor& x, const at::Tensor& col_idx, const at::Tensor& col_ptr,
                                     const at::Tensor& row_idx, const at::Tensor& perm, at::IntArrayRef kernel_size) {
  check_pair(kernel_size, "kernel_size", 1);
  TORCH_CHECK_VALUE(x.dim() == 4, "x must be 4-D (batch, channels, height, width), got shape ", x.sizes());
  TORCH_CHECK_VALUE(col_ptr.dim() == 1 && row_idx.dim() == 1 && perm.dim() == 1 &&
                        row_idx.sym_numel() == col_idx.sym_numel() && perm.sym_numel() == col_idx.sym_numel(),
                    "row_idx and perm must have one entry per nonzero (", col_idx.sym_numel(),
                    ") and col_ptr must be 1-D; pass csr_transpose(row_ptr, col_idx, in_channels * kh * kw)");
  TORCH_CHECK_VALUE(col_ptr.sym_numel() == x.sym_size(1) * kernel_size[0] * kernel_size[1] + 1,
                    "col_ptr must have in_channels * kh * kw + 1 = ", x.sym_size(1) * kernel_size[0] * kernel_size[1] + 1,
                    " entries for x of shape ", x.sym_sizes(), ", got ", col_ptr.sym_numel());
  TORCH_CHECK_TYPE(perm.scalar_type() == at::kInt, "perm must be int32, got ", perm.scalar_type());
  // Before the forward, so a bad perm fails before any gradient is accumulated.
  check_permutation_once(perm, "perm");
}

at::Tensor csr_conv2d(const at::Tensor& x, const at::Tensor& values, const OptionalTensor& bias,
                      const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& col_ptr,
                      const at::Tensor& row_idx, const at::Tensor& perm, at::IntArrayRef kernel_size,
                      at::IntArrayRef stride, at::IntArrayRef padding) {
  check_no_cuda_kernels(x);
  check_transposed_conv_structure(x, col_idx, col_ptr, row_idx, perm, kernel_size);
  return call_forward(x, used_values(values, col_idx), bias, row_ptr, col_idx, kernel_size, stride, padding);
}

// A batch-innermost (n, c, h, w) tensor as a contiguous one, through the blocked
// transpose of its (c * h * w, n) view.
at::Tensor contiguous_from_batch_innermost(const at::Tensor& t) {
  if (t.sym_numel() == 0) return t.contiguous();
  const at::Tensor columns = t.permute({1, 2, 3, 0}).reshape_symint({-1, t.sym_size(0)});
  return call_transpose_contiguous(columns).view_symint(t.sym_sizes());
}

class CsrConv2dFunction : public torch::autograd::Function<CsrConv2dFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& values,
                            const OptionalTensor& bias, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                            const at::Tensor& col_ptr, const at::Tensor& row_idx, const at::Tensor& perm,
                            at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    check_no_cuda_kernels(x);
    // Made once, the batch-innermost input serves the forward and the weight gradient.
    const at::Tensor xb = batch_innermost(x);
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    ctx->saved_data["x_contiguous"] = x.is_contiguous() && !xb.is_same(x);
    // The spatial size is static (a graph specialises on it); the batch may be symbolic.
    ctx->saved_data["input_size"] = std::vector<int64_t>{x.sym_size(2).guard_int(__FILE__, __LINE__),
                                                         x.sym_size(3).guard_int(__FILE__, __LINE__)};
    ctx->saved_data["kernel_size"] = kernel_size.vec();
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["padding"] = padding.vec();
    ctx->save_for_backward({xb, values, row_ptr, col_idx, col_ptr, row_idx, perm});
    // The op below autograd checks the arguments: its kernel, or under tracing its fake.
    return call_csr_conv2d(xb, values, bias, row_ptr, col_idx, col_ptr, row_idx, perm, kernel_size, stride, padding);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    check_no_double_backward("csr_conv2d");
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &values = saved[1], &row_ptr = saved[2], &col_idx = saved[3],
                     &col_ptr = saved[4], &row_idx = saved[5], &perm = saved[6];
    const std::vector<int64_t> input_size = ctx->saved_data["input_size"].toIntVector();
    const std::vector<int64_t> kernel_size = ctx->saved_data["kernel_size"].toIntVector();
    const std::vector<int64_t> stride = ctx->saved_data["stride"].toIntVector();
    const std::vector<int64_t> padding = ctx->saved_data["padding"].toIntVector();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const bool want_x = ctx->needs_input_grad(0), want_values = ctx->needs_input_grad(1);
    const bool want_bias = has_bias && ctx->needs_input_grad(2);
    at::Tensor grad_x, grad_values, grad_bias;
    // Made once, the output gradient serves both kernels in the layout they read.
    const at::Tensor grad = (want_x || want_values) ? batch_innermost(grads[0]) : grads[0];
    if (want_x) {
      grad_x = call_input_grad(grad, values, col_ptr, row_idx, perm, input_size, kernel_size, stride, padding);
      // A contiguous input gets a contiguous gradient, which the layer below reads
      // without a strided copy.
      if (ctx->saved_data["x_contiguous"].toBool()) grad_x = contiguous_from_batch_innermost(grad_x);
    }
    if (want_values) {
      grad_values = pad_to_slots(call_weight_grad(grad, x, row_ptr, col_idx, kernel_size, stride, padding),
                                 values.sym_numel());
    }
    if (want_bias) grad_bias = grads[0].sum({0, 2, 3});
    return {grad_x, grad_values, grad_bias, {}, {}, {}, {}, {}, {}, {}, {}};
  }
};

at::Tensor csr_conv2d_autograd(const at::Tensor& x, const at::Tensor& values, const OptionalTensor& bias,
                               const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& col_ptr,
                               const at::Tensor& row_idx, const at::Tensor& perm, at::IntArrayRef kernel_size,
                               at::IntArrayRef stride, at::IntArrayRef padding) {
  return CsrConv2dFunction::apply(x, values, bias, row_ptr, col_idx, col_ptr, row_idx, perm, kernel_size, stride,
                                  padding);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsemom, CompositeExplicitAutograd, m) { m.impl("csr_conv2d", &csr_conv2d); }

TORCH_LIBRARY_IMPL(sparsemom, Autograd, m) { m.impl("csr_conv2d", &csr_conv2d_autograd); }

}  // namespace sparsemom
