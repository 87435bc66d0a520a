// Heatmap -> coordinates, CPU kernel (docs/design.md sections 4 and 10; the "normalising channel k" of eq. 9).
//
//   s_m = sigmoid(x_m);  S = max(sum_m s_m, 1e-6)
//   u = sum_m s_m * col_m / S;  v = sum_m s_m * row_m / S
//   coords = ((u + 0.5) / W, (v + 0.5) / H)
//   dL/dx_m = s_m (1 - s_m) [ g_x (col_m - u) / (W S) + g_y (row_m - v) / (H S) ]   (clamped: drop -u, -v)
//
// One pass per channel, parallel over B*K channels. Each row adds its sigmoids into per-thread column sums (compute
// type: fp32, or fp64 for fp64 input) and returns its row sum; the row sums go straight into double S and Sv, and
// the column sums are folded into double Su every kColumnBlock rows. The forward also returns per-channel stats
// (S, sign-flagged negative when the clamp is active; u; v) so the backward is one read of x and one write.
// fp16/bf16/strided rows are converted into a contiguous fp32 row buffer first. The fp32 row loops use AVX-512 or
// AVX2+FMA when the CPU has them (checked once at load, function-level target attributes, so the module runs on
// any x86-64), a scalar loop otherwise.
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
#include <cstdlib>
#include <cstring>
#include <vector>
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace faceptor {
namespace {

// exp(x) for float: Cephes-style range reduction + degree-6 polynomial (about 2 ulp). Inputs are clamped to
// [-87, 88] so 2^n stays in the normal range. Scalar version (row tails without AVX-512, CPUs without AVX2).
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

// Forward row step: adds s_c = sigmoid(x_c) into the column sums cs[c] and returns the row sum (scalar / fp64).
template <typename A>
A row_accum_scalar(const A* x, int64_t W, int64_t c0, A* cs) {
  A rs = 0;
  for (int64_t c = c0; c < W; ++c) {
    const A s = sigmoid_c(x[c]);
    rs += s;
    cs[c] += s;
  }
  return rs;
}

// Stage 2 (backward): g_c = s (1 - s) (a c + k) for one contiguous row (scalar / fp64 version).
template <typename A>
void row_grad_scalar(const A* x, int64_t W, int64_t c0, A a, A k, A* g) {
  for (int64_t c = c0; c < W; ++c) {
    const A s = sigmoid_c(x[c]);
    g[c] = s * (1 - s) * (a * static_cast<A>(c) + k);
  }
}

// Vector sigmoid, s = 1 / (1 + e), e = exp(-x), x clamped to [-87, 87]:
//   m = round(-x N log2 e) (N = 8 with AVX2, 16 with AVX-512), n = floor(m / N), j = m - N n
//   e = 2^n 2^(j/N) exp(-q), q = x + m ln2 / N in [-ln2/(2N), ln2/(2N)] (ln2 split into hi + lo, m ln2_hi exact)
//   2^(j/N) comes from an N-entry table held in one register (vpermd), 2^n is added to its exponent bits, and
//   exp(-q) is a degree-3 polynomial (relative error 2.7e-8 for N = 8, 1.6e-9 for N = 16).
//   1 / (1 + e): hardware reciprocal (12 / 14 bits) + one Newton step r + r (1 - d r).
// The table entries are stored minus (j << shift) so that adding (m << shift) gives 2^(j/N) with 2^n in its
// exponent; the low bits of the rounding-shifter sum t are m, and t << shift drops the shifter's bits.
// Relative error of s about 2e-7 (float rounding of the ~15 steps).
int32_t exp2_table_bits(int j, int N, int shift) {
  const float v = static_cast<float>(std::exp2(static_cast<double>(j) / N));
  int32_t b;
  std::memcpy(&b, &v, 4);
  return b - (j << shift);
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FACEPTOR_X86 1
// GCC 12 reports its own AVX-512 intrinsics (built on _mm512_undefined_*) as using uninitialised values; a false
// positive, silenced for the vector code only.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#define AVX2_FN __attribute__((target("avx2,fma")))
#define AVX512_FN __attribute__((target("avx512f,avx2,fma")))

// minimax coefficients of exp(-q) = 1 - q + c2 q^2 - c3 q^3 on |q| <= ln2/16 (N = 8) and ln2/32 (N = 16)
constexpr float kC2x8 = 0.5000647902488708f, kC3x8 = 0.16664297878742218f;
constexpr float kC2x16 = 0.5000161528587341f, kC3x16 = 0.1666676551103592f;
constexpr float kShifter = 12582912.0f;  // 1.5 * 2^23
constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f, kLog2e = 1.44269504088896341f;

struct Tables {
  alignas(64) int32_t t8[8];
  alignas(64) int32_t t16[16];
  Tables() {
    for (int j = 0; j < 8; ++j) t8[j] = exp2_table_bits(j, 8, 20);
    for (int j = 0; j < 16; ++j) t16[j] = exp2_table_bits(j, 16, 19);
  }
};
const Tables kTables;

AVX2_FN inline __m256 sigmoid8(__m256 x, __m256i tab) {
  const __m256 xc = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(87.0f));
  const __m256 shifter = _mm256_set1_ps(kShifter);
  const __m256 t = _mm256_fnmadd_ps(xc, _mm256_set1_ps(8 * kLog2e), shifter);  // shifter + m
  const __m256 mf = _mm256_sub_ps(t, shifter);
  __m256 q = _mm256_fmadd_ps(mf, _mm256_set1_ps(kLn2Hi / 8), xc);
  q = _mm256_fmadd_ps(mf, _mm256_set1_ps(kLn2Lo / 8), q);
  __m256 p = _mm256_fnmadd_ps(_mm256_set1_ps(kC3x8), q, _mm256_set1_ps(kC2x8));
  p = _mm256_fmsub_ps(p, q, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, q, _mm256_set1_ps(1.0f));                                // exp(-q)
  const __m256i ti = _mm256_castps_si256(t);
  const __m256 scale = _mm256_castsi256_ps(
      _mm256_add_epi32(_mm256_permutevar8x32_epi32(tab, ti), _mm256_slli_epi32(ti, 20)));  // 2^(m/8)
  const __m256 den = _mm256_fmadd_ps(p, scale, _mm256_set1_ps(1.0f));
  const __m256 r0 = _mm256_rcp_ps(den);
  return _mm256_fmadd_ps(r0, _mm256_fnmadd_ps(den, r0, _mm256_set1_ps(1.0f)), r0);
}

AVX512_FN inline __m512 sigmoid16(__m512 x, __m512i tab) {
  const __m512 xc = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(87.0f));
  const __m512 shifter = _mm512_set1_ps(kShifter);
  const __m512 t = _mm512_fnmadd_ps(xc, _mm512_set1_ps(16 * kLog2e), shifter);  // shifter + m
  const __m512 mf = _mm512_sub_ps(t, shifter);
  __m512 q = _mm512_fmadd_ps(mf, _mm512_set1_ps(kLn2Hi / 16), xc);
  q = _mm512_fmadd_ps(mf, _mm512_set1_ps(kLn2Lo / 16), q);
  __m512 p = _mm512_fnmadd_ps(_mm512_set1_ps(kC3x16), q, _mm512_set1_ps(kC2x16));
  p = _mm512_fmsub_ps(p, q, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, q, _mm512_set1_ps(1.0f));                                 // exp(-q)
  const __m512i ti = _mm512_castps_si512(t);
  const __m512 scale = _mm512_castsi512_ps(
      _mm512_add_epi32(_mm512_permutexvar_epi32(ti, tab), _mm512_slli_epi32(ti, 19)));  // 2^(m/16)
  const __m512 den = _mm512_fmadd_ps(p, scale, _mm512_set1_ps(1.0f));
  const __m512 r0 = _mm512_rcp14_ps(den);
  return _mm512_fmadd_ps(r0, _mm512_fnmadd_ps(den, r0, _mm512_set1_ps(1.0f)), r0);
}

AVX2_FN inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

AVX2_FN float row_accum_avx2(const float* x, int64_t W, float* cs) {
  const __m256i tab = _mm256_load_si256(reinterpret_cast<const __m256i*>(kTables.t8));
  __m256 rs = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c + 8 <= W; c += 8) {
    const __m256 s = sigmoid8(_mm256_loadu_ps(x + c), tab);
    rs = _mm256_add_ps(rs, s);
    _mm256_storeu_ps(cs + c, _mm256_add_ps(_mm256_loadu_ps(cs + c), s));
  }
  return hsum8(rs) + row_accum_scalar<float>(x, W, c, cs);
}

