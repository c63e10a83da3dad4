// CPU kernels for the few tokens of a decode step, where streaming the weights from memory is the whole cost:
// y[m, n] = x[m, :] . W[n, :], each weight row read once per step and used for every row of x that needs it:
//   gemv         one linear
//   moe_decode   a MoE layer: the experts the router picked (each expert's rows once for all of its tokens) and the
//                shared experts, both projections, SwiGLU and the router-weighted sum, in one call
//   mla_absorbed q_nope through W_UK, attention over the paged latent cache, back through W_UV, in one call
//   DecodeLayer  a whole decoder layer (norms, projections, RoPE, cache write, the two above, router) in one call
// One call per layer, because the torch ops between the products (sorting pairs by expert, gathers, the weighted
// sum, casts, norms) cost about as much as the products themselves in a decode step.
//
// Float weights (bf16, fp32): fp32 accumulation (vdpbf16ps for bf16, one 32-value pair-dot per instruction).
// int8 / int4 weights: the activations are quantized per block of 128 values to int8 (quantize_rows), and the dot
// runs on int8 with int32 accumulation (vpdpbusd, VNNI: unsigned x signed bytes). The unsigned side is the weight:
//   int8: w + 128 (one xor of the sign bit), corrected by 128 * sum(x_q) per block;
//   int4: the stored nibble q + 8 as it is, corrected by 8 * sum(x_q) per group.
// The corrections depend on x only (and, for int4, on the group's weight scale), so they are computed once per row
// of x (quantize_rows returns sx * sum(x_q) per block) and applied outside the inner loop.
// The int4 nibbles hold k = 2i (low) and 2i + 1 (high) of a group of 128; quantize_rows(interleave=True) stores
// each block of x as its 64 even values, then its 64 odd ones, so one load of 64 weight bytes pairs with two x loads.
//
// Threads: the weight rows of every product of a stage are handed out in guided grabs (run()); each thread streams
// long runs of consecutive rows, one row at a time (timed alone: 0.7-1.09 of a plain sum's read rate, lowest for int8;
// inside a decode step 55-85%). Without AVX-512 (BF16 + VNNI) the same functions run a portable scalar loop.
#include <torch/extension.h>
#include <pybind11/stl.h>
#include <ATen/Parallel.h>

#include <atomic>
#include <algorithm>
#include <cmath>
#include <numeric>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && defined(__AVX512BF16__)
#define MLA_AVX512 1
#include <immintrin.h>
#endif

namespace {

constexpr int64_t QB = 128;  // activation quantization block = int4 weight group
constexpr int64_t ROWS_PER_TASK = 16;
constexpr int64_t MIN_GRAB = 2;  // tasks a thread takes at least per grab in run()
constexpr int64_t MT = 4;  // rows of x sharing one pass over a weight row
constexpr int64_t MAX_KB = 256;  // int4 groups per row the kernels take (K <= 32768)
// How far ahead of its loads a row loop prefetches the weight stream (software prefetch, on top of the hardware's,
// which stops at each 4 KiB page). Paired decode steps on the 27-layer V2-Lite cut, Xeon with 2 cores: 0 / 1024 /
// 2048 / 4096 bytes gave bf16 245 / 228 / 225 / 252 ms, int4 91 / 81 / 81 / 83 (3072), int8 132 / 124 / 125 / 126.
constexpr int64_t PREFETCH = 2048;

using bf16 = at::BFloat16;

inline uint16_t bf16_bits(float v) {  // round to nearest even, as at::BFloat16
  const at::BFloat16 b(v);
  uint16_t r;
  std::memcpy(&r, &b, 2);
  return r;
}

inline float bf16_to_float(uint16_t v) {
  uint32_t u = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

#ifdef MLA_AVX512
inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }
inline __mmask64 tail_mask64(int64_t n) { return n >= 64 ? ~__mmask64(0) : ((__mmask64(1) << n) - 1); }
inline __mmask32 tail_mask32(int64_t n) { return n >= 32 ? ~__mmask32(0) : ((__mmask32(1) << n) - 1); }
inline __mmask16 tail_mask16(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }
#endif

// Dispatch on the float dtype of a tensor: fn(type tag).
template <typename F>
void float_dispatch(at::ScalarType st, F fn) {
  if (st == torch::kFloat32) fn(float());
  else if (st == torch::kBFloat16) fn(at::BFloat16());
  else if (st == torch::kFloat16) fn(at::Half());
  else TORCH_CHECK(false, "float32, bfloat16 or float16 expected");
}

// x (float32, bfloat16 or float16; a view of up to 3 dims with a contiguous last one, as q_nope is of q) as
// contiguous float32 values, read in place: for a few rows, cheaper than a torch op.
std::vector<float> values_f32(torch::Tensor x) {
  if (x.dim() < 1 || x.dim() > 3 || x.stride(-1) != 1) x = x.contiguous().view(-1);
  const int64_t n = x.dim(), A = n == 3 ? x.size(0) : 1, B = n >= 2 ? x.size(n - 2) : 1, C = x.size(n - 1);
  const int64_t sa = n == 3 ? x.stride(0) : 0, sb = n >= 2 ? x.stride(n - 2) : 0;
  std::vector<float> f(A * B * C);
  float_dispatch(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* p = x.data_ptr<T>();
    for (int64_t a = 0; a < A; ++a)
      for (int64_t b = 0; b < B; ++b)
        for (int64_t c = 0; c < C; ++c) f[(a * B + b) * C + c] = float(p[a * sa + b * sb + c]);
  });
  return f;
}

// float32 values into the contiguous float tensor out, converted to its dtype.
void store_f32(const float* v, torch::Tensor& out) {
  TORCH_CHECK(out.is_contiguous(), "out must be contiguous");
  float_dispatch(out.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    T* p = out.data_ptr<T>();
    for (int64_t i = 0; i < out.numel(); ++i) p[i] = T(v[i]);
  });
}

torch::Tensor tensor_from(const float* v, at::IntArrayRef shape, at::ScalarType st) {
  auto out = torch::empty(shape, torch::TensorOptions().dtype(st));
  store_f32(v, out);
  return out;
}

// Rows x [M, K] (row m at x + m * ldx) quantized per block of 128 into Q [M, KB * 128] (zero padded), S [M, KB] scales, C [M, KB] scale *
// sum of the block's integers; interleave: each block as its even-indexed values, then its odd ones. Values round
// to nearest, ties to even (the AVX-512 conversion's rounding, and nearbyint's).
void quantize_into(const float* x, int64_t M, int64_t K, int64_t ldx, bool interleave, int8_t* Q, float* S, float* C) {
  const int64_t KB = (K + QB - 1) / QB;
  for (int64_t i = 0; i < M * KB; ++i) {
    const int64_t m = i / KB, b = i % KB, k0 = b * QB, n = std::min(QB, K - k0);
    const float* xr = x + m * ldx + k0;
    int8_t* q = Q + m * KB * QB + k0;
#ifdef MLA_AVX512
    __m512 v[8], mx = _mm512_setzero_ps();
    for (int j = 0; j < 8; ++j) {
      const int64_t left = std::max<int64_t>(0, std::min<int64_t>(16, n - 16 * j));
      v[j] = _mm512_maskz_loadu_ps(__mmask16((1u << left) - 1), xr + 16 * j);
      mx = _mm512_max_ps(mx, _mm512_abs_ps(v[j]));
    }
    const float amax = _mm512_reduce_max_ps(mx);
    const float s = amax > 0.f ? amax / 127.f : 1.f;
    if (interleave) {  // 32 values at a time: their 16 even-indexed ones to the first half, the odd ones to the second
      const __m512i ev = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
      const __m512i od = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
      __m512 w[8];
      for (int j = 0; j < 4; ++j) {
        w[j] = _mm512_permutex2var_ps(v[2 * j], ev, v[2 * j + 1]);
        w[4 + j] = _mm512_permutex2var_ps(v[2 * j], od, v[2 * j + 1]);
      }
      std::copy(w, w + 8, v);
    }
    const __m512 inv = _mm512_set1_ps(1.f / s);
    __m512i sum = _mm512_setzero_si512();
    for (int j = 0; j < 8; ++j) {
      const __m512i qi = _mm512_cvtps_epi32(_mm512_mul_ps(v[j], inv));
      sum = _mm512_add_epi32(sum, qi);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16 * j), _mm512_cvtsepi32_epi8(qi));
    }
    S[i] = s;
    C[i] = s * float(_mm512_reduce_add_epi32(sum));
#else
    float amax = 0.f;
    for (int64_t j = 0; j < n; ++j) amax = std::max(amax, std::fabs(xr[j]));
    const float s = amax > 0.f ? amax / 127.f : 1.f, inv = 1.f / s;
    int8_t v[QB] = {};
    int32_t sum = 0;
    for (int64_t j = 0; j < n; ++j) {
      v[j] = int8_t(std::max(-127, std::min(127, int32_t(std::nearbyint(xr[j] * inv)))));
      sum += v[j];
    }
    if (interleave)
      for (int64_t j = 0; j < QB; ++j) q[(j % 2) * (QB / 2) + j / 2] = v[j];
    else
      std::memcpy(q, v, QB);
    S[i] = s;
    C[i] = s * float(sum);
#endif
  }
}

#ifdef MLA_AVX512
// 2^t for t <= 128 (below -126: about 0): 2^frac by its Taylor polynomial (|frac| <= 0.5, error < 2e-7), scaled by
// 2^round with scalef.
inline __m512 exp2_ps(__m512 t) {
  t = _mm512_max_ps(t, _mm512_set1_ps(-126.f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.540353e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// 16 bfloat16 values as float32 (a bf16 is the top half of a float32).
inline __m512 load_bf16(const uint16_t* p, __mmask16 mk = 0xFFFF) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mk, p)), 16));
}
#endif

// The stored forms of a weight the products read: kernels/weights.py's float tensors and QuantWeight layouts.
enum Kind { F32, BF16, Q8, Q4 };

