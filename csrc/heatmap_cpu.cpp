// Heatmap -> coordinates, CPU kernel (SPEC §5, KERNELS.md §3; the "normalising channel k" of eq. 9).
//
//   s_m = sigmoid(x_m);  S = max(sum_m s_m, 1e-6)
//   u = sum_m s_m * col_m / S;  v = sum_m s_m * row_m / S
//   coords = ((u + 0.5) / W, (v + 0.5) / H)
//   dL/dx_m = s_m (1 - s_m) [ g_x (col_m - u) / (W S) + g_y (row_m - v) / (H S) ]   (clamped: drop -u, -v)
//
// One pass per channel, parallel over B*K channels. Rows are summed in the compute type (fp32, or fp64 for
// fp64 input) and the row sums are accumulated in double. The forward also returns per-channel stats
// (S, sign-flagged negative when the clamp is active; u; v) so the backward is one read of x and one write.
// fp16/bf16/strided rows are converted into a contiguous fp32 row buffer first. The fp32 row loops use AVX2+FMA
// when the CPU has them (checked once at load), a scalar loop otherwise.
#include "heatmap.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <type_traits>
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace faceptor {
namespace {

// exp(x) for float: Cephes-style range reduction + degree-6 polynomial (about 2 ulp). Inputs are clamped to
// [-87, 88] so 2^n stays in the normal range. Scalar version (tails, non-x86) and an AVX2 version below.
inline float exp_f32(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to the nearest integer
  const float t = x * 1.44269504088896341f + shifter;
  int32_t ti;
  std::memcpy(&ti, &t, 4);
  const int32_t n = ti - 0x4B400000;  // round(x * log2(e)); 0x4B400000 = bits of the shifter
  const float nf = t - shifter;
  float r = x - nf * 0.693359375f;    // x - n ln2, ln2 split into hi + lo
  r = r - nf * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t scale_bits = (n + 127) << 23;  // 2^n
  float scale;
  std::memcpy(&scale, &scale_bits, 4);
  return p * scale;
}

inline float sigmoid_c(float x) { return 1.0f / (1.0f + exp_f32(-x)); }
inline double sigmoid_c(double x) { return 1.0 / (1.0 + std::exp(-x)); }

// Stage 1 (forward): row sums sum_c s and sum_c s*c of one contiguous row (scalar / fp64 version).
template <typename A>
void row_sums_scalar(const A* x, int64_t W, A* out_s, A* out_sc) {
  A rs = 0, rc = 0;
  for (int64_t c = 0; c < W; ++c) {
    const A s = sigmoid_c(x[c]);
    rs += s;
    rc += s * static_cast<A>(c);
  }
  *out_s = rs;
  *out_sc = rc;
}

// Stage 2 (backward): g_c = s (1 - s) (a c + k) for one contiguous row (scalar / fp64 version).
template <typename A>
void row_grad_scalar(const A* x, int64_t W, int64_t c0, A a, A k, A* g) {
  for (int64_t c = c0; c < W; ++c) {
    const A s = sigmoid_c(x[c]);
    g[c] = s * (1 - s) * (a * static_cast<A>(c) + k);
  }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FACEPTOR_X86 1
#define AVX2_FN __attribute__((target("avx2,fma")))

AVX2_FN inline __m256 sigmoid8(__m256 x) {
  // exp(-x), same steps as exp_f32
  __m256 y = _mm256_sub_ps(_mm256_setzero_ps(), x);
  y = _mm256_min_ps(_mm256_max_ps(y, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
  const __m256 shifter = _mm256_set1_ps(12582912.0f);
  const __m256 t = _mm256_fmadd_ps(y, _mm256_set1_ps(1.44269504088896341f), shifter);
  const __m256i n = _mm256_sub_epi32(_mm256_castps_si256(t), _mm256_set1_epi32(0x4B400000));
  const __m256 nf = _mm256_sub_ps(t, shifter);
  __m256 r = _mm256_fnmadd_ps(nf, _mm256_set1_ps(0.693359375f), y);
  r = _mm256_fnmadd_ps(nf, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256 scale = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n, _mm256_set1_epi32(127)), 23));
  const __m256 den = _mm256_fmadd_ps(p, scale, _mm256_set1_ps(1.0f));        // 1 + exp(-x)
  // 1 / den: hardware reciprocal (12 bits) + one Newton step (~23 bits), cheaper than vdivps
  const __m256 r0 = _mm256_rcp_ps(den);
  return _mm256_mul_ps(r0, _mm256_fnmadd_ps(den, r0, _mm256_set1_ps(2.0f)));
}

AVX2_FN inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

AVX2_FN void row_sums_avx2(const float* x, int64_t W, float* out_s, float* out_sc) {
  __m256 rs = _mm256_setzero_ps(), rc = _mm256_setzero_ps();
  __m256 col = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
  int64_t c = 0;
  for (; c + 8 <= W; c += 8) {
    const __m256 s = sigmoid8(_mm256_loadu_ps(x + c));
    rs = _mm256_add_ps(rs, s);
    rc = _mm256_fmadd_ps(s, col, rc);
    col = _mm256_add_ps(col, _mm256_set1_ps(8.0f));
  }
  float ts = 0, tc = 0;
  for (; c < W; ++c) {
    const float s = sigmoid_c(x[c]);
    ts += s;
    tc += s * static_cast<float>(c);
  }
  *out_s = hsum8(rs) + ts;
  *out_sc = hsum8(rc) + tc;
}

AVX2_FN void row_grad_avx2(const float* x, int64_t W, float a, float k, float* g) {
  __m256 col = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256 va = _mm256_set1_ps(a), vk = _mm256_set1_ps(k), one = _mm256_set1_ps(1.0f);
  int64_t c = 0;
  for (; c + 8 <= W; c += 8) {
    const __m256 s = sigmoid8(_mm256_loadu_ps(x + c));
    const __m256 ds = _mm256_mul_ps(s, _mm256_sub_ps(one, s));  // sigmoid'
    _mm256_storeu_ps(g + c, _mm256_mul_ps(ds, _mm256_fmadd_ps(va, col, vk)));
    col = _mm256_add_ps(col, _mm256_set1_ps(8.0f));
  }
  row_grad_scalar<float>(x, W, c, a, k, g);
}

const bool kHaveAvx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
#define FACEPTOR_X86 0
#endif

template <typename A>
void row_sums(const A* x, int64_t W, A* out_s, A* out_sc) {
#if FACEPTOR_X86
  if constexpr (std::is_same_v<A, float>) {
    if (kHaveAvx2) return row_sums_avx2(x, W, out_s, out_sc);
  }
#endif
  row_sums_scalar<A>(x, W, out_s, out_sc);
}

template <typename A>
void row_grad(const A* x, int64_t W, A a, A k, A* g) {
#if FACEPTOR_X86
  if constexpr (std::is_same_v<A, float>) {
    if (kHaveAvx2) return row_grad_avx2(x, W, a, k, g);
  }
#endif
  row_grad_scalar<A>(x, W, 0, a, k, g);
}

// The compute type A: double for double input, float otherwise.
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

// Load row r of a channel into a contiguous A buffer unless it already is one.
template <typename T, typename A>
inline const A* load_row(const T* base, int64_t sW, int64_t W, A* buf) {
  if constexpr (std::is_same_v<T, A>) {
    if (sW == 1) return base;
  }
  for (int64_t c = 0; c < W; ++c) buf[c] = static_cast<A>(base[c * sW]);
  return buf;
}

template <typename T>
void forward_impl(const at::Tensor& x, at::Tensor& coords, at::Tensor& stats) {
  using A = typename Acc<T>::type;
  const int64_t B = x.size(0), K = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t sB = x.stride(0), sK = x.stride(1), sH = x.stride(2), sW = x.stride(3);
  const T* xp = x.const_data_ptr<T>();
  A* cp = coords.mutable_data_ptr<A>();  // [B, K, 2] contiguous
  A* st = stats.mutable_data_ptr<A>();   // [B, K, 3] contiguous
  at::parallel_for(0, B * K, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> buf(W);
    for (int64_t i = begin; i < end; ++i) {
      const T* ch = xp + (i / K) * sB + (i % K) * sK;
      double S = 0, Su = 0, Sv = 0;  // one channel's sums, in double
      for (int64_t r = 0; r < H; ++r) {
        A rs, rc;
        row_sums<A>(load_row<T, A>(ch + r * sH, sW, W, buf.data()), W, &rs, &rc);
        S += rs;
        Su += rc;
        Sv += static_cast<double>(rs) * r;
      }
      const bool clamped = S < 1e-6;
      const double Sc = clamped ? 1e-6 : S;
      const double u = Su / Sc, v = Sv / Sc;  // expected column / row in pixel indices
      cp[2 * i + 0] = static_cast<A>((u + 0.5) / W);
      cp[2 * i + 1] = static_cast<A>((v + 0.5) / H);
      st[3 * i + 0] = static_cast<A>(clamped ? -Sc : Sc);
      st[3 * i + 1] = static_cast<A>(u);
      st[3 * i + 2] = static_cast<A>(v);
    }
  });
}

template <typename T>
void backward_impl(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& stats, at::Tensor& gx) {
  using A = typename Acc<T>::type;
  const int64_t B = x.size(0), K = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t sB = x.stride(0), sK = x.stride(1), sH = x.stride(2), sW = x.stride(3);
  const T* xp = x.const_data_ptr<T>();
  const A* gp = grad.const_data_ptr<A>();  // [B, K, 2] contiguous
  const A* st = stats.const_data_ptr<A>();
  T* op = gx.mutable_data_ptr<T>();        // [B, K, H, W] contiguous
  at::parallel_for(0, B * K, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> buf(W), gbuf(W);
    for (int64_t i = begin; i < end; ++i) {
      const T* ch = xp + (i / K) * sB + (i % K) * sK;
      T* och = op + i * H * W;
      const double Sf = st[3 * i + 0];
      const bool clamped = Sf < 0;
      const double S = clamped ? -Sf : Sf;
      const double u = clamped ? 0.0 : st[3 * i + 1];  // clamp active: S does not depend on x
      const double v = clamped ? 0.0 : st[3 * i + 2];
      const double a = gp[2 * i + 0] / (W * S);        // g_x / (W S)
      const double b = gp[2 * i + 1] / (H * S);        // g_y / (H S)
      for (int64_t r = 0; r < H; ++r) {
        const A k = static_cast<A>(b * (r - v) - a * u);  // row constant of a (c - u) + b (r - v)
        const A* row = load_row<T, A>(ch + r * sH, sW, W, buf.data());
        if constexpr (std::is_same_v<T, A>) {
          row_grad<A>(row, W, static_cast<A>(a), k, och + r * W);
        } else {
          row_grad<A>(row, W, static_cast<A>(a), k, gbuf.data());
          for (int64_t c = 0; c < W; ++c) och[r * W + c] = static_cast<T>(gbuf[c]);
        }
      }
    }
  });
}

// The gradient is as large as the heatmap (285 MB at B=64, K=68, 128x128) and freshly mapped, so first-touch page
// faults cost more than the kernel. Ask for transparent huge pages on its untouched pages (what torch does with
// THP_MEM_ALLOC_ENABLE=1); harmless when THP is off.
void advise_huge_pages(at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t end = begin + t.nbytes();
  const uintptr_t a = (begin + kHuge - 1) & ~(kHuge - 1), b = end & ~(kHuge - 1);
  if (b > a) madvise(reinterpret_cast<void*>(a), b - a, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> heatmap_fwd_cpu(const at::Tensor& logits, int64_t stream) {
  (void)stream;
  check_logits(logits);
  const auto acc = coords_dtype(logits.scalar_type());
  auto opts = logits.options().dtype(acc);
  auto coords = at::empty({logits.size(0), logits.size(1), 2}, opts);
  auto stats = at::empty({logits.size(0), logits.size(1), 3}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "heatmap_fwd_cpu",
                                  [&] { forward_impl<scalar_t>(logits, coords, stats); });
  return {coords, stats};
}

at::Tensor heatmap_bwd_cpu(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& stats,
                           int64_t stream) {
  (void)stream;
  check_logits(logits);
  check_backward_args(grad, logits, stats);
  auto g = grad.contiguous();
  auto st = stats.contiguous();
  auto gx = at::empty(logits.sizes(), logits.options().memory_format(at::MemoryFormat::Contiguous));
  if (gx.nbytes() >= (size_t(8) << 20)) advise_huge_pages(gx);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "heatmap_bwd_cpu",
                                  [&] { backward_impl<scalar_t>(g, logits, st, gx); });
  return gx;
}

}  // namespace faceptor