// Row tail: masked loads never touch memory outside the row, and the masked-off lanes are zeroed after the sigmoid.
AVX512_FN float row_accum_avx512(const float* x, int64_t W, float* cs) {
  const __m512i tab = _mm512_load_si512(kTables.t16);
  __m512 rs = _mm512_setzero_ps();
  int64_t c = 0;
  for (; c + 16 <= W; c += 16) {
    const __m512 s = sigmoid16(_mm512_loadu_ps(x + c), tab);
    rs = _mm512_add_ps(rs, s);
    _mm512_storeu_ps(cs + c, _mm512_add_ps(_mm512_loadu_ps(cs + c), s));
  }
  if (c < W) {
    const __mmask16 m = static_cast<__mmask16>((1u << (W - c)) - 1);
    const __m512 s = _mm512_maskz_mov_ps(m, sigmoid16(_mm512_maskz_loadu_ps(m, x + c), tab));
    rs = _mm512_add_ps(rs, s);
    _mm512_mask_storeu_ps(cs + c, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, cs + c), s));
  }
  return _mm512_reduce_add_ps(rs);
}

AVX2_FN void row_grad_avx2(const float* x, int64_t W, float a, float k, float* g) {
  const __m256i tab = _mm256_load_si256(reinterpret_cast<const __m256i*>(kTables.t8));
  __m256 col = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256 va = _mm256_set1_ps(a), vk = _mm256_set1_ps(k), one = _mm256_set1_ps(1.0f);
  int64_t c = 0;
  for (; c + 8 <= W; c += 8) {
    const __m256 s = sigmoid8(_mm256_loadu_ps(x + c), tab);
    const __m256 ds = _mm256_mul_ps(s, _mm256_sub_ps(one, s));  // sigmoid'
    _mm256_storeu_ps(g + c, _mm256_mul_ps(ds, _mm256_fmadd_ps(va, col, vk)));
    col = _mm256_add_ps(col, _mm256_set1_ps(8.0f));
  }
  row_grad_scalar<float>(x, W, c, a, k, g);
}