// One weight [N, K], or a stack of G of them [G, N, K] (the routed experts of a layer), as raw rows.
struct WeightRef {
  Kind kind;
  const uint8_t* data;
  const float* scales;  // int8: [G, N]; int4: [G, N, KB]; float: none
  int64_t G, N, K, KB, row_bytes;
  const uint8_t* row(int64_t g, int64_t n) const { return data + (g * N + n) * row_bytes; }
};

// (weight, scales or None, K, int4) as kernels/cpu.py passes a weight: a float tensor, or a QuantWeight's tensors.
using WTuple = std::tuple<torch::Tensor, std::optional<torch::Tensor>, int64_t, bool>;

WeightRef weight_ref(const WTuple& t) {
  const auto& [w, scales, K, int4] = t;
  TORCH_CHECK((w.dim() == 2 || w.dim() == 3) && w.is_contiguous(), "weight must be contiguous [(groups,) N, ...]");
  const int64_t G = w.dim() == 3 ? w.size(0) : 1, N = w.size(-2), KB = (K + QB - 1) / QB;
  WeightRef W{F32, static_cast<const uint8_t*>(w.data_ptr()), nullptr, G, N, K, KB, 0};
  if (!scales) {
    TORCH_CHECK(w.scalar_type() == torch::kBFloat16 || w.scalar_type() == torch::kFloat32, "w must be bf16 or fp32");
    TORCH_CHECK(w.size(-1) == K, "float weight [(G,) N, K]");
    W.kind = w.scalar_type() == torch::kBFloat16 ? BF16 : F32;
    W.row_bytes = K * w.element_size();
    return W;
  }
  TORCH_CHECK(scales->is_contiguous() && scales->scalar_type() == torch::kFloat32 && scales->numel() == G * N * (int4 ? KB : 1),
              int4 ? "int4 scales [G, N, Kp/128]" : "int8 scales [G, N]");
  TORCH_CHECK(int4 ? w.scalar_type() == torch::kUInt8 && w.size(-1) == KB * QB / 2
                   : w.scalar_type() == torch::kInt8 && w.size(-1) == K,
              int4 ? "int4 qweight [G, N, Kp/2]" : "int8 qweight [G, N, K]");
  TORCH_CHECK(!int4 || KB <= MAX_KB, "int4 weights take K <= ", MAX_KB * QB);
  W.kind = int4 ? Q4 : Q8;
  W.scales = scales->data_ptr<float>();
  W.row_bytes = w.size(-1);
  return W;
}

// Rows of activations x [M, K] (row m at x + m * ldx) in the form one kind of weight reads, prepared once for every
// weight row: float32 or bf16 values, or (int8 / int4) int8 blocks of 128 with their scales, sx * sum per block,
// and int8's correction 128 * sum_b sx * sum per row (int4: each block interleaved).
struct Acts {
  int64_t KB, ld;  // blocks of 128 per row; the row stride of the prepared values
  std::vector<float> f, sx, sxsum, corr;
  std::vector<uint16_t> h;
  std::vector<int8_t> q;

  Acts(Kind kind, const float* x, int64_t M, int64_t K, int64_t ldx) : KB((K + QB - 1) / QB), ld(K) {
    if (kind == F32) {
      f.resize(M * K);
      for (int64_t m = 0; m < M; ++m) std::copy(x + m * ldx, x + m * ldx + K, f.data() + m * K);
    } else if (kind == BF16) {
      h.resize(M * K);
      for (int64_t m = 0; m < M; ++m) {
        const float* xr = x + m * ldx;
        uint16_t* hr = h.data() + m * K;
        int64_t i = 0;
#ifdef MLA_AVX512
        for (; i + 16 <= K; i += 16)  // round to nearest even, as at::BFloat16 does
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(hr + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(xr + i)));
#endif
        for (; i < K; ++i) hr[i] = bf16_bits(xr[i]);
      }
    } else {
      ld = KB * QB;
      q.resize(M * ld);
      sx.resize(M * KB);
      sxsum.resize(M * KB);
      quantize_into(x, M, K, ldx, kind == Q4, q.data(), sx.data(), sxsum.data());
      corr.assign(M, 0.f);
      for (int64_t m = 0; m < M; ++m)
        for (int64_t b = 0; b < KB; ++b) corr[m] += 128.f * sxsum[m * KB + b];
    }
  }
};

}  // namespace

// x [M, K] -> (xq int8 [M, KB * 128], sx float32 [M, KB], sx * sum(xq) float32 [M, KB]): what the int8 / int4
// products read.
std::vector<torch::Tensor> quantize_rows(torch::Tensor x, bool interleave) {
  TORCH_CHECK(x.dim() == 2, "x must be [M, K]");
  const int64_t M = x.size(0), K = x.size(1), KB = (K + QB - 1) / QB;
  auto xq = torch::empty({M, KB * QB}, torch::kInt8);
  auto sx = torch::empty({M, KB}, torch::kFloat32);
  auto sxsum = torch::empty({M, KB}, torch::kFloat32);
  quantize_into(values_f32(x).data(), M, K, K, interleave, xq.data_ptr<int8_t>(), sx.data_ptr<float>(),
                sxsum.data_ptr<float>());
  return {xq, sx, sxsum};
}

#ifdef MLA_AVX512
// One weight row against C rows of x (C in 1..4), out[c] = x_c . w. One row at a time keeps each thread's reads a
// single sequential stream, which the hardware prefetcher follows at the full read rate (tiles of 4 weight rows,
// four short interleaved streams, ran at 40-85% of it). Two accumulators per row of x, for the even and the odd
// step along K, so that consecutive multiply-adds do not wait on each other.
template <int C>
void row_bf16(const uint16_t* w, const uint16_t* x, int64_t ldx, int64_t K, float* out) {
  __m512 acc[C][2];
  for (int c = 0; c < C; ++c) acc[c][0] = acc[c][1] = _mm512_setzero_ps();
  int64_t k = 0;
  const char* pf = (const char*)w + PREFETCH;
  for (; k + 64 <= K; k += 64) {
    _mm_prefetch(pf + 2 * k, _MM_HINT_T0), _mm_prefetch(pf + 2 * k + 64, _MM_HINT_T0);
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(w + k), w1 = (__m512bh)_mm512_loadu_si512(w + k + 32);
    for (int c = 0; c < C; ++c) {
      acc[c][0] = _mm512_dpbf16_ps(acc[c][0], w0, (__m512bh)_mm512_loadu_si512(x + c * ldx + k));
      acc[c][1] = _mm512_dpbf16_ps(acc[c][1], w1, (__m512bh)_mm512_loadu_si512(x + c * ldx + k + 32));
    }
  }
  for (; k < K; k += 32) {
    const __mmask32 mk = tail_mask32(K - k);
    const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(mk, w + k);
    for (int c = 0; c < C; ++c)
      acc[c][0] = _mm512_dpbf16_ps(acc[c][0], wv, (__m512bh)_mm512_maskz_loadu_epi16(mk, x + c * ldx + k));
  }
  for (int c = 0; c < C; ++c) out[c] = hsum(_mm512_add_ps(acc[c][0], acc[c][1]));
}

template <int C>
void row_f32(const float* w, const float* x, int64_t ldx, int64_t K, float* out) {
  __m512 acc[C][2];
  for (int c = 0; c < C; ++c) acc[c][0] = acc[c][1] = _mm512_setzero_ps();
  int64_t k = 0;
  const char* pf = (const char*)w + PREFETCH;
  for (; k + 32 <= K; k += 32) {
    _mm_prefetch(pf + 4 * k, _MM_HINT_T0), _mm_prefetch(pf + 4 * k + 64, _MM_HINT_T0);
    const __m512 w0 = _mm512_loadu_ps(w + k), w1 = _mm512_loadu_ps(w + k + 16);
    for (int c = 0; c < C; ++c) {
      acc[c][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + c * ldx + k), acc[c][0]);
      acc[c][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + c * ldx + k + 16), acc[c][1]);
    }
  }
  for (; k < K; k += 16) {
    const __mmask16 mk = tail_mask16(K - k);
    const __m512 wv = _mm512_maskz_loadu_ps(mk, w + k);
    for (int c = 0; c < C; ++c) acc[c][0] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(mk, x + c * ldx + k), acc[c][0]);
  }
  for (int c = 0; c < C; ++c) out[c] = hsum(_mm512_add_ps(acc[c][0], acc[c][1]));
}

// An int8 row (K bytes; its scale is applied by the caller): sum_b sx[c, b] * (w + 128) . xq_c over each block b of
// 128; the caller subtracts the 128 * sum correction. Two blocks per step, each with its own accumulator.
template <int C>
void row_q8(const uint8_t* w, const int8_t* x, int64_t ldx, const float* sx, int64_t KB, int64_t K, float* out) {
  const __m512i sign = _mm512_set1_epi8(char(0x80));
  __m512 acc[C][2];
  for (int c = 0; c < C; ++c) acc[c][0] = acc[c][1] = _mm512_setzero_ps();
  auto block = [&](int64_t b, int u) __attribute__((always_inline)) {
    const int64_t k0 = b * QB;
    _mm_prefetch((const char*)w + PREFETCH + k0, _MM_HINT_T0);
    _mm_prefetch((const char*)w + PREFETCH + k0 + 64, _MM_HINT_T0);
    __m512i w0, w1;
    if (k0 + QB <= K) {
      w0 = _mm512_xor_si512(_mm512_loadu_si512(w + k0), sign);
      w1 = _mm512_xor_si512(_mm512_loadu_si512(w + k0 + 64), sign);
    } else {
      w0 = _mm512_xor_si512(_mm512_maskz_loadu_epi8(tail_mask64(K - k0), w + k0), sign);
      w1 = _mm512_xor_si512(_mm512_maskz_loadu_epi8(K - k0 > 64 ? tail_mask64(K - k0 - 64) : 0, w + k0 + 64), sign);
    }
    for (int c = 0; c < C; ++c) {
      const __m512i d = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), w0, _mm512_loadu_si512(x + c * ldx + k0)),
                                            w1, _mm512_loadu_si512(x + c * ldx + k0 + 64));
      acc[c][u] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_set1_ps(sx[c * KB + b]), acc[c][u]);
    }
  };
  int64_t b = 0;
  for (; b + 2 <= KB; b += 2) block(b, 0), block(b + 1, 1);
  if (b < KB) block(b, 0);
  for (int c = 0; c < C; ++c) out[c] = hsum(_mm512_add_ps(acc[c][0], acc[c][1]));
}

