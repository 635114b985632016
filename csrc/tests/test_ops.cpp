// C++ test of the sparsemom operators, without Python and without a test
// framework: it calls every operator through the c10 dispatcher, as any C++
// user of libsparsemom would, and checks the results against the same
// arithmetic written with plain ATen operations. Built by CMakeLists.txt as
// `sparsemom_cpp_test` and run by ctest; exits non-zero when a check fails.
//
// The operators are found only if libsparsemom was loaded (its TORCH_LIBRARY
// registrations are static initializers), so the first check is that every
// schema is there.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <iostream>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "cpu/cpu_isa.h"
#include "sparsemom.h"

namespace {

int g_passed = 0;
int g_failed = 0;
std::string g_case;  // name of the running test case, for failure messages

void check(bool ok, const std::string& what) {
  if (ok) {
    ++g_passed;
  } else {
    ++g_failed;
    std::cerr << "FAILED [" << g_case << "] " << what << "\n";
  }
}

// Runs one test case; an unexpected exception is one failure, not a crash.
void run_case(const std::string& name, const std::function<void()>& body) {
  g_case = name;
  const int failed_before = g_failed;
  try {
    body();
  } catch (const std::exception& e) {
    ++g_failed;
    std::cerr << "FAILED [" << name << "] unexpected exception: " << e.what() << "\n";
  }
  std::cout << (g_failed == failed_before ? "ok      " : "FAILED  ") << name << "\n";
}

double max_abs_diff(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>();
}

// `actual` must be close to `expected` (torch.testing-style rtol/atol).
void check_close(const at::Tensor& actual, const at::Tensor& expected, const std::string& what,
                 double rtol, double atol) {
  if (actual.sizes() != expected.sizes() || actual.scalar_type() != expected.scalar_type()) {
    std::ostringstream msg;
    msg << what << ": got shape " << actual.sizes() << " " << actual.scalar_type()
        << ", expected " << expected.sizes() << " " << expected.scalar_type();
    check(false, msg.str());
    return;
  }
  const bool ok = at::allclose(actual, expected, rtol, atol);
  std::ostringstream msg;
  msg << what << ": max |actual - expected| = " << max_abs_diff(actual, expected)
      << " (rtol " << rtol << ", atol " << atol << ")";
  check(ok, msg.str());
}

void check_equal(const at::Tensor& actual, const at::Tensor& expected, const std::string& what) {
  const bool ok = actual.sizes() == expected.sizes() &&
                  actual.scalar_type() == expected.scalar_type() && at::equal(actual, expected);
  std::ostringstream msg;
  msg << what << ": not bit-equal";
  if (actual.sizes() == expected.sizes()) msg << ", max |diff| = " << max_abs_diff(actual, expected);
  check(ok, msg.str());
}

// Tolerances for comparing a fused kernel with the unfused ATen formula. The
// rounding steps are the same, so most results are bit-equal; a few differ by
// an ulp (ATen's CPU division by a scalar multiplies by its reciprocal). rtol
// allows a few ulps, atol only matters next to zero.
double rtol_for(at::ScalarType t) { return t == at::kDouble ? 1e-14 : 1e-6; }
double atol_for(at::ScalarType t) { return t == at::kDouble ? 1e-16 : 1e-9; }

// ---- the operators, through the dispatcher, with the kernels' C++ signatures ----

using OptTensor = std::optional<at::Tensor>;

c10::OperatorHandle op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
}

void mask_apply_(const at::Tensor& weight, const at::Tensor& mask) {
  static auto handle =
      op("sparsemom::mask_apply_").typed<void(const at::Tensor&, const at::Tensor&)>();
  handle.call(weight, mask);
}

void fused_sgd_step_(const at::Tensor& param, const at::Tensor& grad, const OptTensor& buf,
                     const OptTensor& mask, double lr, double momentum, double dampening,
                     double weight_decay, bool nesterov, bool maximize, bool init_buf) {
  static auto handle =
      op("sparsemom::fused_sgd_step_")
          .typed<void(const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&,
                      double, double, double, double, bool, bool, bool)>();
  handle.call(param, grad, buf, mask, lr, momentum, dampening, weight_decay, nesterov, maximize,
              init_buf);
}