AVX512_FN void row_grad_avx512(const float* x, int64_t W, float a, float k, float* g) {
  const __m512i tab = _mm512_load_si512(kTables.t16);
  __m512 col = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512 va = _mm512_set1_ps(a), vk = _mm512_set1_ps(k), one = _mm512_set1_ps(1.0f);
  int64_t c = 0;
  for (; c < W; c += 16) {
    const __mmask16 m = W - c >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (W - c)) - 1);
    const __m512 s = sigmoid16(_mm512_maskz_loadu_ps(m, x + c), tab);
    const __m512 ds = _mm512_mul_ps(s, _mm512_sub_ps(one, s));  // sigmoid'
    _mm512_mask_storeu_ps(g + c, m, _mm512_mul_ps(ds, _mm512_fmadd_ps(va, col, vk)));
    col = _mm512_add_ps(col, _mm512_set1_ps(16.0f));
  }
}

// The widest instruction set this CPU (and OS) supports, checked once at load. FACEPTOR_CPU_ISA=avx2 or =scalar
// caps it (the tests use this to run the narrower paths on wider CPUs).
enum class Isa { kScalar, kAvx2, kAvx512 };
Isa detect_isa() {
  __builtin_cpu_init();
  Isa isa = Isa::kScalar;
  if (__builtin_cpu_supports("avx512f")) {
    isa = Isa::kAvx512;
  } else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    isa = Isa::kAvx2;
  }
  const char* cap = std::getenv("FACEPTOR_CPU_ISA");
  if (cap != nullptr && std::strcmp(cap, "scalar") == 0) return Isa::kScalar;
  if (cap != nullptr && std::strcmp(cap, "avx2") == 0 && isa == Isa::kAvx512) return Isa::kAvx2;
  return isa;
}
const Isa kIsa = detect_isa();
#pragma GCC diagnostic pop
#else
#define FACEPTOR_X86 0
#endif