// An int4 row (64 bytes per group of 128, scales ws[b]): the full dot, corrections included. Per row, the products
// of the weight's and x's scales (sc) and the +8 offset's correction are computed 16 groups at a time, so the
// inner loop multiplies each group's integer dot by one broadcast scale; two groups per step, each with its own
// accumulator. (Computing those per group in the loop ran at 19 GB/s per core with the row in L2.)
template <int C>
void row_q4(const uint8_t* w, const float* ws, const int8_t* x, int64_t ldx, const float* sx, const float* sxsum,
            int64_t KB, float* out) {
  const __m512i low = _mm512_set1_epi8(0x0F);
  alignas(64) float sc[C][MAX_KB];
  float corr[C];
  for (int c = 0; c < C; ++c) {
    __m512 cv = _mm512_setzero_ps();
    for (int64_t b = 0; b < KB; b += 16) {
      const __mmask16 mk = tail_mask16(KB - b);
      const __m512 wv = _mm512_maskz_loadu_ps(mk, ws + b);
      _mm512_mask_storeu_ps(sc[c] + b, mk, _mm512_mul_ps(wv, _mm512_maskz_loadu_ps(mk, sx + c * KB + b)));
      cv = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(mk, sxsum + c * KB + b), cv);
    }
    corr[c] = 8.f * hsum(cv);
  }
  __m512 acc[C][2];
  for (int c = 0; c < C; ++c) acc[c][0] = acc[c][1] = _mm512_setzero_ps();
  auto block = [&](int64_t b, int u) __attribute__((always_inline)) {
    _mm_prefetch((const char*)w + PREFETCH + b * 64, _MM_HINT_T0);
    const __m512i v = _mm512_loadu_si512(w + b * 64);
    const __m512i lo = _mm512_and_si512(v, low), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
    for (int c = 0; c < C; ++c) {
      const int8_t* xb = x + c * ldx + b * QB;
      const __m512i d = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(xb)),
                                            hi, _mm512_loadu_si512(xb + 64));
      acc[c][u] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_set1_ps(sc[c][b]), acc[c][u]);
    }
  };
  int64_t b = 0;
  for (; b + 2 <= KB; b += 2) block(b, 0), block(b + 1, 1);
  if (b < KB) block(b, 0);
  for (int c = 0; c < C; ++c) out[c] = hsum(_mm512_add_ps(acc[c][0], acc[c][1])) - corr[c];
}
#endif

// Calls CALL(C) with C, the rows of x of this pass, as a compile-time constant.
#define MLA_DISPATCH_C(C, CALL) \
  switch (C) {                  \
    case 1: CALL(1); break;     \
    case 2: CALL(2); break;     \
    case 3: CALL(3); break;     \
    default: CALL(4); break;    \
  }

namespace {

// o[c] = x_{m + c} . W_g[n] for c < C (C <= MT): one pass over the weight row for C rows of x.
void dot_rows(const WeightRef& W, const Acts& A, int64_t g, int64_t n, int64_t m, int64_t C, float* o) {
  const uint8_t* wr = W.row(g, n);
#ifdef MLA_AVX512
#define MLA_CALL(C_)                                                                                          \
  switch (W.kind) {                                                                                           \
    case F32: row_f32<C_>((const float*)wr, A.f.data() + m * A.ld, A.ld, W.K, o); break;                      \
    case BF16: row_bf16<C_>((const uint16_t*)wr, A.h.data() + m * A.ld, A.ld, W.K, o); break;                 \
    case Q8: row_q8<C_>(wr, A.q.data() + m * A.ld, A.ld, A.sx.data() + m * A.KB, A.KB, W.K, o); break;        \
    case Q4:                                                                                                  \
      row_q4<C_>(wr, W.scales + (g * W.N + n) * W.KB, A.q.data() + m * A.ld, A.ld, A.sx.data() + m * A.KB,   \
                 A.sxsum.data() + m * A.KB, A.KB, o);                                                         \
      break;                                                                                                  \
  }
  MLA_DISPATCH_C(C, MLA_CALL)
#undef MLA_CALL
#else
  for (int64_t c = 0; c < C; ++c) {
    const int64_t r = m + c;
    float s = 0.f;
    if (W.kind == F32 || W.kind == BF16) {
      for (int64_t k = 0; k < W.K; ++k)
        s += W.kind == F32 ? ((const float*)wr)[k] * A.f[r * A.ld + k]
                           : bf16_to_float(((const uint16_t*)wr)[k]) * bf16_to_float(A.h[r * A.ld + k]);
    } else {
      const int8_t* xr = A.q.data() + r * A.ld;
      for (int64_t b = 0; b < A.KB; ++b) {
        int32_t d = 0;
        if (W.kind == Q4) {
          for (int64_t j = 0; j < 64; ++j) {
            const uint8_t byte = wr[b * 64 + j];
            d += (int32_t(byte & 0xF) - 8) * xr[b * QB + j] + (int32_t(byte >> 4) - 8) * xr[b * QB + 64 + j];
          }
          s += W.scales[(g * W.N + n) * W.KB + b] * A.sx[r * A.KB + b] * float(d);
        } else {
          for (int64_t k = b * QB; k < std::min(W.K, (b + 1) * QB); ++k) d += int32_t(int8_t(wr[k])) * xr[k];
          s += A.sx[r * A.KB + b] * float(d);
        }
      }
      if (W.kind == Q8) s += A.corr[r];  // the int8 sums carry + corr, as the AVX-512 path's do
    }
    o[c] = s;
  }
#endif
  if (W.kind == Q8) {
    const float ws = W.scales[g * W.N + n];
    for (int64_t c = 0; c < C; ++c) o[c] = ws * (o[c] - A.corr[m + c]);
  }
}

// One product: rows m0:m1 of A times weight g of W, into out[(m - m0) * ldo + n] (float32).
struct Job {
  const WeightRef* W;
  int64_t g;
  const Acts* A;
  int64_t m0, m1;
  float* out;
  int64_t ldo;
};

constexpr int64_t INLINE_BYTES = 128 << 10;  // weights read by one call below which waking the threads costs more

// Every job's weight rows, in parallel over tasks of ROWS_PER_TASK rows, each thread reading long runs of
// consecutive rows: sequential streams, which the hardware prefetcher follows.
void run(const std::vector<Job>& jobs) {
  std::vector<std::pair<int64_t, int64_t>> tasks;  // (job, first weight row)
  int64_t bytes = 0;
  for (size_t j = 0; j < jobs.size(); ++j) {
    if (jobs[j].m1 == jobs[j].m0) continue;
    for (int64_t n0 = 0; n0 < jobs[j].W->N; n0 += ROWS_PER_TASK) tasks.push_back({int64_t(j), n0});
    bytes += jobs[j].W->N * jobs[j].W->row_bytes;
  }
  const int64_t NT = int64_t(tasks.size());
  auto task = [&](int64_t t) {
    const Job& jb = jobs[tasks[t].first];
    const int64_t n0 = tasks[t].second, n1 = std::min(jb.W->N, n0 + ROWS_PER_TASK);
    for (int64_t m = jb.m0; m < jb.m1; m += MT) {
      const int64_t C = std::min(MT, jb.m1 - m);
      for (int64_t n = n0; n < n1; ++n) {
        float o[MT];
        dot_rows(*jb.W, *jb.A, jb.g, n, m, C, o);
        for (int64_t c = 0; c < C; ++c) jb.out[(m - jb.m0 + c) * jb.ldo + n] = o[c];
      }
    }
  };
  if (bytes < INLINE_BYTES) {
    for (int64_t t = 0; t < NT; ++t) task(t);
    return;
  }
  // Guided scheduling: each grab takes half of the remaining tasks' share of a thread (at least MIN_GRAB), so a
  // thread's reads stay long sequential runs while the last small grabs even out a core that ran slower (this
  // machine's cores do not run at one speed; a static split waits for the slower one: the decode step ran 5% faster,
  // paired runs in one process).
  const int64_t nth = at::get_num_threads();
  std::atomic<int64_t> next{0};
  at::parallel_for(0, nth, 1, [&](int64_t, int64_t) {
    for (int64_t t0 = next.load(), c;; t0 = next.load()) {
      do {
        const int64_t left = NT - t0;
        if (left <= 0) return;
        c = std::min(left, std::max(MIN_GRAB, left / (2 * nth)));
      } while (!next.compare_exchange_weak(t0, t0 + c));
      for (int64_t t = t0; t < t0 + c; ++t) task(t);
    }
  });
}

// SwiGLU's middle in float32, in place: row r of h [P, 2I] (gate | up) -> its first I values = silu(gate) * up.
void swiglu_rows(float* h, int64_t P, int64_t I) {
  for (int64_t r = 0; r < P; ++r) {
    float* g = h + r * 2 * I;
    const float* u = g + I;
    int64_t i = 0;
#ifdef MLA_AVX512
    const __m512 nl2e = _mm512_set1_ps(-1.4426950408889634f), one = _mm512_set1_ps(1.f);
    for (; i + 16 <= I; i += 16) {
      const __m512 gv = _mm512_loadu_ps(g + i);
      const __m512 sig = _mm512_div_ps(one, _mm512_add_ps(one, exp2_ps(_mm512_mul_ps(gv, nl2e))));
      _mm512_storeu_ps(g + i, _mm512_mul_ps(_mm512_mul_ps(gv, sig), _mm512_loadu_ps(u + i)));
    }
#endif
    for (; i < I; ++i) g[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
  }
}

}  // namespace

// out [M, N] = x @ W.T for one weight w (a float tensor [N, K] or a quantized one, see WTuple); x [M, K] any float
// dtype; out any float dtype.
void gemv(torch::Tensor x, WTuple w, torch::Tensor out) {
  const WeightRef W = weight_ref(w);
  const int64_t M = x.size(0), N = W.N, K = W.K;
  TORCH_CHECK(W.G == 1 && x.dim() == 2 && x.size(1) == K, "gemv: x [M, K], one weight [N, K]");
  TORCH_CHECK(out.is_contiguous() && out.numel() == M * N && out.is_floating_point(), "out must be contiguous [M, N]");
  const Acts A(W.kind, values_f32(x).data(), M, K, K);
  std::vector<float> y(M * N, NAN);  // NaN: a product left unwritten shows
  run({{&W, 0, &A, 0, M, y.data(), N}});
  store_f32(y.data(), out);
}

// A MoE layer's experts for a few tokens x [T, D] in one call: the routed ones the router picked (ids [T, k] int64,
// weights topw [T, k] float32) and the shared ones, if any:
//   out[t] = sum_j topw[t, j] * w2_e @ swiglu(w13_e @ x_t)  (e = ids[t, j])  +  s2 @ swiglu(s13 @ x_t)
// w13 [E, 2I, D] (gate rows, then up rows), w2 [E, D, I]; s13 [2Is, D], s2 [D, Is]; float or quantized alike.
// Each expert's rows are read once for all of its tokens, and both stages of every expert run in one parallel
// pass each; float32 from the first product to the sum, returned in x's dtype.
torch::Tensor moe_decode(torch::Tensor x, torch::Tensor ids, torch::Tensor topw, WTuple w13, WTuple w2,
                         std::optional<WTuple> s13, std::optional<WTuple> s2) {
  const WeightRef W13 = weight_ref(w13), W2 = weight_ref(w2);
  const int64_t T = x.size(0), D = x.size(1), k = ids.size(1), E = W13.G, I = W13.N / 2, P = T * k;
  TORCH_CHECK(x.dim() == 2 && W13.K == D && W13.N % 2 == 0 && W2.G == E && W2.N == D && W2.K == I,
              "moe_decode: x [T, D], w13 [E, 2I, D], w2 [E, D, I]");
  TORCH_CHECK(ids.dim() == 2 && ids.size(0) == T && ids.scalar_type() == torch::kInt64 && ids.is_contiguous() &&
                  topw.sizes() == ids.sizes() && topw.scalar_type() == torch::kFloat32 && topw.is_contiguous(),
              "moe_decode: ids int64 [T, k], topw float32 [T, k]");
  TORCH_CHECK(s13.has_value() == s2.has_value(), "moe_decode: both shared weights or neither");
  // the (token, expert) pairs in expert order: pair p = t * k + j is product row row_of[p]
  const int64_t* ID = ids.data_ptr<int64_t>();
  std::vector<int64_t> start(E + 1, 0), row_of(P);
  for (int64_t p = 0; p < P; ++p) {
    TORCH_CHECK(ID[p] >= 0 && ID[p] < E, "moe_decode: expert id out of range");
    ++start[ID[p] + 1];
  }
  for (int64_t e = 0; e < E; ++e) start[e + 1] += start[e];
  std::vector<int64_t> next(start.begin(), start.end() - 1);
  const std::vector<float> xf = values_f32(x);
  std::vector<float> xs(P * D);
  for (int64_t p = 0; p < P; ++p) {
    row_of[p] = next[ID[p]]++;
    std::memcpy(xs.data() + row_of[p] * D, xf.data() + (p / k) * D, D * 4);
  }
  std::optional<WeightRef> S13, S2;
  int64_t Is = 0;
  if (s13) {
    S13 = weight_ref(*s13), S2 = weight_ref(*s2), Is = S13->N / 2;
    TORCH_CHECK(S13->G == 1 && S13->K == D && S13->N % 2 == 0 && S2->G == 1 && S2->N == D && S2->K == Is,
                "moe_decode: shared weights [2Is, D] and [D, Is]");
  }
  // stage 1: h = w13 @ x per pair (and per token for the shared experts), then swiglu
  std::vector<float> h(P * 2 * I, NAN), hs(T * 2 * Is, NAN);  // NaN: a product left unwritten shows
  std::vector<Job> jobs;
  const Acts A1(W13.kind, xs.data(), P, D, D);
  for (int64_t e = 0; e < E; ++e) jobs.push_back({&W13, e, &A1, start[e], start[e + 1], h.data() + start[e] * 2 * I, 2 * I});
  std::optional<Acts> As1;
  if (s13) {
    As1.emplace(S13->kind, xf.data(), T, D, D);
    jobs.push_back({&*S13, 0, &*As1, 0, T, hs.data(), 2 * Is});
  }
  run(jobs);
  swiglu_rows(h.data(), P, I);
  swiglu_rows(hs.data(), T, Is);
  // stage 2: y = w2 @ swiglu per pair; the swiglu rows are the first halves of h's rows (row stride 2I)
  std::vector<float> y(P * D, NAN), ys(T * D, s13 ? NAN : 0.f);
  jobs.clear();
  const Acts A2(W2.kind, h.data(), P, I, 2 * I);
  for (int64_t e = 0; e < E; ++e) jobs.push_back({&W2, e, &A2, start[e], start[e + 1], y.data() + start[e] * D, D});
  std::optional<Acts> As2;
  if (s13) {
    As2.emplace(S2->kind, hs.data(), T, Is, 2 * Is);
    jobs.push_back({&*S2, 0, &*As2, 0, T, ys.data(), D});
  }
  run(jobs);
  // the router-weighted sum per token, plus the shared experts
  const float* TW = topw.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < k; ++j) {
      const float wt = TW[t * k + j], *yr = y.data() + row_of[t * k + j] * D;
      float* o = ys.data() + t * D;
      for (int64_t d = 0; d < D; ++d) o[d] += wt * yr[d];
    }
  return tensor_from(ys.data(), {T, D}, x.scalar_type());
}