void fused_adam_step_(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                      const at::Tensor& exp_avg_sq, const OptTensor& max_exp_avg_sq,
                      const OptTensor& mask, double lr, double beta1, double beta2, double eps,
                      double weight_decay, bool decoupled, bool maximize, int64_t step) {
  static auto handle =
      op("sparsemom::fused_adam_step_")
          .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                      const OptTensor&, const OptTensor&, double, double, double, double, double,
                      bool, bool, int64_t)>();
  handle.call(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, mask, lr, beta1, beta2, eps,
              weight_decay, decoupled, maximize, step);
}

at::Tensor magnitude_prune(const at::Tensor& weight, const at::Tensor& mask, int64_t k) {
  static auto handle = op("sparsemom::magnitude_prune")
                           .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t)>();
  return handle.call(weight, mask, k);
}

at::Tensor momentum_grow(const at::Tensor& score, const at::Tensor& mask, int64_t k) {
  static auto handle = op("sparsemom::momentum_grow")
                           .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t)>();
  return handle.call(score, mask, k);
}

at::Tensor set_prune(const at::Tensor& weight, const at::Tensor& mask, int64_t k) {
  static auto handle = op("sparsemom::set_prune")
                           .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t)>();
  return handle.call(weight, mask, k);
}

int64_t cuda_version() {
  static auto handle = op("sparsemom::cuda_version").typed<int64_t()>();
  return handle.call();
}

std::string build_info() {
  static auto handle = op("sparsemom::build_info").typed<std::string()>();
  return handle.call();
}

// Calls `fn`, which must throw a c10::Error whose message names `word`;
// returns the message ("" when nothing was thrown).
template <typename Fn>
std::string expect_error(Fn fn, const std::string& word, const std::string& what) {
  try {
    fn();
  } catch (const c10::Error& e) {
    const std::string message = e.what_without_backtrace();
    check(message.find(word) != std::string::npos,
          what + ": error message should name '" + word + "', got: " + message);
    return message;
  } catch (const std::exception& e) {
    check(false, what + ": expected c10::Error, got another exception: " + e.what());
    return e.what();
  }
  check(false, what + ": expected c10::Error, nothing was thrown");
  return "";
}

// ---- references, with plain ATen ops (one rounding per op, no alpha= FMA) ----

at::Tensor where_mask(const at::Tensor& mask, const at::Tensor& value) {
  return at::where(mask, value, at::zeros_like(value));
}

// torch.optim.SGD, one step (dampening 0). Updates buf in place, returns new param.
at::Tensor sgd_reference(at::Tensor p, at::Tensor g, at::Tensor& buf, const OptTensor& mask,
                         double lr, double momentum, double wd, bool nesterov, bool init_buf) {
  if (wd != 0.0) g = g + p * wd;
  if (momentum != 0.0) {
    buf = init_buf ? g.clone() : buf * momentum + g;
    g = nesterov ? g + buf * momentum : buf;
  }
  p = p - g * lr;
  return mask.has_value() ? where_mask(*mask, p) : p;
}

struct AdamState {
  at::Tensor exp_avg, exp_avg_sq, max_exp_avg_sq;
};

// torch.optim.Adam / AdamW, one step. Updates `s`, returns the new param.
at::Tensor adam_reference(at::Tensor p, at::Tensor g, AdamState& s, const OptTensor& mask,
                          double lr, double beta1, double beta2, double eps, double wd,
                          bool decoupled, bool amsgrad, int64_t step) {
  if (decoupled) {
    p = p * (1.0 - lr * wd);
  } else if (wd != 0.0) {
    g = g + p * wd;
  }
  s.exp_avg = s.exp_avg + (g - s.exp_avg) * (1.0 - beta1);  // lerp with weight < 0.5
  // addcmul_(grad, grad, value) computes value * grad * grad, left to right.
  s.exp_avg_sq = s.exp_avg_sq * beta2 + g * (1.0 - beta2) * g;
  at::Tensor second = s.exp_avg_sq;
  if (amsgrad) {
    s.max_exp_avg_sq = at::maximum(s.max_exp_avg_sq, s.exp_avg_sq);
    second = s.max_exp_avg_sq;
  }
  const double bias_correction1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double bias_correction2 = 1.0 - std::pow(beta2, static_cast<double>(step));
  const at::Tensor denom = second.sqrt() / std::sqrt(bias_correction2) + eps;
  p = p - s.exp_avg / denom * (lr / bias_correction1);
  return mask.has_value() ? where_mask(*mask, p) : p;
}

