// Operator registration of the faceptor extension: schemas and CPU kernels. Python (ops.py) adds register_fake
// and register_autograd. When built with CUDA, heatmap_cuda.cu registers the CUDA kernels itself (the
// pytorch/extension-cpp layout), taking the current stream from ATen inside the op; this file needs no CUDA
// headers and compiles against CPU-only torch.
#include <Python.h>
#include <torch/library.h>

#include <ATen/ops/empty.h>

#include "heatmap.h"

// Lets `import _faceptor_ops` load the library (and run the registrations below).
extern "C" PyObject* PyInit__faceptor_ops(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_faceptor_ops", nullptr, -1, nullptr};
  return PyModule_Create(&def);
}

TORCH_LIBRARY(faceptor, m) {
  // coords [B,K,2] and per-channel stats [B,K,3] = (S, negative when the 1e-6 clamp is active; u; v)
  m.def("heatmap_to_coords_fwd(Tensor logits) -> (Tensor coords, Tensor stats)");
  m.def("heatmap_to_coords_bwd(Tensor grad, Tensor logits, Tensor stats) -> Tensor");
}

TORCH_LIBRARY_IMPL(faceptor, CPU, m) {
  m.impl("heatmap_to_coords_fwd", &faceptor::heatmap_fwd_cpu);
  m.impl("heatmap_to_coords_bwd", &faceptor::heatmap_bwd_cpu);
}