// A quantized weight -> bfloat16 out [N, K]: the operand of the prefill GEMM, written one block of rows at a time
// into one buffer by the caller. int8: qweight [N, K], scales [N]; int4: qweight [N, Kp / 2], scales [N, Kp / 128].
void dequantize(torch::Tensor qweight, torch::Tensor scales, int64_t K, bool int4, torch::Tensor out) {
  TORCH_CHECK(qweight.dim() == 2 && qweight.is_contiguous() && scales.is_contiguous(), "qweight [N, ...]");
  const int64_t N = qweight.size(0), KB = (K + QB - 1) / QB, ldw = int4 ? KB * QB / 2 : K;
  TORCH_CHECK(qweight.size(1) == ldw && scales.size(0) == N && (!int4 || scales.size(1) == KB), "quantized shapes");
  TORCH_CHECK(out.scalar_type() == torch::kBFloat16 && out.is_contiguous() && out.numel() == N * K, "out bf16 [N, K]");
  const uint8_t* Q = reinterpret_cast<const uint8_t*>(qweight.data_ptr());
  const float* S = scales.data_ptr<float>();
  uint16_t* O = reinterpret_cast<uint16_t*>(out.data_ptr<bf16>());
  at::parallel_for(0, N, 8, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* q = Q + n * ldw;
      uint16_t* o = O + n * K;
      int64_t k = 0;
#ifdef MLA_AVX512
      if (int4) {  // 16 bytes -> 32 values: each byte's low nibble then its high one, packed as two bf16 per 32 bits
        for (; k + 32 <= K; k += 32) {
          const __m512 s = _mm512_set1_ps(S[n * KB + k / QB]);
          const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k / 2)));
          const __m512i eight = _mm512_set1_epi32(8);
          const __m512 lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(v, _mm512_set1_epi32(15)), eight)), s);
          const __m512 hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(v, 4), eight)), s);
          const __m512i lo16 = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(lo));
          const __m512i hi16 = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(hi));
          _mm512_storeu_si512(o + k, _mm512_or_si512(lo16, _mm512_slli_epi32(hi16, 16)));
        }
      } else {
        const __m512 s = _mm512_set1_ps(S[n]);
        for (; k + 16 <= K; k += 16) {
          const __m512i v = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k)));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + k),
                              (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_cvtepi32_ps(v), s)));
        }
      }
#endif
      for (; k < K; ++k) {
        const float v = int4 ? float(int32_t(k % 2 ? q[k / 2] >> 4 : q[k / 2] & 0xF) - 8) * S[n * KB + k / QB]
                             : float(int8_t(q[k])) * S[n];
        o[k] = bf16_bits(v);
      }
    }
  });
}

// ---- absorbed MLA attention over the paged latent cache (decode) -------------------------------------------------


namespace {

constexpr int64_t KEYS = 32;  // keys converted to float32 and scored at a time
constexpr int64_t MIN_KEYS_PER_SPLIT = 256;

// One cached token's [c_kv | k_pe] as float32 (a float cache row, or an int8 latent with its scale and k_pe in the
// model dtype).
struct KeyReader {
  const uint8_t* cache;
  const int32_t* tables;
  int64_t max_blocks, block_size, row_bytes, R, DR;
  int kind;  // 0 float32 cache, 1 bfloat16 cache, 2 packed int8 (k_pe bf16), 3 packed int8 (k_pe float32)

  const uint8_t* row(int64_t b, int64_t pos) const {
    return cache + (tables[b * max_blocks + pos / block_size] * block_size + pos % block_size) * row_bytes;
  }

