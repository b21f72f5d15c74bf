// The operator schemas of the native kernels (namespace bimi_C) and the Python module init of
// bimi_kernels._C. CPU implementations live in cpu/, CUDA ones in cuda/ (bimi_kernels._C_cuda).
// bimi_kernels.native wraps these as the `cpp` and `cuda` backends; autograd, fake tensors and
// torch.compile support come from the torch.ops.bimi custom ops in bimi_kernels/ops.py.
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "cpu/kernels.h"

extern "C" {
// An empty module: importing it loads this library, whose static initialisers register the ops.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace {
std::string cpu_isa_name() { return bimi::cpu::selected_isa_name(); }
}  // namespace

TORCH_LIBRARY(bimi_C, m) {
  // J (|O|, K, K) in the accumulation dtype; offsets flat, n = p1.dim() - 2 ints per offset.
  m.def("joint_counts(Tensor p1, Tensor p2, int[] offsets, Tensor? mask) -> Tensor");
  // (dL/dp1, dL/dp2) from dL/dJ.
  m.def(
      "joint_counts_backward(Tensor grad_j, Tensor p1, Tensor p2, int[] offsets, Tensor? mask)"
      " -> (Tensor, Tensor)");
  // Introspection for the tests: the rows of p2 that one tile of the CPU joint counts stages,
  // one (dz, first dy, rows) row per band segment (p gives the shape only).
  m.def("joint_counts_band_layout(Tensor p, int[] offsets) -> Tensor");
  // (CC(U(p), edge), per-sample [min, max] of the raw uncertainty U).
  m.def("boundary_cc(Tensor p, Tensor edge, int window) -> (Tensor, Tensor)");
  // dL/dp from the 0-dim dL/dCC.
  m.def(
      "boundary_cc_backward(Tensor grad_cc, Tensor p, Tensor edge, Tensor u_range, int window)"
      " -> Tensor");
  // The edge map E (B, 1, *S) of an image (B, C, *S) in the accumulation dtype
  // (docs/contract.md §5).
  m.def("edge_map(Tensor image, float gamma) -> Tensor");
  // Which build of the CPU inner loops runs here, "avx512", "avx2" or "generic"
  // (cpu/isa_dispatch.cpp).
  // It takes no tensor, so its one kernel is a catch-all, given with the schema.
  m.def("cpu_isa() -> str", &cpu_isa_name);
}