// |x| as the integer its bits spell (sign bit cleared), flat, as int64: the order
// of every selection (NaN above inf).
at::Tensor magnitude_bits(const at::Tensor& values) {
  const bool wide = values.element_size() == 8;
  const at::Tensor bits =
      values.contiguous().view(wide ? at::kLong : at::kInt).reshape({-1}).to(at::kLong);
  return bits.bitwise_and(wide ? INT64_MAX : int64_t(0x7fffffff));
}

// `mask` with the k `candidates` of smallest key set to `fill` (ties by lower
// index: a stable sort of the candidates, which are in index order).
at::Tensor select_reference(const at::Tensor& mask, const at::Tensor& candidates,
                            const at::Tensor& key, int64_t k, bool fill) {
  const at::Tensor index = at::nonzero(candidates.reshape({-1})).reshape({-1});
  const at::Tensor order =
      std::get<1>(at::sort(key.index_select(0, index), /*stable=*/true, 0, /*descending=*/false));
  const at::Tensor chosen = index.index_select(0, order.slice(0, 0, k));
  return mask.reshape({-1}).clone().index_fill_(0, chosen, fill).view(mask.sizes());
}

// ---- test cases ----

void test_schemas() {
  for (const char* name : {"sparsemom::mask_apply_", "sparsemom::fused_sgd_step_",
                           "sparsemom::fused_adam_step_", "sparsemom::magnitude_prune",
                           "sparsemom::momentum_grow", "sparsemom::set_prune",
                           "sparsemom::cuda_version", "sparsemom::build_info"}) {
    const auto handle = c10::Dispatcher::singleton().findSchema({name, ""});
    check(handle.has_value(), std::string("schema ") + name + " is registered (library loaded?)");
  }
  const auto mask_op = op("sparsemom::mask_apply_");
  check(mask_op.hasKernelForDispatchKey(c10::DispatchKey::CPU), "mask_apply_ has a CPU kernel");
  check(op("sparsemom::fused_sgd_step_").hasKernelForDispatchKey(c10::DispatchKey::CPU),
        "fused_sgd_step_ has a CPU kernel");
  check(op("sparsemom::fused_adam_step_").hasKernelForDispatchKey(c10::DispatchKey::CPU),
        "fused_adam_step_ has a CPU kernel");
  for (const char* name : {"magnitude_prune", "momentum_grow", "set_prune"}) {
    check(op((std::string("sparsemom::") + name).c_str())
              .hasKernelForDispatchKey(c10::DispatchKey::CPU),
          std::string(name) + " has a CPU kernel");
  }
}

void test_build_info() {
  const std::string info = build_info();
  check(info.find("\"torch_version\"") != std::string::npos,
        "build_info() contains \"torch_version\", got: " + info);
  // This also makes the test reference a symbol of libsparsemom directly.
  const std::string isa = sparsemom::cpu::isa_name(sparsemom::cpu::active_isa());
  check(info.find("\"cpu_isa\": \"" + isa + "\"") != std::string::npos,
        "build_info() reports cpu_isa " + isa + ", got: " + info);
  const char* cap = std::getenv("SPARSEMOM_CPU_ISA");
  if (cap != nullptr && std::string(cap) == "default") {
    check(sparsemom::cpu::active_isa() == sparsemom::cpu::Isa::kDefault,
          "SPARSEMOM_CPU_ISA=default selects the default kernels");
  }
#ifdef SPARSEMOM_WITH_CUDA
  check(cuda_version() > 0, "cuda_version() > 0 in a CUDA build");
#else
  check(cuda_version() == 0, "cuda_version() == 0 in a CPU-only build, got " +
                                 std::to_string(cuda_version()));
#endif
  // The boxed path (what TorchScript and torch.ops use) gives the same string.
  torch::jit::Stack stack;
  op("sparsemom::build_info").callBoxed(&stack);
  check(stack.size() == 1 && stack[0].isString() && stack[0].toStringRef() == info,
        "build_info() called boxed returns the same string");
  std::cout << "        build_info: " << info << "\n";
}