  void read(int64_t b, int64_t pos, float* out) const {
    const uint8_t* row = this->row(b, pos);
    const int64_t W = R + DR;
    if (kind == 0) {
      std::memcpy(out, row, W * 4);
    } else if (kind == 1) {
      const uint16_t* v = reinterpret_cast<const uint16_t*>(row);
      for (int64_t d = 0; d < W; ++d) out[d] = bf16_to_float(v[d]);
    } else {
      const int8_t* q = reinterpret_cast<const int8_t*>(row);
      float s;
      std::memcpy(&s, row + R, 4);
      for (int64_t d = 0; d < R; ++d) out[d] = float(q[d]) * s;
      if (kind == 2) {
        const uint16_t* pe = reinterpret_cast<const uint16_t*>(row + R + 4);
        for (int64_t d = 0; d < DR; ++d) out[R + d] = bf16_to_float(pe[d]);
      } else {
        std::memcpy(out + R, row + R + 4, DR * 4);
      }
    }
  }
};

#ifdef MLA_AVX512
inline __m512bh bcast_pair(const void* p) {  // one 32-bit word (two bf16) in every lane
  int32_t v;
  std::memcpy(&v, p, 4);
  return (__m512bh)_mm512_set1_epi32(v);
}

// A bf16 cache read as it is stored, with bf16 pair dot products (vdpbf16ps: 32 multiply-adds per instruction,
// fp32 sums) and the operands held in registers; the fp32 path below needs two loads per 16 multiply-adds.
// Scores of nk keys (bf16 rows kp[j] of W values, W even) for heads hc..hc+15: S[j * HP + hc + h] = q_h . k_j, q
// given as bf16 pairs qT2[p * HP + h] = (q_h[2p], q_h[2p + 1]); four keys per pass over q.
void scores_bf16(const uint32_t* qT2, const uint16_t* const* kp, int64_t nk, int64_t W, int64_t HP, int64_t hc,
                 float* S) {
  int64_t j = 0;
  for (; j + 4 <= nk; j += 4) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t p = 0; p < W / 2; ++p) {
      const __m512bh q = (__m512bh)_mm512_loadu_si512(qT2 + p * HP + hc);
      a0 = _mm512_dpbf16_ps(a0, q, bcast_pair(kp[j] + 2 * p));
      a1 = _mm512_dpbf16_ps(a1, q, bcast_pair(kp[j + 1] + 2 * p));
      a2 = _mm512_dpbf16_ps(a2, q, bcast_pair(kp[j + 2] + 2 * p));
      a3 = _mm512_dpbf16_ps(a3, q, bcast_pair(kp[j + 3] + 2 * p));
    }
    _mm512_storeu_ps(S + j * HP + hc, a0);
    _mm512_storeu_ps(S + (j + 1) * HP + hc, a1);
    _mm512_storeu_ps(S + (j + 2) * HP + hc, a2);
    _mm512_storeu_ps(S + (j + 3) * HP + hc, a3);
  }
  for (; j < nk; ++j) {
    __m512 a0 = _mm512_setzero_ps();
    for (int64_t p = 0; p < W / 2; ++p)
      a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(qT2 + p * HP + hc), bcast_pair(kp[j] + 2 * p));
    _mm512_storeu_ps(S + j * HP + hc, a0);
  }
}

// acc[h] = acc[h] * alpha[h] + sum_j p_j[h] * c_kv_j (the first R values of key row j) for the H heads, with p given
// as bf16 pairs P2[jp * HP + h] = (p_2jp[h], p_2jp+1[h]). Per 16 values of R, two key rows are interleaved into one
// vector of pairs and 16 heads' sums are kept in registers.
void values_bf16(const uint32_t* P2, const uint16_t* const* kp, int64_t nk, int64_t H, int64_t HP, int64_t R,
                 const float* alpha, float* acc) {
  for (int64_t h0 = 0; h0 < H; h0 += 16) {
    const int64_t nh = std::min<int64_t>(16, H - h0);
    for (int64_t c = 0; c < R; c += 16) {
      const __mmask16 mk = tail_mask16(R - c);
      __m512 a[16];
      for (int u = 0; u < 16; ++u)
        a[u] = u < nh ? _mm512_mul_ps(_mm512_maskz_loadu_ps(mk, acc + (h0 + u) * R + c), _mm512_set1_ps(alpha[h0 + u]))
                      : _mm512_setzero_ps();
      for (int64_t j = 0; j < nk; j += 2) {
        const __m512i lo = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mk, kp[j] + c));
        const __m512i hi = j + 1 < nk ? _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mk, kp[j + 1] + c)), 16)
                                      : _mm512_setzero_si512();
        const __m512bh v = (__m512bh)_mm512_or_si512(lo, hi);
        const uint32_t* pp = P2 + (j / 2) * HP + h0;
        for (int u = 0; u < 16; ++u) a[u] = _mm512_dpbf16_ps(a[u], v, bcast_pair(pp + u));
      }
      for (int u = 0; u < 16; ++u)
        if (u < nh) _mm512_mask_storeu_ps(acc + (h0 + u) * R + c, mk, a[u]);
    }
  }
}
#endif

}  // namespace

// O [T, H, R] float32 = softmax(scale * (q_lat . c_kv + q_pe . k_pe)) . c_kv per head, each query token over its
// sequence's cached tokens up to its own position (kernels/reference.py mla_decode); Q [T, H, R + DR] float32 is
// [q_lat | q_pe]. kind: KeyReader's. A sequence's keys are cut into splits when there are fewer sequences than
// threads; each split keeps its own running max, sum and output (online softmax over blocks of KEYS keys), merged
// at the end.
void attend(const float* Q, int64_t T, int64_t H, int64_t R, int64_t DR, const torch::Tensor& cache,
            const torch::Tensor& block_tables, const torch::Tensor& cu_seqlens_q, const torch::Tensor& seq_lens,
            double scale, int64_t kind, float* O) {
  TORCH_CHECK(cache.dim() == 3 && cache.is_contiguous(), "the cache must be contiguous [blocks, block_size, width]");
  const int64_t W = R + DR, B = block_tables.size(0), HP = (H + 15) / 16 * 16;
  auto bt = block_tables.to(torch::kInt32).contiguous();
  auto cu = cu_seqlens_q.to(torch::kInt32).contiguous();
  auto lens = seq_lens.to(torch::kInt32).contiguous();
  const int32_t* CU = cu.data_ptr<int32_t>();
  const int32_t* LEN = lens.data_ptr<int32_t>();
  KeyReader kr{reinterpret_cast<const uint8_t*>(cache.data_ptr()), bt.data_ptr<int32_t>(), bt.size(1), cache.size(1),
               cache.size(2) * cache.element_size(), R, DR, int(kind)};
  // tasks: (sequence, key range); partial results in rows of (task, query of the sequence)
  struct Task { int64_t b, k0, k1, row; };
  std::vector<Task> tasks;
  std::vector<std::vector<int64_t>> task_rows(B);
  const int64_t threads = at::get_num_threads();
  int64_t rows = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t nq = CU[b + 1] - CU[b], L = LEN[b];
    if (nq == 0) continue;
    int64_t splits = std::max<int64_t>(1, std::min((L + MIN_KEYS_PER_SPLIT - 1) / MIN_KEYS_PER_SPLIT,
                                                   (2 * threads + B - 1) / B));
    const int64_t per = (L + splits - 1) / splits;
    for (int64_t k0 = 0; k0 < L; k0 += per) {
      task_rows[b].push_back(int64_t(tasks.size()));
      tasks.push_back({b, k0, std::min(L, k0 + per), rows});
      rows += nq;
    }
  }
  auto acc_part = torch::empty({rows, H, R}, torch::kFloat32);
  auto ml_part = torch::empty({rows, H, 2}, torch::kFloat32);
  float* ACC = acc_part.data_ptr<float>();
  float* ML = ml_part.data_ptr<float>();
  const float qscale = float(scale) * 1.4426950408889634f;  // scores in the log2 domain
#ifdef MLA_AVX512
  const bool pairs = kind == 1 && W % 2 == 0;  // a bf16 cache, read in place by bf16 pair products
#else
  const bool pairs = false;
