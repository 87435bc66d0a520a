// Heatmap -> coordinates, CUDA kernels and their CUDA registration (docs/design.md sections 4 and 10; the "normalising channel k" of eq. 9,
// as the authors' code does it: sigmoid, sum-normalise, expected column/row, pixel-centre convention).
// Same math and outputs as heatmap_cpu.cpp. As in pytorch/extension-cpp, this file holds the whole CUDA side of the
// op: the wrappers take at::Tensor, allocate the outputs, take the current stream from ATen inside the op (so it
// is right under torch.compile and CUDA graphs, never a frozen integer) and register with TORCH_LIBRARY_IMPL.
// faceptor_ops.cpp (schema + CPU kernels) needs no CUDA headers and builds against CPU-only torch.
//
// Forward: one block per (b, k) channel; each thread sums sigmoid, sigmoid*col, sigmoid*row over a strided slice
// of the pixels in fp32 (fp64 for fp64 input), the block reduces the three sums in double (warp shuffles, then
// shared memory), thread 0 writes coords (fp32/fp64) and stats (S flagged negative when clamped, u, v).
// Backward: one block per channel, grad_m = s(1-s) (a col + b row + k0), written in the input dtype.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "heatmap.h"

namespace {

constexpr int kThreads = 256;

// Half types are handled as raw 16-bit values (layout-compatible with c10::Half / c10::BFloat16).
struct F16 { unsigned short bits; };
struct BF16 { unsigned short bits; };

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(F16 x) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x.bits));
  return f;
}
__device__ __forceinline__ float to_acc(BF16 x) { return __uint_as_float(static_cast<unsigned int>(x.bits) << 16); }

__device__ __forceinline__ void from_acc(float v, float* out) { *out = v; }
__device__ __forceinline__ void from_acc(double v, double* out) { *out = v; }
__device__ __forceinline__ void from_acc(float v, F16* out) {
  unsigned short h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
  out->bits = h;
}
__device__ __forceinline__ void from_acc(float v, BF16* out) {  // round to nearest even
  const unsigned int u = __float_as_uint(v);
  out->bits = (v != v) ? static_cast<unsigned short>(0x7FC0)
                       : static_cast<unsigned short>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + __expf(-x)); }
__device__ __forceinline__ double sigmoid(double x) { return 1.0 / (1.0 + exp(-x)); }