void test_mask_apply(const at::TensorOptions& opts, int64_t n, bool non_contiguous) {
  // Non-contiguous weight: the transpose of a (n/8, 8) matrix, updated through a copy.
  at::Tensor weight = non_contiguous ? at::randn({8, n / 8}, opts).t() : at::randn({n}, opts);
  const at::Tensor mask = at::rand(weight.sizes(), opts.dtype(at::kFloat)) < 0.3;
  const at::Tensor before = weight.clone();
  mask_apply_(weight, mask);
  check_equal(weight, where_mask(mask, before), "weight == where(mask, weight, 0)");
  check(at::equal(weight.masked_select(mask), before.masked_select(mask)),
        "active entries unchanged");
  check(weight.masked_select(mask.logical_not()).eq(0).all().item<bool>(),
        "inactive entries are zero");

  // A non-contiguous mask (a transposed view) is read correctly too.
  at::Tensor w2 = at::randn({64, 48}, opts);
  const at::Tensor m2 = (at::rand({48, 64}, opts.dtype(at::kFloat)) < 0.5).t();
  const at::Tensor w2_before = w2.clone();
  mask_apply_(w2, m2);
  check_equal(w2, where_mask(m2, w2_before), "non-contiguous mask");
}

void test_mask_apply_dtypes(const at::TensorOptions& opts) {
  for (const auto dtype : {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16}) {
    at::Tensor w = at::randn({1000}, opts.dtype(dtype));
    const at::Tensor mask = at::rand({1000}, opts.dtype(at::kFloat)) < 0.5;
    const at::Tensor before = w.clone();
    mask_apply_(w, mask);
    check_equal(w, where_mask(mask, before), std::string("mask_apply_ ") + c10::toString(dtype));
  }
}

void test_sgd(const at::TensorOptions& opts, int64_t n, bool init_buf) {
  const double lr = 0.1, momentum = 0.9, wd = 1e-2;
  at::Tensor param = at::randn({n}, opts);
  const at::Tensor grad = at::randn({n}, opts);
  at::Tensor buf = init_buf ? at::empty({n}, opts).fill_(12345.0) : at::randn({n}, opts);
  const at::Tensor mask = at::rand({n}, opts.dtype(at::kFloat)) < 0.5;

  at::Tensor ref_buf = buf.clone();
  const at::Tensor ref_param = sgd_reference(param.clone(), grad, ref_buf, mask, lr, momentum, wd,
                                             /*nesterov=*/true, init_buf);
  fused_sgd_step_(param, grad, buf, mask, lr, momentum, /*dampening=*/0.0, wd,
                  /*nesterov=*/true, /*maximize=*/false, init_buf);
  const auto t = opts.dtype().toScalarType();
  check_close(param, ref_param, "param (nesterov, weight decay, mask)", rtol_for(t), atol_for(t));
  check_close(buf, ref_buf, "momentum_buffer (updated at inactive positions too)", rtol_for(t),
              atol_for(t));
  check(param.masked_select(mask.logical_not()).eq(0).all().item<bool>(),
        "param is exactly zero at inactive positions");
}

void test_sgd_plain(const at::TensorOptions& opts) {
  // No momentum (buffer None), no mask, maximize: p = p + lr * g.
  at::Tensor param = at::randn({777}, opts);
  const at::Tensor grad = at::randn({777}, opts);
  const at::Tensor expected = param - grad * -0.05;
  fused_sgd_step_(param, grad, std::nullopt, std::nullopt, 0.05, 0.0, 0.0, 0.0, false,
                  /*maximize=*/true, false);
  const auto t = opts.dtype().toScalarType();
  check_close(param, expected, "plain SGD with maximize", rtol_for(t), atol_for(t));
}