#endif
  at::parallel_for(0, int64_t(tasks.size()), 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> qT(pairs ? 0 : W * HP), keys(pairs ? 0 : KEYS * W), S(KEYS * HP), m(HP), l(HP), alpha(HP);
    std::vector<uint32_t> qT2(pairs ? W / 2 * HP : 0), P2(pairs ? KEYS / 2 * HP : 0);
    std::vector<const uint16_t*> kp(KEYS);
    for (int64_t ti = i0; ti < i1; ++ti) {
      const Task& tk = tasks[ti];
      const int64_t q0 = CU[tk.b], nq = CU[tk.b + 1] - q0, start = LEN[tk.b] - nq;
      for (int64_t i = 0; i < nq; ++i) {
        // q transposed: qT[d][h] (or qT2[d / 2][h] as bf16 pairs), so one vector of heads multiplies each key value
        std::fill(qT.begin(), qT.end(), 0.f);
        std::fill(qT2.begin(), qT2.end(), 0u);
        for (int64_t h = 0; h < H; ++h)
          for (int64_t d = 0; d < W; ++d) {
            const float v = Q[((q0 + i) * H + h) * W + d] * qscale;
            if (pairs)
              qT2[d / 2 * HP + h] |= uint32_t(bf16_bits(v)) << (16 * (d % 2));
            else
              qT[d * HP + h] = v;
          }
        float* acc = ACC + (tk.row + i) * H * R;
        std::fill(acc, acc + H * R, 0.f);
        std::fill(m.begin(), m.end(), -INFINITY);
        std::fill(l.begin(), l.end(), 0.f);
        const int64_t kend = std::min(tk.k1, start + i + 1);  // causal: keys up to the query's position
        for (int64_t kb = tk.k0; kb < kend; kb += KEYS) {
          const int64_t nk = std::min(KEYS, kend - kb);
          for (int64_t j = 0; j < nk; ++j) {
            if (pairs)
              kp[j] = reinterpret_cast<const uint16_t*>(kr.row(tk.b, kb + j));
            else
              kr.read(tk.b, kb + j, keys.data() + j * W);
          }
#ifdef MLA_AVX512
          for (int64_t hc = 0; hc < HP; hc += 16) {
            if (pairs) {
              scores_bf16(qT2.data(), kp.data(), nk, W, HP, hc, S.data());
            } else {
              for (int64_t j = 0; j < nk; ++j) {
                const float* kj = keys.data() + j * W;
                __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
                int64_t d = 0;
                for (; d + 2 <= W; d += 2) {
                  s0 = _mm512_fmadd_ps(_mm512_loadu_ps(qT.data() + d * HP + hc), _mm512_set1_ps(kj[d]), s0);
                  s1 = _mm512_fmadd_ps(_mm512_loadu_ps(qT.data() + (d + 1) * HP + hc), _mm512_set1_ps(kj[d + 1]), s1);
                }
                if (d < W) s0 = _mm512_fmadd_ps(_mm512_loadu_ps(qT.data() + d * HP + hc), _mm512_set1_ps(kj[d]), s0);
                _mm512_storeu_ps(S.data() + j * HP + hc, _mm512_add_ps(s0, s1));
              }
            }
            // online softmax: the block's max, the old sums rescaled by alpha, S turned into probabilities
            const __m512 old = _mm512_loadu_ps(m.data() + hc);
            __m512 mx = old;
            for (int64_t j = 0; j < nk; ++j) mx = _mm512_max_ps(mx, _mm512_loadu_ps(S.data() + j * HP + hc));
            const __m512 a = exp2_ps(_mm512_sub_ps(old, mx));  // old = -inf: 0
            __m512 lv = _mm512_mul_ps(_mm512_loadu_ps(l.data() + hc), a);
            for (int64_t j = 0; j < nk; ++j) {
              const __m512 p = exp2_ps(_mm512_sub_ps(_mm512_loadu_ps(S.data() + j * HP + hc), mx));
              _mm512_storeu_ps(S.data() + j * HP + hc, p);
              lv = _mm512_add_ps(lv, p);
            }
            _mm512_storeu_ps(l.data() + hc, lv);
            _mm512_storeu_ps(m.data() + hc, mx);
            _mm512_storeu_ps(alpha.data() + hc, a);
          }
          if (pairs) {
            for (int64_t j = 0; j < nk; j += 2)
              for (int64_t h = 0; h < HP; ++h)
                P2[j / 2 * HP + h] = bf16_bits(S[j * HP + h]) | (j + 1 < nk ? uint32_t(bf16_bits(S[(j + 1) * HP + h])) << 16 : 0u);
            values_bf16(P2.data(), kp.data(), nk, H, HP, R, alpha.data(), acc);
            continue;
          }
          // acc[h] = acc[h] * alpha[h] + sum_j p[j][h] * c_kv_j, 16 latent values at a time
          for (int64_t h = 0; h < H; ++h) {
            const __m512 a = _mm512_set1_ps(alpha[h]);
            float* ah = acc + h * R;
            for (int64_t c = 0; c < R; c += 16) {
              const __mmask16 mk = tail_mask16(R - c);
              __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(mk, ah + c), a);
              for (int64_t j = 0; j < nk; ++j)
                v = _mm512_fmadd_ps(_mm512_set1_ps(S[j * HP + h]), _mm512_maskz_loadu_ps(mk, keys.data() + j * W + c), v);
              _mm512_mask_storeu_ps(ah + c, mk, v);
            }
          }
#else
          for (int64_t h = 0; h < H; ++h) {
            float mx = m[h];
            for (int64_t j = 0; j < nk; ++j) {
              float sv = 0.f;
              for (int64_t d = 0; d < W; ++d) sv += qT[d * HP + h] * keys[j * W + d];
              S[j * HP + h] = sv;
              mx = std::max(mx, sv);
            }
            const float a = std::exp2(m[h] - mx);
            l[h] *= a;
            for (int64_t j = 0; j < nk; ++j) {
              S[j * HP + h] = std::exp2(S[j * HP + h] - mx);
              l[h] += S[j * HP + h];
            }
            m[h] = mx;
            for (int64_t c = 0; c < R; ++c) {
              float v = acc[h * R + c] * a;
              for (int64_t j = 0; j < nk; ++j) v += S[j * HP + h] * keys[j * W + c];
              acc[h * R + c] = v;
            }
          }
#endif
        }
        for (int64_t h = 0; h < H; ++h) {
          ML[((tk.row + i) * H + h) * 2] = m[h];
          ML[((tk.row + i) * H + h) * 2 + 1] = l[h];
        }
      }
    }
  });
  // merge the splits of each query token by their log-sum-exp
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t q0 = CU[b], nq = CU[b + 1] - q0;
      for (int64_t i = 0; i < nq; ++i)
        for (int64_t h = 0; h < H; ++h) {
          float M = -INFINITY;
          for (int64_t t : task_rows[b]) M = std::max(M, ML[((tasks[t].row + i) * H + h) * 2]);
          float den = 0.f;
          float* o = O + ((q0 + i) * H + h) * R;
          std::fill(o, o + R, 0.f);
          for (int64_t t : task_rows[b]) {
            const float* ml = ML + ((tasks[t].row + i) * H + h) * 2;
            if (ml[1] == 0.f) continue;  // a split past the query's position
            const float w = std::exp2(ml[0] - M);
            den += w * ml[1];
            const float* a = ACC + ((tasks[t].row + i) * H + h) * R;
            for (int64_t c = 0; c < R; ++c) o[c] += w * a[c];
          }
          for (int64_t c = 0; c < R; ++c) o[c] /= den;
        }
    }
  });
}

namespace {

#ifdef MLA_AVX512
inline __m512 load_w(const void* w, bool is_bf16, int64_t i, __mmask16 mk) {
  return is_bf16 ? load_bf16(static_cast<const uint16_t*>(w) + i, mk)
                 : _mm512_maskz_loadu_ps(mk, static_cast<const float*>(w) + i);
}
#endif

// y[0:n] += a * w[0:n], w bf16 or float32.
void axpy(float* y, float a, const void* w, bool is_bf16, int64_t n) {
  int64_t i = 0;
#ifdef MLA_AVX512
  const __m512 av = _mm512_set1_ps(a);
  for (; i < n; i += 16) {
    const __mmask16 mk = tail_mask16(n - i);
    _mm512_mask_storeu_ps(y + i, mk, _mm512_fmadd_ps(av, load_w(w, is_bf16, i, mk), _mm512_maskz_loadu_ps(mk, y + i)));
  }
#endif
  for (; i < n; ++i)
    y[i] += a * (is_bf16 ? bf16_to_float(static_cast<const uint16_t*>(w)[i]) : static_cast<const float*>(w)[i]);
}

// x[0:n] . w[0:n], w bf16 or float32.
float dot(const float* x, const void* w, bool is_bf16, int64_t n) {
  float s = 0.f;
  int64_t i = 0;
#ifdef MLA_AVX512
  __m512 acc = _mm512_setzero_ps();
  for (; i < n; i += 16) {
    const __mmask16 mk = tail_mask16(n - i);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, x + i), load_w(w, is_bf16, i, mk), acc);
  }
  s = hsum(acc);
#endif
  for (; i < n; ++i)
    s += x[i] * (is_bf16 ? bf16_to_float(static_cast<const uint16_t*>(w)[i]) : static_cast<const float*>(w)[i]);
  return s;
}

const void* head_weight(const torch::Tensor& w, int64_t H) {
  TORCH_CHECK(w.dim() == 3 && w.size(0) == H && w.is_contiguous() &&
                  (w.scalar_type() == torch::kBFloat16 || w.scalar_type() == torch::kFloat32),
              "per-head weights must be contiguous bf16 or fp32 [H, ., .]");
  return w.data_ptr();
}

}  // namespace

// kernels/reference.py mla_decode: o_lat [T, H, R] in q_lat's dtype.
torch::Tensor mla_decode(torch::Tensor q_lat, torch::Tensor q_pe, torch::Tensor cache, torch::Tensor block_tables,
                         torch::Tensor cu_seqlens_q, torch::Tensor seq_lens, double scale, int64_t kind) {
  TORCH_CHECK(q_lat.dim() == 3 && q_pe.dim() == 3 && q_pe.size(0) == q_lat.size(0) && q_pe.size(1) == q_lat.size(1),
              "mla_decode: q_lat [T, H, R], q_pe [T, H, DR]");
  const int64_t T = q_lat.size(0), H = q_lat.size(1), R = q_lat.size(2), DR = q_pe.size(2);
  const std::vector<float> ql = values_f32(q_lat), qp = values_f32(q_pe);
  std::vector<float> q(T * H * (R + DR)), o(T * H * R, NAN);
  for (int64_t i = 0; i < T * H; ++i) {
    std::memcpy(q.data() + i * (R + DR), ql.data() + i * R, R * 4);
    std::memcpy(q.data() + i * (R + DR) + R, qp.data() + i * DR, DR * 4);
  }
  attend(q.data(), T, H, R, DR, cache, block_tables, cu_seqlens_q, seq_lens, scale, kind, o.data());
  return tensor_from(o.data(), {T, H, R}, q_lat.scalar_type());
}