template <typename A>
A row_accum(const A* x, int64_t W, A* cs) {
#if FACEPTOR_X86
  if constexpr (std::is_same_v<A, float>) {
    if (kIsa == Isa::kAvx512) return row_accum_avx512(x, W, cs);
    if (kIsa == Isa::kAvx2) return row_accum_avx2(x, W, cs);
  }
#endif
  return row_accum_scalar<A>(x, W, 0, cs);
}

template <typename A>
void row_grad(const A* x, int64_t W, A a, A k, A* g) {
#if FACEPTOR_X86
  if constexpr (std::is_same_v<A, float>) {
    if (kIsa == Isa::kAvx512) return row_grad_avx512(x, W, a, k, g);
    if (kIsa == Isa::kAvx2) return row_grad_avx2(x, W, a, k, g);
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

// Column sums are kept in the compute type for this many rows, then folded into the double sum Su.
constexpr int64_t kColumnBlock = 32;

template <typename T>
void forward_impl(const at::Tensor& x, at::Tensor& coords, at::Tensor& stats) {
  using A = typename Acc<T>::type;
  const int64_t B = x.size(0), K = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t sB = x.stride(0), sK = x.stride(1), sH = x.stride(2), sW = x.stride(3);
  const T* xp = x.const_data_ptr<T>();
  A* cp = coords.mutable_data_ptr<A>();  // [B, K, 2] contiguous
  A* st = stats.mutable_data_ptr<A>();   // [B, K, 3] contiguous
  at::parallel_for(0, B * K, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> buf(W), cs(W, A(0));
    for (int64_t i = begin; i < end; ++i) {
      const T* ch = xp + (i / K) * sB + (i % K) * sK;
      double S = 0, Su = 0, Sv = 0;  // one channel's sums, in double
      for (int64_t r = 0; r < H; ++r) {
        const double rs = row_accum<A>(load_row<T, A>(ch + r * sH, sW, W, buf.data()), W, cs.data());
        S += rs;
        Sv += rs * r;
        if ((r + 1) % kColumnBlock == 0 || r + 1 == H) {  // column sums of the last block of rows -> Su
          for (int64_t c = 0; c < W; ++c) {
            Su += static_cast<double>(cs[c]) * c;
            cs[c] = 0;
          }
        }
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

std::tuple<at::Tensor, at::Tensor> heatmap_fwd_cpu(const at::Tensor& logits) {
  check_logits(logits);
  const auto acc = coords_dtype(logits.scalar_type());
  auto opts = logits.options().dtype(acc);
  auto coords = at::empty({logits.size(0), logits.size(1), 2}, opts);
  auto stats = at::empty({logits.size(0), logits.size(1), 3}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "heatmap_fwd_cpu",
                                  [&] { forward_impl<scalar_t>(logits, coords, stats); });
  return {coords, stats};
}

at::Tensor heatmap_bwd_cpu(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& stats) {
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