// Sum of three doubles over the block; the result is valid in thread 0.
__device__ __forceinline__ void block_sum3(double& a, double& b, double& c) {
  __shared__ double sh[3][kThreads / 32];
  for (int off = 16; off > 0; off >>= 1) {
    a += __shfl_down_sync(0xffffffffu, a, off);
    b += __shfl_down_sync(0xffffffffu, b, off);
    c += __shfl_down_sync(0xffffffffu, c, off);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    sh[0][warp] = a;
    sh[1][warp] = b;
    sh[2][warp] = c;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    a = b = c = 0;
    for (int w = 0; w < kThreads / 32; ++w) {
      a += sh[0][w];
      b += sh[1][w];
      c += sh[2][w];
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) heatmap_fwd_kernel(const T* __restrict__ x, long long K, long long H,
                                                               long long W, long long sB, long long sK, long long sH,
                                                               long long sW, typename Acc<T>::type* coords,
                                                               typename Acc<T>::type* stats) {
  using A = typename Acc<T>::type;
  const long long ch = blockIdx.x;
  const T* base = x + (ch / K) * sB + (ch % K) * sK;
  // stage 1: per-thread partial sums over pixels tid, tid + blockDim, ...
  A s_sum = 0, sc_sum = 0, sr_sum = 0;
  for (long long m = threadIdx.x; m < H * W; m += kThreads) {
    const long long r = m / W, c = m - r * W;
    const A s = sigmoid(to_acc(base[r * sH + c * sW]));
    s_sum += s;
    sc_sum += s * static_cast<A>(c);
    sr_sum += s * static_cast<A>(r);
  }
  // stage 2: block reduction in double
  double S = s_sum, Su = sc_sum, Sv = sr_sum;
  block_sum3(S, Su, Sv);
  // stage 3: clamp, expected column / row, pixel-centre normalisation
  if (threadIdx.x == 0) {
    const bool clamped = S < 1e-6;
    const double Sc = clamped ? 1e-6 : S;
    const double u = Su / Sc, v = Sv / Sc;
    coords[2 * ch + 0] = static_cast<A>((u + 0.5) / W);
    coords[2 * ch + 1] = static_cast<A>((v + 0.5) / H);
    stats[3 * ch + 0] = static_cast<A>(clamped ? -Sc : Sc);
    stats[3 * ch + 1] = static_cast<A>(u);
    stats[3 * ch + 2] = static_cast<A>(v);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) heatmap_bwd_kernel(const typename Acc<T>::type* __restrict__ grad,
                                                               const T* __restrict__ x,
                                                               const typename Acc<T>::type* __restrict__ stats,
                                                               long long K, long long H, long long W, long long sB,
                                                               long long sK, long long sH, long long sW, T* gx) {
  using A = typename Acc<T>::type;
  const long long ch = blockIdx.x;
  const T* base = x + (ch / K) * sB + (ch % K) * sK;
  T* out = gx + ch * H * W;  // contiguous [B, K, H, W]
  const double Sf = stats[3 * ch + 0];
  const bool clamped = Sf < 0;
  const double S = clamped ? -Sf : Sf;
  const double u = clamped ? 0.0 : static_cast<double>(stats[3 * ch + 1]);  // clamp: S does not depend on x
  const double v = clamped ? 0.0 : static_cast<double>(stats[3 * ch + 2]);
  const A a = static_cast<A>(grad[2 * ch + 0] / (W * S));  // g_x / (W S)
  const A b = static_cast<A>(grad[2 * ch + 1] / (H * S));  // g_y / (H S)
  const A k0 = static_cast<A>(-(grad[2 * ch + 0] / (W * S)) * u - (grad[2 * ch + 1] / (H * S)) * v);
  for (long long m = threadIdx.x; m < H * W; m += kThreads) {
    const long long r = m / W, c = m - r * W;
    const A s = sigmoid(to_acc(base[r * sH + c * sW]));
    from_acc(s * (1 - s) * (a * static_cast<A>(c) + b * static_cast<A>(r) + k0), out + m);
  }
}

template <typename T>
void launch_fwd(const at::Tensor& x, at::Tensor& coords, at::Tensor& stats, cudaStream_t stream) {
  using A = typename Acc<T>::type;
  const long long B = x.size(0), K = x.size(1);
  heatmap_fwd_kernel<T><<<dim3(static_cast<unsigned>(B * K)), kThreads, 0, stream>>>(
      static_cast<const T*>(x.const_data_ptr()), K, x.size(2), x.size(3), x.stride(0), x.stride(1), x.stride(2),
      x.stride(3), static_cast<A*>(coords.mutable_data_ptr()), static_cast<A*>(stats.mutable_data_ptr()));
}

template <typename T>
void launch_bwd(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& stats, at::Tensor& gx,
                cudaStream_t stream) {
  using A = typename Acc<T>::type;
  const long long B = x.size(0), K = x.size(1);
  heatmap_bwd_kernel<T><<<dim3(static_cast<unsigned>(B * K)), kThreads, 0, stream>>>(
      static_cast<const A*>(grad.const_data_ptr()), static_cast<const T*>(x.const_data_ptr()),
      static_cast<const A*>(stats.const_data_ptr()), K, x.size(2), x.size(3), x.stride(0), x.stride(1),
      x.stride(2), x.stride(3), static_cast<T*>(gx.mutable_data_ptr()));
}

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, what, " (CUDA): ", cudaGetErrorString(err));
}

void check_grid(const at::Tensor& x, const char* what) {
  TORCH_CHECK(x.size(0) * x.size(1) <= 0x7fffffffLL, what, ": B*K = ", x.size(0) * x.size(1),
              " channels exceed the CUDA grid limit 2^31-1");
}

}  // namespace

namespace faceptor {
namespace {

std::tuple<at::Tensor, at::Tensor> heatmap_fwd_cuda(const at::Tensor& x) {
  check_logits(x);
  check_grid(x, "faceptor::heatmap_to_coords");
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
  auto opts = x.options().dtype(coords_dtype(x.scalar_type()));
  auto coords = at::empty({x.size(0), x.size(1), 2}, opts);
  auto stats = at::empty({x.size(0), x.size(1), 3}, opts);
  switch (x.scalar_type()) {
    case at::kFloat: launch_fwd<float>(x, coords, stats, stream); break;
    case at::kDouble: launch_fwd<double>(x, coords, stats, stream); break;
    case at::kHalf: launch_fwd<F16>(x, coords, stats, stream); break;
    default: launch_fwd<BF16>(x, coords, stats, stream); break;   // check_logits allows only these four
  }
  check_launch("faceptor::heatmap_to_coords");
  return {coords, stats};
}

at::Tensor heatmap_bwd_cuda(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& stats) {
  check_logits(x);
  check_backward_args(grad, x, stats);
  check_grid(x, "faceptor::heatmap_to_coords_bwd");
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
  const auto g = grad.contiguous();
  const auto st = stats.contiguous();
  auto gx = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  switch (x.scalar_type()) {
    case at::kFloat: launch_bwd<float>(g, x, st, gx, stream); break;
    case at::kDouble: launch_bwd<double>(g, x, st, gx, stream); break;
    case at::kHalf: launch_bwd<F16>(g, x, st, gx, stream); break;
    default: launch_bwd<BF16>(g, x, st, gx, stream); break;
  }
  check_launch("faceptor::heatmap_to_coords_bwd");
  return gx;
}

}  // namespace
}  // namespace faceptor

TORCH_LIBRARY_IMPL(faceptor, CUDA, m) {
  m.impl("heatmap_to_coords_fwd", &faceptor::heatmap_fwd_cuda);
  m.impl("heatmap_to_coords_bwd", &faceptor::heatmap_bwd_cuda);
}