// The absorbed attention of a decode step in one call: q_lat = q_nope through W_UK, mla_decode over the latent
// cache, back through W_UV. q_nope [T, H, nope], q_pe [T, H, DR] (views of q), w_uk [H, nope, R], w_uv [H, v, R]
// (bf16 or fp32) -> o [T, H, v] in q_nope's dtype; float32 throughout.
torch::Tensor mla_absorbed(torch::Tensor q_nope, torch::Tensor q_pe, torch::Tensor w_uk, torch::Tensor w_uv,
                           torch::Tensor cache, torch::Tensor block_tables, torch::Tensor cu_seqlens_q,
                           torch::Tensor seq_lens, double scale, int64_t kind) {
  TORCH_CHECK(q_nope.dim() == 3 && q_pe.dim() == 3 && q_pe.size(0) == q_nope.size(0) && q_pe.size(1) == q_nope.size(1),
              "mla_absorbed: q_nope [T, H, nope], q_pe [T, H, DR]");
  const int64_t T = q_nope.size(0), H = q_nope.size(1), DN = q_nope.size(2), DR = q_pe.size(2);
  const int64_t R = w_uk.size(2), V = w_uv.size(1), W = R + DR;
  const void* UK = head_weight(w_uk, H);
  const void* UV = head_weight(w_uv, H);
  TORCH_CHECK(w_uk.size(1) == DN && w_uv.size(2) == R, "mla_absorbed: w_uk [H, nope, R], w_uv [H, v, R]");
  const bool uk16 = w_uk.scalar_type() == torch::kBFloat16, uv16 = w_uv.scalar_type() == torch::kBFloat16;
  const int64_t uk_elt = w_uk.element_size(), uv_elt = w_uv.element_size();
  const std::vector<float> qn = values_f32(q_nope), qp = values_f32(q_pe);
  std::vector<float> q(T * H * W, 0.f), o_lat(T * H * R, NAN), o(T * H * V, NAN);
  at::parallel_for(0, H, 1, [&](int64_t h0, int64_t h1) {  // q_lat[t, h] = q_nope[t, h] @ W_UK[h]
    for (int64_t h = h0; h < h1; ++h)
      for (int64_t t = 0; t < T; ++t) {
        float* qr = q.data() + (t * H + h) * W;
        for (int64_t a = 0; a < DN; ++a)
          axpy(qr, qn[(t * H + h) * DN + a], static_cast<const char*>(UK) + (h * DN + a) * R * uk_elt, uk16, R);
        std::memcpy(qr + R, qp.data() + (t * H + h) * DR, DR * 4);
      }
  });
  attend(q.data(), T, H, R, DR, cache, block_tables, cu_seqlens_q, seq_lens, scale, kind, o_lat.data());
  at::parallel_for(0, H, 1, [&](int64_t h0, int64_t h1) {  // o[t, h] = o_lat[t, h] @ W_UV[h].T
    for (int64_t h = h0; h < h1; ++h)
      for (int64_t v = 0; v < V; ++v) {
        const void* wr = static_cast<const char*>(UV) + (h * V + v) * R * uv_elt;
        for (int64_t t = 0; t < T; ++t) o[(t * H + h) * V + v] = dot(o_lat.data() + (t * H + h) * R, wr, uv16, R);
      }
  });
  return tensor_from(o.data(), {T, H, V}, q_nope.scalar_type());
}

// ---- the small steps between the products, one call each instead of several torch ops ----------------------------

namespace {
template <typename T>
inline float to_f(T v) { return float(v); }
template <typename T>
inline T from_f(float v) { return T(v); }
}  // namespace

// DeepSeek's RMSNorm: x [M, D] normalised in float32, rounded to x's dtype, times the weight (in x's dtype).
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 1 && w.size(0) == x.size(1) && w.scalar_type() == x.scalar_type(),
              "rms_norm: x [M, D], w [D] of x's dtype");
  x = x.contiguous();
  w = w.contiguous();
  auto y = torch::empty_like(x);
  const int64_t M = x.size(0), D = x.size(1);
  float_dispatch(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* X = x.data_ptr<T>();
    const T* Wt = w.data_ptr<T>();
    T* Y = y.data_ptr<T>();
    at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) {
        const T* xr = X + m * D;
        float ss = 0.f;
        for (int64_t d = 0; d < D; ++d) ss += to_f(xr[d]) * to_f(xr[d]);
        const float r = 1.f / std::sqrt(ss / float(D) + float(eps));
        for (int64_t d = 0; d < D; ++d) Y[m * D + d] = from_f<T>(to_f(Wt[d]) * to_f(from_f<T>(to_f(xr[d]) * r)));
      }
    });
  });
  return y;
}

// DeepSeek's router for a few tokens (kernels/reference.py route): x [T, D] (any float dtype), gate [E, D] (bf16 or
// fp32, read as float32: the products are float32, as the reference's are) -> (ids int64 [T, k], weights float32
// [T, k]). method: 0 greedy, 1 group_limited_greedy (groups ranked by their best expert), 2 noaux_tc (bias added for
// the choice only; groups ranked by the sum of their best two). The weights are the chosen scores, normalised when
// norm, times scale.
std::vector<torch::Tensor> route(torch::Tensor x, torch::Tensor gate, std::optional<torch::Tensor> bias, int64_t k,
                                 bool sigmoid, int64_t method, int64_t n_group, int64_t topk_group, bool norm,
                                 double scale) {
  const int64_t T = x.size(0), D = x.size(1), E = gate.size(0);
  TORCH_CHECK(x.dim() == 2 && gate.dim() == 2 && gate.size(1) == D && gate.is_contiguous() && k >= 1 && k <= E &&
                  (gate.scalar_type() == torch::kBFloat16 || gate.scalar_type() == torch::kFloat32),
              "route: x [T, D], gate bf16 / fp32 [E, D], 1 <= k <= E");
  TORCH_CHECK(method == 0 || (n_group >= 1 && E % n_group == 0 && topk_group >= 1 && topk_group <= n_group),
              "route: experts in n_group equal groups, 1 <= topk_group <= n_group");
  TORCH_CHECK(!bias || (bias->scalar_type() == torch::kFloat32 && bias->numel() == E && bias->is_contiguous()),
              "route: bias float32 [E]");
  const std::vector<float> xf = values_f32(x);
  const bool g16 = gate.scalar_type() == torch::kBFloat16;
  const void* G = gate.data_ptr();
  auto ids = torch::empty({T, k}, torch::kInt64);
  auto wts = torch::empty({T, k}, torch::kFloat32);
  std::vector<float> score(E), choice(E), gs(n_group);
  std::vector<int64_t> order(std::max(E, n_group));
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t e = 0; e < E; ++e) score[e] = dot(xf.data() + t * D, static_cast<const char*>(G) + e * D * (g16 ? 2 : 4), g16, D);
    if (sigmoid) {
      for (int64_t e = 0; e < E; ++e) score[e] = 1.f / (1.f + std::exp(-score[e]));
    } else {
      const float mx = *std::max_element(score.begin(), score.end());
      float sum = 0.f;
      for (int64_t e = 0; e < E; ++e) sum += (score[e] = std::exp(score[e] - mx));
      for (int64_t e = 0; e < E; ++e) score[e] /= sum;
    }
    for (int64_t e = 0; e < E; ++e) choice[e] = score[e] + (method == 2 && bias ? bias->data_ptr<float>()[e] : 0.f);
    // the k (or topk_group) largest of v[0:n], best first, into order
    auto top = [&](const float* v, int64_t n, int64_t kk) {
      std::iota(order.begin(), order.begin() + n, 0);
      std::partial_sort(order.begin(), order.begin() + kk, order.begin() + n,
                        [&](int64_t a, int64_t b) { return v[a] > v[b] || (v[a] == v[b] && a < b); });
    };
    if (method != 0 && n_group > 1) {  // keep the experts of the topk_group best groups
      const int64_t per = E / n_group;
      for (int64_t g = 0; g < n_group; ++g) {
        top(choice.data() + g * per, per, std::min<int64_t>(2, per));
        gs[g] = method == 1 ? choice[g * per + order[0]]
                            : choice[g * per + order[0]] + (per > 1 ? choice[g * per + order[1]] : 0.f);
      }
      top(gs.data(), n_group, topk_group);
      std::vector<bool> keep(n_group, false);
      for (int64_t i = 0; i < topk_group; ++i) keep[order[i]] = true;
      for (int64_t e = 0; e < E; ++e)
        if (!keep[e / per]) choice[e] = -INFINITY;
    }
    top(choice.data(), E, k);
    float sum = 0.f;
    for (int64_t j = 0; j < k; ++j) sum += score[order[j]];
    for (int64_t j = 0; j < k; ++j) {
      ids.data_ptr<int64_t>()[t * k + j] = order[j];
      wts.data_ptr<float>()[t * k + j] = (norm ? score[order[j]] / (sum + 1e-20f) : score[order[j]]) * float(scale);
    }
  }
  return {ids, wts};
}