void test_adam(const at::TensorOptions& opts, int64_t n, bool decoupled, bool amsgrad,
               int64_t step) {
  const double lr = 1e-3, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, wd = 1e-2;
  at::Tensor param = at::randn({n}, opts);
  const at::Tensor grad = at::randn({n}, opts);
  // step 1 starts from zero moments (a fresh optimizer); later steps from some state.
  const bool fresh = step == 1;
  at::Tensor exp_avg = fresh ? at::zeros({n}, opts) : at::randn({n}, opts) * 0.1;
  at::Tensor exp_avg_sq = fresh ? at::zeros({n}, opts) : at::rand({n}, opts) * 0.01;
  at::Tensor max_sq = fresh ? at::zeros({n}, opts) : exp_avg_sq + at::rand({n}, opts) * 0.01;
  const at::Tensor mask = at::rand({n}, opts.dtype(at::kFloat)) < 0.5;

  AdamState ref{exp_avg.clone(), exp_avg_sq.clone(), max_sq.clone()};
  const at::Tensor ref_param = adam_reference(param.clone(), grad, ref, mask, lr, beta1, beta2,
                                              eps, wd, decoupled, amsgrad, step);
  fused_adam_step_(param, grad, exp_avg, exp_avg_sq, amsgrad ? OptTensor(max_sq) : std::nullopt,
                   mask, lr, beta1, beta2, eps, wd, decoupled, /*maximize=*/false, step);
  const auto t = opts.dtype().toScalarType();
  check_close(param, ref_param, "param", rtol_for(t), atol_for(t));
  check_close(exp_avg, ref.exp_avg, "exp_avg", rtol_for(t), atol_for(t));
  check_close(exp_avg_sq, ref.exp_avg_sq, "exp_avg_sq", rtol_for(t), atol_for(t));
  if (amsgrad) check_close(max_sq, ref.max_exp_avg_sq, "max_exp_avg_sq", rtol_for(t), atol_for(t));
  check(param.masked_select(mask.logical_not()).eq(0).all().item<bool>(),
        "param is exactly zero at inactive positions");
}

// The selection ops against a stable sort of the integer keys; SET per side.
// `tied`: values in {-2, ..., 2}, so most keys tie.
void test_selection(const at::TensorOptions& opts, int64_t n, bool tied) {
  const at::Tensor values = tied ? at::randint(-2, 3, {n}, opts) : at::randn({n}, opts);
  const at::Tensor mask = at::rand({n}, opts) < 0.3;
  const at::Tensor values_cpu = values.cpu();
  const at::Tensor mask_cpu = mask.cpu();
  const at::Tensor key = magnitude_bits(values_cpu);
  const int64_t active = mask_cpu.sum().item<int64_t>();
  for (const int64_t k : {int64_t(0), int64_t(1), active / 2 + 1, active}) {
    check_equal(magnitude_prune(values, mask, k).cpu(),
                select_reference(mask_cpu, mask_cpu, key, k, false),
                "magnitude_prune k=" + std::to_string(k));
  }
  const int64_t inactive = n - active;
  for (const int64_t k : {int64_t(0), int64_t(1), inactive / 3, inactive}) {
    check_equal(momentum_grow(values, mask, k).cpu(),
                select_reference(mask_cpu, mask_cpu.logical_not(), key.neg(), k, true),
                "momentum_grow k=" + std::to_string(k));
  }
  // SET: ceil(k/2) closest to zero among weights >= 0, floor(k/2) among < 0
  // (remainders move when a side runs out; not with these sizes).
  const int64_t k = active / 2 + 1;
  const at::Tensor nonnegative = mask_cpu.logical_and(values_cpu.ge(0));
  const at::Tensor negative = mask_cpu.logical_and(values_cpu.lt(0));
  const at::Tensor expected = select_reference(
      select_reference(mask_cpu, nonnegative, key, k - k / 2, false), negative, key, k / 2, false);
  check_equal(set_prune(values, mask, k).cpu(), expected, "set_prune k=" + std::to_string(k));
}

