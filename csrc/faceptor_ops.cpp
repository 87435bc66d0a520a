// Operator registration of the faceptor extension: schemas, CPU and (when built with CUDA) CUDA kernels.
// Python (ops.py) adds register_fake and register_autograd. The CUDA kernels live in heatmap_cuda.cu behind a
// plain extern "C" launch API; the current stream comes from Python as an int64, so this file needs no CUDA
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

#ifdef FACEPTOR_WITH_CUDA
extern "C" int faceptor_heatmap_fwd_cuda(int dtype, const void* x, int64_t B, int64_t K, int64_t H, int64_t W,
                                         int64_t sB, int64_t sK, int64_t sH, int64_t sW, void* coords,
                                         void* stats, void* stream);
extern "C" int faceptor_heatmap_bwd_cuda(int dtype, const void* grad, const void* x, const void* stats, int64_t B,
                                         int64_t K, int64_t H, int64_t W, int64_t sB, int64_t sK, int64_t sH,
                                         int64_t sW, void* gx, void* stream);
extern "C" const char* faceptor_cuda_error_string(int err);

namespace faceptor {
namespace {

// dtype codes shared with heatmap_cuda.cu
int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return 0;
    case at::kDouble: return 1;
    case at::kHalf: return 2;
    case at::kBFloat16: return 3;
    default: TORCH_CHECK(false, "faceptor::heatmap_to_coords: unsupported dtype ", t);
  }
}

std::tuple<at::Tensor, at::Tensor> heatmap_fwd_cuda(const at::Tensor& x, int64_t stream) {
  check_logits(x);
  c10::DeviceGuard guard(x.device());
  auto opts = x.options().dtype(coords_dtype(x.scalar_type()));
  auto coords = at::empty({x.size(0), x.size(1), 2}, opts);
  auto stats = at::empty({x.size(0), x.size(1), 3}, opts);
  const int err = faceptor_heatmap_fwd_cuda(dtype_code(x.scalar_type()), x.const_data_ptr(), x.size(0), x.size(1),
                                            x.size(2), x.size(3), x.stride(0), x.stride(1), x.stride(2),
                                            x.stride(3), coords.mutable_data_ptr(), stats.mutable_data_ptr(),
                                            reinterpret_cast<void*>(stream));
  TORCH_CHECK(err == 0, "faceptor::heatmap_to_coords (CUDA): ", faceptor_cuda_error_string(err));
  return {coords, stats};
}

at::Tensor heatmap_bwd_cuda(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& stats, int64_t stream) {
  check_logits(x);
  check_backward_args(grad, x, stats);
  c10::DeviceGuard guard(x.device());
  auto g = grad.contiguous();
  auto st = stats.contiguous();
  auto gx = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  const int err = faceptor_heatmap_bwd_cuda(dtype_code(x.scalar_type()), g.const_data_ptr(), x.const_data_ptr(),
                                            st.const_data_ptr(), x.size(0), x.size(1), x.size(2), x.size(3),
                                            x.stride(0), x.stride(1), x.stride(2), x.stride(3),
                                            gx.mutable_data_ptr(), reinterpret_cast<void*>(stream));
  TORCH_CHECK(err == 0, "faceptor::heatmap_to_coords_bwd (CUDA): ", faceptor_cuda_error_string(err));
  return gx;
}

}  // namespace
}  // namespace faceptor
#endif  // FACEPTOR_WITH_CUDA

TORCH_LIBRARY(faceptor, m) {
  // coords [B,K,2] and per-channel stats [B,K,3] = (S, negative when the 1e-6 clamp is active; u; v)
  m.def("heatmap_to_coords_fwd(Tensor logits, int stream=0) -> (Tensor coords, Tensor stats)");
  m.def("heatmap_to_coords_bwd(Tensor grad, Tensor logits, Tensor stats, int stream=0) -> Tensor");
}

TORCH_LIBRARY_IMPL(faceptor, CPU, m) {
  m.impl("heatmap_to_coords_fwd", &faceptor::heatmap_fwd_cpu);
  m.impl("heatmap_to_coords_bwd", &faceptor::heatmap_bwd_cpu);
}

#ifdef FACEPTOR_WITH_CUDA
TORCH_LIBRARY_IMPL(faceptor, CUDA, m) {
  m.impl("heatmap_to_coords_fwd", &faceptor::heatmap_fwd_cuda);
  m.impl("heatmap_to_coords_bwd", &faceptor::heatmap_bwd_cuda);
}
#endif