// New tokens' [c_kv | k_pe] into the latent cache (kernels/reference.py write_latent): token t to flat slot
// slots[t]; c_kv [T, R], k_pe [T, dr] (views with a contiguous last dim). A float cache takes both converted to its
// dtype; a packed int8 cache (uint8 rows, kernels/cache_format.py) takes the latent quantized with one absmax scale
// per token, rounded half up as cache_format.quantize does, then the scale (float32) and k_pe in its own dtype.
void write_latent(torch::Tensor cache, torch::Tensor slots, torch::Tensor c_kv, torch::Tensor k_pe) {
  const int64_t T = c_kv.size(0), R = c_kv.size(1), DR = k_pe.size(1), W = cache.size(-1);
  const bool packed = cache.scalar_type() == torch::kByte;
  TORCH_CHECK(cache.is_contiguous() && W == (packed ? R + 4 + DR * k_pe.element_size() : R + DR) &&
                  k_pe.size(0) == T && slots.numel() == T && slots.scalar_type() == torch::kInt64,
              "write_latent: cache [..., R + dr] (or a packed int8 row), c_kv [T, R], k_pe [T, dr]");
  const std::vector<float> c = values_f32(c_kv), kp = values_f32(k_pe);
  const int64_t* S = slots.contiguous().data_ptr<int64_t>();
  const int64_t rows = cache.numel() / W;
  for (int64_t t = 0; t < T; ++t) TORCH_CHECK(S[t] >= 0 && S[t] < rows, "write_latent: slot out of range");
  if (packed) {
    uint8_t* out = cache.data_ptr<uint8_t>();
    for (int64_t t = 0; t < T; ++t) {
      const float* x = c.data() + t * R;
      uint8_t* row = out + S[t] * W;
      float amax = 0.f;
      for (int64_t i = 0; i < R; ++i) amax = std::max(amax, std::fabs(x[i]));
      const float scale = amax / 127.f > 0.f ? amax / 127.f : 1.f;  // an all-zero row: any finite scale
      for (int64_t i = 0; i < R; ++i)
        row[i] = uint8_t(int8_t(std::min(127.f, std::max(-127.f, std::floor(x[i] / scale + 0.5f)))));
      std::memcpy(row + R, &scale, 4);
      float_dispatch(k_pe.scalar_type(), [&](auto tag) {
        using Tk = decltype(tag);
        Tk* pe = reinterpret_cast<Tk*>(row + R + 4);  // 4-byte aligned: R is a multiple of 4 (kv_lora_rank)
        for (int64_t i = 0; i < DR; ++i) pe[i] = Tk(kp[t * DR + i]);
      });
    }
    return;
  }
  float_dispatch(cache.scalar_type(), [&](auto tag) {
    using Tc = decltype(tag);
    Tc* out = cache.data_ptr<Tc>();
    for (int64_t t = 0; t < T; ++t) {
      Tc* row = out + S[t] * W;
      for (int64_t i = 0; i < R; ++i) row[i] = Tc(c[t * R + i]);
      for (int64_t i = 0; i < DR; ++i) row[R + i] = Tc(kp[t * DR + i]);
    }
  });
}

// RoPE in place on x [T, N, dr] (any strides, last dim contiguous): token t rotated by the angles of positions[t];
// cos / sin [P, dr / 2] float32. interleave: pairs (x0, x1), (x2, x3), ...; otherwise the two halves.
void rope_(torch::Tensor x, torch::Tensor positions, torch::Tensor cos, torch::Tensor sin, bool interleave) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && positions.dim() == 1 && positions.size(0) == x.size(0),
              "rope_: x [T, N, dr] with a contiguous last dim, positions [T]");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.scalar_type() == torch::kFloat32, "rope_ tables");
  auto pos = positions.to(torch::kInt64).contiguous();
  const int64_t T = x.size(0), N = x.size(1), half = x.size(2) / 2, s0 = x.stride(0), s1 = x.stride(1);
  const int64_t* P = pos.data_ptr<int64_t>();
  const float* C = cos.data_ptr<float>();
  const float* S = sin.data_ptr<float>();
  float_dispatch(x.scalar_type(), [&](auto tag) {
    using Tp = decltype(tag);
    Tp* X = x.data_ptr<Tp>();
    at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const float* c = C + P[t] * half;
        const float* sn = S + P[t] * half;
        for (int64_t n = 0; n < N; ++n) {
          Tp* v = X + t * s0 + n * s1;
          for (int64_t i = 0; i < half; ++i) {
            Tp* a = interleave ? v + 2 * i : v + i;
            Tp* b = interleave ? v + 2 * i + 1 : v + half + i;
            const float x1 = to_f(*a), x2 = to_f(*b);
            *a = from_f<Tp>(x1 * c[i] - x2 * sn[i]);
            *b = from_f<Tp>(x2 * c[i] + x1 * sn[i]);
          }
        }
      }
    });
  });
}

// SwiGLU's middle: h [M, 2I] (gate | up) -> silu(gate) * up [M, I], in float32, returned in h's dtype.
torch::Tensor silu_mul(torch::Tensor h) {
  TORCH_CHECK(h.dim() == 2 && h.size(1) % 2 == 0, "silu_mul: h [M, 2I]");
  h = h.contiguous();
  const int64_t M = h.size(0), I = h.size(1) / 2;
  auto y = torch::empty({M, I}, h.options());
  float_dispatch(h.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* Hp = h.data_ptr<T>();
    T* Y = y.data_ptr<T>();
    at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m)
        for (int64_t i = 0; i < I; ++i) {
          const float g = to_f(Hp[m * 2 * I + i]), u = to_f(Hp[m * 2 * I + I + i]);
          Y[m * I + i] = from_f<T>(g / (1.f + std::exp(-g)) * u);
        }
    });
  });
  return y;
}

bool has_avx512() {
#ifdef MLA_AVX512
  return true;
#else
  return false;
#endif
}

// ---- a whole decoder layer of a decode step ---------------------------------------------------------------------

// models/deepseek.py DecoderLayer on the absorbed path, as one call: the functions above, in the order and with the
// roundings of the Python layer (tests compare the two). Between the products the Python layer made about 40 calls
// into torch, each slow once the layer's weight stream had evicted the interpreter's working set (0.4 ms a layer).
// The weights are a dict, built once per layer by models/deepseek.py; mlp is "dense" (w13, w2) or "moe" (router
// and experts, shared experts optional).
struct DecodeLayer {
  torch::Tensor ln1, ln2, kv_a_ln, w_uk, w_uv;
  std::optional<torch::Tensor> q_a_ln, gate, bias;
  std::optional<WTuple> q_a, s13, s2;
  WTuple q, kv_a, o, w13, w2;
  int64_t H, dn, dr, R, k = 0, method = 0, n_group = 1, topk_group = 1;
  double eps, scale, route_scale = 1.0;
  bool interleave, moe, sigmoid = false, norm = false;

  explicit DecodeLayer(const py::dict& d) {
    auto get = [&](const char* key) { return py::object(d[key]); };
    auto opt = [&](const char* key) { return d.contains(key) && !get(key).is_none(); };
    ln1 = get("ln1").cast<torch::Tensor>(), ln2 = get("ln2").cast<torch::Tensor>();
    kv_a_ln = get("kv_a_ln").cast<torch::Tensor>();
    w_uk = get("w_uk").cast<torch::Tensor>(), w_uv = get("w_uv").cast<torch::Tensor>();
    q = get("q").cast<WTuple>(), kv_a = get("kv_a").cast<WTuple>(), o = get("o").cast<WTuple>();
    if (opt("q_a")) q_a = get("q_a").cast<WTuple>(), q_a_ln = get("q_a_ln").cast<torch::Tensor>();
    w13 = get("w13").cast<WTuple>(), w2 = get("w2").cast<WTuple>();
    H = get("H").cast<int64_t>(), dn = get("dn").cast<int64_t>(), dr = get("dr").cast<int64_t>();
    R = get("R").cast<int64_t>();
    eps = get("eps").cast<double>(), scale = get("scale").cast<double>(), interleave = get("interleave").cast<bool>();
    moe = opt("gate");
    if (moe) {
      gate = get("gate").cast<torch::Tensor>();
      if (opt("bias")) bias = get("bias").cast<torch::Tensor>();
      if (opt("s13")) s13 = get("s13").cast<WTuple>(), s2 = get("s2").cast<WTuple>();
      // kernels/cpu.py route_codes: (top_k, sigmoid, method, n_group, topk_group, norm, scale)
      std::tie(k, sigmoid, method, n_group, topk_group, norm, route_scale) =
          get("router").cast<std::tuple<int64_t, bool, int64_t, int64_t, int64_t, bool, double>>();
    }
  }

  static torch::Tensor linear(const torch::Tensor& x, const WTuple& w) {
    auto out = torch::empty({x.size(0), weight_ref(w).N}, x.options());
    gemv(x, w, out);
    return out;
  }

  // x [T, D] -> the layer's output [T, D]; the new tokens' latent rows are written to the cache.
  torch::Tensor forward(torch::Tensor x, torch::Tensor positions, torch::Tensor slots, torch::Tensor cos,
                        torch::Tensor sin, torch::Tensor cache, torch::Tensor block_tables, torch::Tensor cu_seqlens_q,
                        torch::Tensor seq_lens, int64_t kind) const {
    const int64_t T = x.size(0);
    torch::Tensor h = rms_norm(x, ln1, eps);
    torch::Tensor qf = q_a ? linear(rms_norm(linear(h, *q_a), *q_a_ln, eps), q) : linear(h, q);
    qf = qf.view({T, H, dn + dr});
    torch::Tensor q_nope = qf.narrow(2, 0, dn), q_pe = qf.narrow(2, dn, dr);
    torch::Tensor kv = linear(h, kv_a);
    torch::Tensor c_kv = rms_norm(kv.narrow(1, 0, R), kv_a_ln, eps), k_pe = kv.narrow(1, R, dr);
    rope_(q_pe, positions, cos, sin, interleave);
    rope_(k_pe.unsqueeze(1), positions, cos, sin, interleave);
    write_latent(cache, slots, c_kv, k_pe);
    torch::Tensor att = mla_absorbed(q_nope, q_pe, w_uk, w_uv, cache, block_tables, cu_seqlens_q, seq_lens, scale,
                                     kind);
    x = x + linear(att.view({T, -1}), o);
    h = rms_norm(x, ln2, eps);
    if (!moe) return x + linear(silu_mul(linear(h, w13)), w2);
    const auto r = route(h, *gate, bias, k, sigmoid, method, n_group, topk_group, norm, route_scale);
    return x + moe_decode(h, r[0], r[1], w13, w2, s13, s2);
  }
};

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("quantize_rows", &quantize_rows);
  m.def("gemv", &gemv);
  m.def("moe_decode", &moe_decode);
  m.def("dequantize", &dequantize);
  m.def("mla_decode", &mla_decode);
  m.def("mla_absorbed", &mla_absorbed);
  m.def("rms_norm", &rms_norm);
  m.def("rope_", &rope_);
  m.def("silu_mul", &silu_mul);
  m.def("route", &route);
  m.def("write_latent", &write_latent);
  py::class_<DecodeLayer>(m, "DecodeLayer").def(py::init<const py::dict&>()).def("forward", &DecodeLayer::forward);
  m.def("has_avx512", &has_avx512);
}