void test_bad_input(const at::TensorOptions& opts) {
  at::Tensor weight = at::randn({4, 5}, opts);
  const at::Tensor before = weight.clone();

  const at::Tensor wrong_shape = at::ones({5, 4}, opts.dtype(at::kBool));
  const std::string msg = expect_error([&] { mask_apply_(weight, wrong_shape); }, "mask",
                                       "mask_apply_ with a (5, 4) mask for a (4, 5) weight");
  check(msg.find("shape") != std::string::npos, "the error says the shape is wrong: " + msg);
  check(at::equal(weight, before), "weight untouched after the rejected call");

  expect_error([&] { mask_apply_(weight, at::ones({4, 5}, opts)); }, "mask",
               "mask_apply_ with a float mask");
  // The dtype error is a TypeError (c10::TypeError derives from c10::Error).
  try {
    mask_apply_(weight, at::ones({4, 5}, opts));
    check(false, "float mask: nothing thrown");
  } catch (const c10::TypeError&) {
    check(true, "float mask throws c10::TypeError");
  } catch (const c10::Error& e) {
    check(false, std::string("float mask: expected c10::TypeError, got ") +
                     e.what_without_backtrace());
  }

  const at::Tensor grad = at::randn({4, 5}, opts);
  at::Tensor buf = at::zeros({4, 5}, opts);
  expect_error(
      [&] {
        fused_sgd_step_(weight, grad, buf, at::ones({20}, opts.dtype(at::kBool)), 0.1, 0.9, 0.0,
                        0.0, false, false, false);
      },
      "mask", "fused_sgd_step_ with a (20,) mask");
  expect_error(
      [&] {
        fused_sgd_step_(weight, grad, std::nullopt, std::nullopt, 0.1, 0.9, 0.0, 0.0, false,
                        false, false);
      },
      "momentum_buffer", "fused_sgd_step_ with momentum but no buffer");
  at::Tensor m = at::zeros({4, 5}, opts), v = at::zeros({4, 5}, opts);
  expect_error(
      [&] {
        fused_adam_step_(weight, grad, m, v, std::nullopt, at::ones({4, 6}, opts.dtype(at::kBool)),
                         1e-3, 0.9, 0.999, 1e-8, 0.0, false, false, 1);
      },
      "mask", "fused_adam_step_ with a (4, 6) mask");
  expect_error(
      [&] {
        fused_adam_step_(weight, grad, m, v, std::nullopt, std::nullopt, 1e-3, 0.9, 0.999, 1e-8,
                         0.0, false, false, 0);
      },
      "step", "fused_adam_step_ with step 0");
  const at::Tensor all_active = at::ones({4, 5}, opts.dtype(at::kBool));
  const std::string k_msg = expect_error([&] { magnitude_prune(weight, all_active, 21); }, "k",
                                         "magnitude_prune with k above the active count");
  check(k_msg.find("(20)") != std::string::npos, "the error gives the count: " + k_msg);
  expect_error([&] { momentum_grow(weight, all_active, 1); }, "inactive",
               "momentum_grow with no inactive position");
  expect_error([&] { set_prune(weight, all_active, -1); }, "k", "set_prune with k = -1");
  check(at::equal(weight, before), "param untouched after the rejected calls");
  check(buf.eq(0).all().item<bool>() && m.eq(0).all().item<bool>() && v.eq(0).all().item<bool>(),
        "optimizer state untouched after the rejected calls");
}

void run_device_tests(const at::TensorOptions& base, const std::string& device) {
  // 100003 elements: more than the CPU kernels' grain size (1 << 15), so the
  // work is split over threads, and not a multiple of any vector width.
  for (const auto dtype : {at::kFloat, at::kDouble}) {
    const auto opts = base.dtype(dtype);
    const std::string tag = device + " " + c10::toString(dtype);
    run_case("mask_apply_ " + tag, [&] { test_mask_apply(opts, 100000, false); });
    run_case("mask_apply_ " + tag + " non-contiguous",
             [&] { test_mask_apply(opts, 4096, true); });
    run_case("fused_sgd_step_ " + tag + " nesterov+wd+mask",
             [&] { test_sgd(opts, 100003, /*init_buf=*/false); });
    run_case("fused_sgd_step_ " + tag + " first step (init_momentum_buffer)",
             [&] { test_sgd(opts, 1001, /*init_buf=*/true); });
    run_case("fused_sgd_step_ " + tag + " no momentum, maximize", [&] { test_sgd_plain(opts); });
    run_case("fused_adam_step_ " + tag + " Adam step 1",
             [&] { test_adam(opts, 100003, false, false, 1); });
    run_case("fused_adam_step_ " + tag + " AdamW step 5",
             [&] { test_adam(opts, 1001, true, false, 5); });
    run_case("fused_adam_step_ " + tag + " Adam amsgrad step 3",
             [&] { test_adam(opts, 1001, false, true, 3); });
    run_case("selection " + tag, [&] { test_selection(opts, 100003, false); });
    run_case("selection " + tag + " tied values", [&] { test_selection(opts, 100003, true); });
    run_case("selection " + tag + " small", [&] { test_selection(opts, 1001, true); });
  }
  run_case("mask_apply_ " + device + " all dtypes", [&] { test_mask_apply_dtypes(base); });
  run_case("bad input " + device, [&] { test_bad_input(base.dtype(at::kFloat)); });
}

}  // namespace

