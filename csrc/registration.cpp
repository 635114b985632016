// Every operator schema of the `sparsemom` namespace, in one place. Backend
// files (cpu/*.cpp, cuda/*.cu) only add implementations with
// TORCH_LIBRARY_IMPL; the dispatcher picks the one for the tensors' device.
#include <torch/library.h>
#include <torch/version.h>

#include <sstream>
#include <string>

#include "cpu/cpu_isa.h"

#ifdef SPARSEMOM_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

// Two-level stringify so that a -D value given without quotes (archs
// "sm_80,sm_90" contain commas) becomes a string literal.
#define SPARSEMOM_STR_IMPL(...) #__VA_ARGS__
#define SPARSEMOM_STR(...) SPARSEMOM_STR_IMPL(__VA_ARGS__)

namespace sparsemom {
namespace {

// CUDA runtime version the kernels were compiled against (e.g. 13000), 0 in a
// CPU-only build.
int64_t cuda_version() {
#ifdef SPARSEMOM_WITH_CUDA
  return CUDART_VERSION;
#else
  return 0;
#endif
}

// How this binary was built and what it runs with, as JSON.
std::string build_info() {
#ifdef SPARSEMOM_CUDA_ARCHS
  const char* archs = SPARSEMOM_STR(SPARSEMOM_CUDA_ARCHS);
#else
  const char* archs = "";
#endif
  std::ostringstream json;
  json << "{\"torch_version\": \"" << TORCH_VERSION << "\", "
       << "\"cuda_version\": " << cuda_version() << ", "
       << "\"cuda_archs\": \"" << archs << "\", "
       << "\"cpu_isa\": \"" << cpu::isa_name(cpu::active_isa()) << "\", "
       << "\"cpu_isa_detected\": \"" << cpu::isa_name(cpu::detected_isa()) << "\", "
#ifdef _OPENMP
       << "\"openmp\": true, "
#else
       << "\"openmp\": false, "
#endif
#if defined(__clang__)
       << "\"compiler\": \"clang " << __clang_major__ << "." << __clang_minor__ << "\"}";
#elif defined(__GNUC__)
       << "\"compiler\": \"gcc " << __GNUC__ << "." << __GNUC_MINOR__ << "\"}";
#else
       << "\"compiler\": \"unknown\"}";
#endif
  return json.str();
}

}  // namespace

TORCH_LIBRARY(sparsemom, m) {
  m.def("mask_apply_(Tensor(a!) weight, Tensor mask) -> ()");
  // mask_matches_csr: whether the 2-D bool mask is true exactly at the positions of the
  // canonical CSR structure (row_ptr, col_idx) of its shape. A host query, read before a
  // cached structure is reused (the mask may have been written where its version counter
  // does not see it).
  m.def("mask_matches_csr(Tensor mask, Tensor row_ptr, Tensor col_idx) -> bool");
  m.def(
      "fused_sgd_step_(Tensor(a!) param, Tensor grad, Tensor(b!)? momentum_buffer, "
      "Tensor? mask, float lr, float momentum, float dampening, float weight_decay, "
      "bool nesterov, bool maximize, bool init_momentum_buffer) -> ()");
  m.def(
      "fused_adam_step_(Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg, "
      "Tensor(c!) exp_avg_sq, Tensor(d!)? max_exp_avg_sq, Tensor? mask, float lr, "
      "float beta1, float beta2, float eps, float weight_decay, bool decoupled_weight_decay, "
      "bool maximize, int step) -> ()");
  // Functional: each returns a new contiguous bool mask of mask's shape.
  m.def("magnitude_prune(Tensor weight, Tensor mask, int k) -> Tensor");
  m.def("momentum_grow(Tensor score, Tensor mask, int k) -> Tensor");
  m.def("set_prune(Tensor weight, Tensor mask, int k) -> Tensor");
  // Sparse matmul with W in CSR (row_ptr, col_idx: int32; values: nnz). Dense
  // operands are (batch, features) of any strides; results are (batch, n_rows)
  // stored feature-major (strides (1, batch)), the layout the kernels read.
  // csr_spmm: y = x W^T + bias, with values[value_perm[k]] as nonzero k when
  // value_perm is given (a transposed structure sharing the CSR values).
  m.def(
      "csr_spmm(Tensor x, Tensor row_ptr, Tensor col_idx, Tensor values, Tensor? value_perm, "
      "Tensor? bias) -> Tensor");
  // csr_sddmm: out[k] = sum over the batch of a[:, row(k)] * b[:, col_idx[k]].
  m.def("csr_sddmm(Tensor a, Tensor b, Tensor row_ptr, Tensor col_idx) -> Tensor");
  // csr_transpose: the CSC structure (col_ptr, row_idx) and perm, CSC position ->
  // CSR position, so that values[perm] are the values in CSC order.
  m.def("csr_transpose(Tensor row_ptr, Tensor col_idx, int n_cols) -> (Tensor, Tensor, Tensor)");
  // csr_linear: csr_spmm with autograd (x, values, bias); the transposed structure
  // (from csr_transpose) serves the grad of x.
  m.def(
      "csr_linear(Tensor x, Tensor values, Tensor? bias, Tensor row_ptr, Tensor col_idx, "
      "Tensor col_ptr, Tensor row_idx, Tensor perm) -> Tensor");
  // masked_linear: the mask layout's sparse layer, x W^T + bias with the active
  // weights of the dense `weight` (its flat_index entries, in CSR order) through
  // csr_spmm, the grad of x through the transposed structure, the grad of weight
  // dense. Both layer ops take x of any strides and make it feature-major once.
  m.def(
      "masked_linear(Tensor x, Tensor weight, Tensor? bias, Tensor row_ptr, Tensor col_idx, "
      "Tensor col_ptr, Tensor row_idx, Tensor perm, Tensor flat_index) -> Tensor");
  // csr_linear_backward: csr_linear's two gradients at once, (grad_x, grad_values) =
  // (csr_spmm(grad, col_ptr, row_idx, values, perm), csr_sddmm(grad, x, row_ptr, col_idx)).
  // The CPU fuses them into one pass (each nonzero reads grad's tile once, not twice).
  m.def(
      "csr_linear_backward(Tensor grad, Tensor x, Tensor values, Tensor row_ptr, Tensor col_idx, "
      "Tensor col_ptr, Tensor row_idx, Tensor perm) -> (Tensor, Tensor)");
  // transpose_contiguous: x.t().contiguous() of a 2-D x, always a new tensor. Turns
  // (batch, features) row-major into the feature-major layout the CSR kernels read
  // (as .t() of the result) and back; differentiable (ops.py).
  m.def("transpose_contiguous(Tensor x) -> Tensor");
  // Sparse convolution (ops.py has the rules): the weight is an (out, in * kh * kw)
  // CSR matrix; activations are read and written batch innermost, (n, c, h, w) tensors
  // stored (c, h, w, n). csr_conv2d is the differentiable op (x, values, bias), built
  // on the three kernels below: the forward, the input gradient (walking the
  // transposed structure, values through perm) and the weight gradient sampled at a
  // structure's nonzeros (the conv's SDDMM, also the engine's candidate gradients).
  m.def(
      "csr_conv2d(Tensor x, Tensor values, Tensor? bias, Tensor row_ptr, Tensor col_idx, "
      "Tensor col_ptr, Tensor row_idx, Tensor perm, int[2] kernel_size, int[2] stride, "
      "int[2] padding) -> Tensor");
  m.def(
      "csr_conv2d_forward(Tensor x, Tensor values, Tensor? bias, Tensor row_ptr, Tensor col_idx, "
      "int[2] kernel_size, int[2] stride, int[2] padding) -> Tensor");
  m.def(
      "csr_conv2d_input_grad(Tensor grad_out, Tensor values, Tensor col_ptr, Tensor row_idx, "
      "Tensor perm, int[2] input_size, int[2] kernel_size, int[2] stride, int[2] padding) -> Tensor");
  m.def(
      "csr_conv2d_weight_grad(Tensor grad_out, Tensor x, Tensor row_ptr, Tensor col_idx, "
      "int[2] kernel_size, int[2] stride, int[2] padding) -> Tensor");
  m.def("cuda_version() -> int", &cuda_version);
  m.def("build_info() -> str", &build_info);
}

}  // namespace sparsemom
