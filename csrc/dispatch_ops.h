// The layer ops call the ops below them through the dispatcher (so each device's
// kernel, or under tracing its fake, serves). Host code only: not for nvcc.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>

namespace sparsemom {

// The typed handle of the op `name` ("sparsemom::..."), found once per call site.
template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

inline at::Tensor call_transpose_contiguous(const at::Tensor& x) {
  static const auto op = find_op<at::Tensor(const at::Tensor&)>("sparsemom::transpose_contiguous");
  return op.call(x);
}

}  // namespace sparsemom
