// Python module init of bimi_kernels._C_cuda: importing it loads this library, whose static
// initialisers register the CUDA implementations of the torch.ops.bimi_C ops (schemas in
// csrc/bimi.cpp, loaded first by bimi_kernels.native).
#include <Python.h>

extern "C" {
PyObject* PyInit__C_cuda(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
