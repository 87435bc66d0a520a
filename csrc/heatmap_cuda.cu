// Heatmap -> coordinates, CUDA kernels (docs/design.md sections 4 and 10; the "normalising channel k" of eq. 9).
// Same math and outputs as heatmap_cpu.cpp. Plain extern "C" launch API on a caller-given stream (torch's current
// stream, passed from Python as an integer); includes only the CUDA runtime, no torch headers.
//
// Forward: one block per (b, k) channel; each thread sums sigmoid, sigmoid*col, sigmoid*row over a strided slice
// of the pixels in fp32 (fp64 for fp64 input), the block reduces the three sums in double (warp shuffles, then
// shared memory), thread 0 writes coords (fp32/fp64) and stats (S flagged negative when clamped, u, v).
// Backward: one block per channel, grad_m = s(1-s) (a col + b row + k0), written in the input dtype.
#include <cuda_runtime.h>  // the only include: plain integer types below (long long = int64_t on LP64)

namespace {

constexpr int kThreads = 256;

// dtype codes (faceptor_ops.cpp): 0 fp32, 1 fp64, 2 fp16, 3 bf16. Half types are handled as raw 16-bit values.
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
int launch_fwd(const void* x, long long B, long long K, long long H, long long W, long long sB, long long sK, long long sH,
               long long sW, void* coords, void* stats, cudaStream_t stream) {
  using A = typename Acc<T>::type;
  heatmap_fwd_kernel<T><<<dim3(static_cast<unsigned>(B * K)), kThreads, 0, stream>>>(
      static_cast<const T*>(x), K, H, W, sB, sK, sH, sW, static_cast<A*>(coords), static_cast<A*>(stats));
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int launch_bwd(const void* grad, const void* x, const void* stats, long long B, long long K, long long H, long long W,
               long long sB, long long sK, long long sH, long long sW, void* gx, cudaStream_t stream) {
  using A = typename Acc<T>::type;
  heatmap_bwd_kernel<T><<<dim3(static_cast<unsigned>(B * K)), kThreads, 0, stream>>>(
      static_cast<const A*>(grad), static_cast<const T*>(x), static_cast<const A*>(stats), K, H, W, sB, sK, sH,
      sW, static_cast<T*>(gx));
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

extern "C" int faceptor_heatmap_fwd_cuda(int dtype, const void* x, long long B, long long K, long long H, long long W,
                                         long long sB, long long sK, long long sH, long long sW, void* coords,
                                         void* stats, void* stream) {
  if (B * K > 0x7fffffffLL) return static_cast<int>(cudaErrorInvalidConfiguration);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case 0: return launch_fwd<float>(x, B, K, H, W, sB, sK, sH, sW, coords, stats, s);
    case 1: return launch_fwd<double>(x, B, K, H, W, sB, sK, sH, sW, coords, stats, s);
    case 2: return launch_fwd<F16>(x, B, K, H, W, sB, sK, sH, sW, coords, stats, s);
    case 3: return launch_fwd<BF16>(x, B, K, H, W, sB, sK, sH, sW, coords, stats, s);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

extern "C" int faceptor_heatmap_bwd_cuda(int dtype, const void* grad, const void* x, const void* stats, long long B,
                                         long long K, long long H, long long W, long long sB, long long sK, long long sH,
                                         long long sW, void* gx, void* stream) {
  if (B * K > 0x7fffffffLL) return static_cast<int>(cudaErrorInvalidConfiguration);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case 0: return launch_bwd<float>(grad, x, stats, B, K, H, W, sB, sK, sH, sW, gx, s);
    case 1: return launch_bwd<double>(grad, x, stats, B, K, H, W, sB, sK, sH, sW, gx, s);
    case 2: return launch_bwd<F16>(grad, x, stats, B, K, H, W, sB, sK, sH, sW, gx, s);
    case 3: return launch_bwd<BF16>(grad, x, stats, B, K, H, W, sB, sK, sH, sW, gx, s);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

extern "C" const char* faceptor_cuda_error_string(int err) {
  return cudaGetErrorString(static_cast<cudaError_t>(err));
}
