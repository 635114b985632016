// The extension is a Python module only so that `import sparsemom_ext._C`
// loads the shared library and runs its TORCH_LIBRARY registrations. It has
// no methods: every operator is reached through torch.ops.sparsemom.
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