// memo_by_structure (what the ops use to check a structure once per topology): a value is
// reused only for the same live memory, viewed the same way, at the same version.
void test_structure_memo() {
  int computed = 0;
  auto memo = [&](const char* tag, const at::Tensor& a, const at::Tensor& b, int64_t extra) {
    return sparsemom::memo_by_structure(tag, {a, b}, extra, [&] {
      ++computed;
      return at::full({1}, computed, at::kLong);
    });
  };
  at::Tensor a = at::arange(10, at::kInt);
  const at::Tensor undefined;
  const at::Tensor first = memo("t", a, undefined, 3);
  check(computed == 1 && memo("t", a, undefined, 3).is_same(first), "same tensors: reused");
  check(computed == 1 && memo("t", a.view({10}), undefined, 3).is_same(first) &&
            memo("t", a.detach(), undefined, 3).is_same(first),
        "an alias of the same memory and version (a view, a detach): reused");
  check(memo("t", a.view({2, 5}), undefined, 3).item<int64_t>() == 2, "viewed another way: computed again");
  check(memo("t", a.narrow(0, 1, 9), undefined, 3).item<int64_t>() == 3, "other memory: computed again");
  memo("u", a, undefined, 3);
  memo("t", a, undefined, 4);
  memo("t", a, a, 3);
  check(computed == 6, "another tag, extra or key list: computed again");
  a.view({10}).add_(1);  // an in-place write through an alias bumps the shared version
  check(memo("t", a, undefined, 3).item<int64_t>() == 7, "after an in-place write: computed again");
  check(memo("t", a, undefined, 3).item<int64_t>() == 7, "and then reused");
  a = at::arange(10, at::kInt);  // the old tensor is freed, a new one may reuse its memory
  check(memo("t", a, undefined, 3).item<int64_t>() == 8, "a new tensor: computed again");
  bool thrown = false;
  try {
    sparsemom::memo_by_structure("throws", {a}, 0, [&]() -> at::Tensor {
      ++computed;
      TORCH_CHECK_VALUE(false, "bad structure");
      return at::Tensor();
    });
  } catch (const c10::ValueError&) {
    thrown = true;
  }
  check(thrown, "the error of compute() reaches the caller");
  thrown = false;
  try {
    sparsemom::memo_by_structure("throws", {a}, 0, [&] { return at::Tensor(); });
  } catch (const c10::Error&) {
    thrown = true;
  }
  check(!thrown && computed == 9, "a call that raised is not remembered");
  // Same tag and extra, a shorter key list ({a} against the cached {a, undefined}).
  sparsemom::memo_by_structure("t", {a}, 3, [&] { ++computed; return at::Tensor(); });
  check(computed == 10, "a shorter key list: computed again");
}

int main() {
  at::manual_seed(0);
  run_case("schemas registered", test_schemas);
  if (g_failed != 0) {
    std::cerr << "sparsemom operators are not registered: was libsparsemom loaded?\n";
  } else {
    run_case("build_info", test_build_info);
    run_case("structure memo", test_structure_memo);
    run_device_tests(at::TensorOptions().device(at::kCPU), "cpu");
#ifdef SPARSEMOM_WITH_CUDA
    if (at::hasCUDA()) {
      run_device_tests(at::TensorOptions().device(at::kCUDA), "cuda");
    } else {
      std::cout << "(no GPU visible: CUDA kernels not tested)\n";
    }
#endif
  }
  std::cout << "sparsemom_cpp_test: " << g_passed << " passed, " << g_failed << " failed\n";
  return g_failed == 0 ? 0 : 1;
}
