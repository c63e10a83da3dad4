// Few-row products, y[m, n] = x[m, :] . W[n, :], for the few tokens of a decode step, where streaming the weights
// from memory is the whole cost: each weight row is read once per step and used for every row of x that needs it.
//   gemv         one linear
//   moe_decode   a MoE layer: the experts the router picked (each expert's rows once for all of its tokens) and the
//                shared experts, both projections, SwiGLU and the router-weighted sum, in one call, because the
//                torch ops between the products (sorting pairs by expert, gathers, the weighted sum, casts) cost
//                about as much as the products themselves in a decode step
//   dequantize   a quantized weight's rows to bf16, the operand of a prompt's GEMM
// (The int8 x int8 products of a prompt are cpu_int8_gemm.cpp's.)
//
// Float weights (bf16, fp32): fp32 accumulation (vdpbf16ps for bf16, one 32-value pair-dot per instruction). bf16
// weights of a float32 model (x float32: WeightFormat's "bfloat16" storage) are widened to float32 instead, so the
// product is the float32 one of the same values: the storage halves the bytes read and changes no result.
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
// long runs of consecutive rows, one row at a time, a single sequential stream the hardware prefetcher follows
// (figures: bench/results/cpu-kernel-notes.md).
#include "cpu_common.h"
#include "cpu_kernels.h"

#include <numeric>
#include <type_traits>

namespace mla {
namespace {

constexpr int64_t ROWS_PER_TASK = 16;
constexpr int64_t MIN_GRAB = 2;  // tasks a thread takes at least per grab in run()
constexpr int64_t MT = 4;  // rows of x sharing one pass over a weight row
constexpr int64_t MAX_KB = 256;  // int4 groups per row the kernels take (K <= 32768)

// Rows x [M, K] (row m at x + m * ldx) quantized per block of 128 into Q [M, KB * 128] (zero padded), S [M, KB]
// scales, C [M, KB] scale * sum of the block's integers; interleave: each block as its even-indexed values, then its
// odd ones. Values round to nearest, ties to even (the AVX-512 conversion's rounding, and nearbyint's).
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

// The stored forms of a weight the products read: kernels/weights.py's float tensors and QuantWeight layouts.
// BF16_F32: bf16 weights against float32 activations (widened, not x rounded to bf16).
enum Storage { F32, BF16, BF16_F32, Q8, Q4 };

// One weight [N, K], or a stack of G of them [G, N, K] (the routed experts of a layer), as raw rows: a WeightRef
// checked and resolved once per product against activations of dtype act (x's).
struct WeightRows {
  Storage kind;
  const uint8_t* data;
  const float* scales;  // int8: [G, N]; int4: [G, N, KB]; float: none
  int64_t G, N, K, KB, row_bytes;
  const uint8_t* row(int64_t g, int64_t n) const { return data + (g * N + n) * row_bytes; }
};

WeightRows rows_of(const WeightRef& ref, torch::ScalarType act) {
  const torch::Tensor& w = ref.tensor;
  const auto& scales = ref.scales;
  const int64_t K = ref.K;
  const bool int4 = ref.int4;
  TORCH_CHECK(w.defined() && (w.dim() == 2 || w.dim() == 3) && w.is_contiguous(),
              "weight must be contiguous [(groups,) N, ...]");
  const int64_t G = w.dim() == 3 ? w.size(0) : 1, N = w.size(-2), KB = (K + QB - 1) / QB;
  WeightRows W{F32, static_cast<const uint8_t*>(w.data_ptr()), nullptr, G, N, K, KB, 0};
  if (!scales) {
    TORCH_CHECK(w.scalar_type() == torch::kBFloat16 || w.scalar_type() == torch::kFloat32, "w must be bf16 or fp32");
    TORCH_CHECK(w.size(-1) == K, "float weight [(G,) N, K]");
    W.kind = w.scalar_type() == torch::kFloat32 ? F32 : act == torch::kFloat32 ? BF16_F32 : BF16;
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

  Acts(Storage kind, const float* x, int64_t M, int64_t K, int64_t ldx) : KB((K + QB - 1) / QB), ld(K) {
    if (kind == F32 || kind == BF16_F32) {
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
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(hr + i), to_bf16(_mm512_loadu_ps(xr + i)));
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

namespace {

#ifdef MLA_AVX512
// One weight row against C rows of x (C in 1..4), out[c] = x_c . w. One row at a time keeps each thread's reads a
// single sequential stream, which the hardware prefetcher follows at the full read rate (tiles of 4 weight rows,
// four short interleaved streams, ran well below it). Two accumulators per row of x, for the even and the odd
// step along K, so that consecutive multiply-adds do not wait on each other.
template <int C>
void row_bf16(const uint16_t* w, const uint16_t* x, int64_t ldx, int64_t K, float* out) {
  __m512 acc[C][2];
  for (int c = 0; c < C; ++c) acc[c][0] = acc[c][1] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
    prefetch_weights(w + k), prefetch_weights(w + k + 32);
    const __m512i w0 = _mm512_loadu_si512(w + k), w1 = _mm512_loadu_si512(w + k + 32);
    for (int c = 0; c < C; ++c) {
      acc[c][0] = dpbf16(acc[c][0], w0, _mm512_loadu_si512(x + c * ldx + k));
      acc[c][1] = dpbf16(acc[c][1], w1, _mm512_loadu_si512(x + c * ldx + k + 32));
    }
  }
  for (; k < K; k += 32) {
    const __mmask32 mk = tail_mask32(K - k);
    const __m512i wv = _mm512_maskz_loadu_epi16(mk, w + k);
    for (int c = 0; c < C; ++c)
      acc[c][0] = dpbf16(acc[c][0], wv, _mm512_maskz_loadu_epi16(mk, x + c * ldx + k));
  }
  for (int c = 0; c < C; ++c) out[c] = hsum(_mm512_add_ps(acc[c][0], acc[c][1]));
}

// A float32 or bf16 row (Wt float or uint16_t; bf16 widened as it is loaded, so the products are float32's) against
// float32 rows of x.
template <int C, typename Wt>
void row_f32(const Wt* w, const float* x, int64_t ldx, int64_t K, float* out) {
  constexpr bool bf16w = std::is_same_v<Wt, uint16_t>;
  __m512 acc[C][2];
  for (int c = 0; c < C; ++c) acc[c][0] = acc[c][1] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    for (int64_t o = 0; o < 32 * int64_t(sizeof(Wt)); o += 64) prefetch_weights((const char*)(w + k) + o);
    const __m512 w0 = load_w(w, bf16w, k, 0xFFFF), w1 = load_w(w, bf16w, k + 16, 0xFFFF);
    for (int c = 0; c < C; ++c) {
      acc[c][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + c * ldx + k), acc[c][0]);
      acc[c][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + c * ldx + k + 16), acc[c][1]);
    }
  }
  for (; k < K; k += 16) {
    const __mmask16 mk = tail_mask16(K - k);
    const __m512 wv = load_w(w, bf16w, k, mk);
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
    prefetch_weights(w + k0), prefetch_weights(w + k0 + 64);
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
// accumulator. (Computing those per group in the loop made the loop compute-bound even with the row in L2.)
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
    prefetch_weights(w + b * 64);
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

#ifdef MLA_AVX2
// AVX2 has no unsigned x signed byte dot with int32 accumulation (VNNI), so vpmaddubsw multiplies byte pairs into
// int16 sums and vpmaddwd adds those pairs into int32. The int16 sums must not saturate: an int8 weight's magnitude
// (at most 128) multiplies x (within +-127) carrying the weight's sign (so both fit), and the int8 rows are signed
// dots, sum_b sx * w . xq, without the +128 offset the VNNI path corrects for (dot_rows adds that correction back);
// the int4 nibbles (at most 15) multiply x as they are, four products summed in int16 before the widening.
inline __m256i load32(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }

template <int C>
void row_q8(const uint8_t* w, const int8_t* x, int64_t ldx, const float* sx, int64_t KB, int64_t K, float* out) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[C];
  for (int c = 0; c < C; ++c) acc[c] = _mm256_setzero_ps();
  alignas(32) uint8_t tail[QB];
  for (int64_t b = 0; b < KB; ++b) {
    const int64_t k0 = b * QB;
    prefetch_weights(w + k0), prefetch_weights(w + k0 + 64);
    const uint8_t* wb = w + k0;
    if (k0 + QB > K) {  // the last, short block: zeros past K (x is zero there too)
      std::memset(tail, 0, QB);
      std::memcpy(tail, wb, K - k0);
      wb = tail;
    }
    __m256i mag[4], sgn[4];
    for (int j = 0; j < 4; ++j) sgn[j] = load32(wb + 32 * j), mag[j] = _mm256_sign_epi8(sgn[j], sgn[j]);
    for (int c = 0; c < C; ++c) {
      const int8_t* xb = x + c * ldx + k0;
      __m256i d = _mm256_setzero_si256();
      for (int j = 0; j < 4; ++j)
        d = _mm256_add_epi32(d, _mm256_madd_epi16(
                                    _mm256_maddubs_epi16(mag[j], _mm256_sign_epi8(load32(xb + 32 * j), sgn[j])), ones));
      acc[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_set1_ps(sx[c * KB + b]), acc[c]);
    }
  }
  for (int c = 0; c < C; ++c) out[c] = hsum(acc[c]);
}

// Per row, the products of the weight's and x's scales (sc) and the +8 offset's correction are computed 8 groups
// at a time before the loop, as in the VNNI path; two groups per step, each with its own accumulator.
template <int C>
void row_q4(const uint8_t* w, const float* ws, const int8_t* x, int64_t ldx, const float* sx, const float* sxsum,
            int64_t KB, float* out) {
  const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  alignas(32) float sc[C][MAX_KB];
  float corr[C];
  for (int c = 0; c < C; ++c) {
    __m256 cv = _mm256_setzero_ps();
    int64_t b = 0;
    for (; b + 8 <= KB; b += 8) {
      const __m256 wv = _mm256_loadu_ps(ws + b);
      _mm256_store_ps(sc[c] + b, _mm256_mul_ps(wv, _mm256_loadu_ps(sx + c * KB + b)));
      cv = _mm256_fmadd_ps(wv, _mm256_loadu_ps(sxsum + c * KB + b), cv);
    }
    corr[c] = hsum(cv);
    for (; b < KB; ++b) sc[c][b] = ws[b] * sx[c * KB + b], corr[c] += ws[b] * sxsum[c * KB + b];
    corr[c] *= 8.f;
  }
  __m256 acc[C][2];
  for (int c = 0; c < C; ++c) acc[c][0] = acc[c][1] = _mm256_setzero_ps();
  auto block = [&](int64_t b, int u) __attribute__((always_inline)) {
    prefetch_weights(w + b * 64);
    const __m256i v0 = load32(w + b * 64), v1 = load32(w + b * 64 + 32);
    const __m256i lo0 = _mm256_and_si256(v0, low), lo1 = _mm256_and_si256(v1, low);
    const __m256i hi0 = _mm256_and_si256(_mm256_srli_epi16(v0, 4), low);
    const __m256i hi1 = _mm256_and_si256(_mm256_srli_epi16(v1, 4), low);
    for (int c = 0; c < C; ++c) {  // x's block: its 64 even-indexed values (the low nibbles'), then the odd ones
      const int8_t* xb = x + c * ldx + b * QB;
      const __m256i s = _mm256_add_epi16(
          _mm256_add_epi16(_mm256_maddubs_epi16(lo0, load32(xb)), _mm256_maddubs_epi16(lo1, load32(xb + 32))),
          _mm256_add_epi16(_mm256_maddubs_epi16(hi0, load32(xb + 64)), _mm256_maddubs_epi16(hi1, load32(xb + 96))));
      acc[c][u] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(s, ones)), _mm256_broadcast_ss(sc[c] + b),
                                  acc[c][u]);
    }
  };
  int64_t b = 0;
  for (; b + 2 <= KB; b += 2) block(b, 0), block(b + 1, 1);
  if (b < KB) block(b, 0);
  for (int c = 0; c < C; ++c) out[c] = hsum(_mm256_add_ps(acc[c][0], acc[c][1])) - corr[c];
}

// row_f32 above for a bf16 row, 8 lanes: 16 weights per step into two accumulators.
template <int C>
void row_f32(const uint16_t* w, const float* x, int64_t ldx, int64_t K, float* out) {
  __m256 acc[C][2];
  for (int c = 0; c < C; ++c) acc[c][0] = acc[c][1] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    const __m256 w0 = load8_w(w, true, k), w1 = load8_w(w, true, k + 8);
    for (int c = 0; c < C; ++c) {
      acc[c][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + c * ldx + k), acc[c][0]);
      acc[c][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + c * ldx + k + 8), acc[c][1]);
    }
  }
  for (int c = 0; c < C; ++c) {
    out[c] = hsum(_mm256_add_ps(acc[c][0], acc[c][1]));
    for (int64_t j = k; j < K; ++j) out[c] += bf16_to_float(w[j]) * x[c * ldx + j];
  }
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

// The portable loop of dot_rows: int8 rows include the +128 correction (the VNNI path's form).
void dot_rows_scalar(const WeightRows& W, const Acts& A, int64_t g, int64_t n, int64_t m, int64_t C, float* o) {
  const uint8_t* wr = W.row(g, n);
  for (int64_t c = 0; c < C; ++c) {
    const int64_t r = m + c;
    float s = 0.f;
    if (W.kind == F32 || W.kind == BF16 || W.kind == BF16_F32) {
      for (int64_t k = 0; k < W.K; ++k)
        s += W.kind == F32    ? ((const float*)wr)[k] * A.f[r * A.ld + k]
             : W.kind == BF16 ? bf16_to_float(((const uint16_t*)wr)[k]) * bf16_to_float(A.h[r * A.ld + k])
                              : bf16_to_float(((const uint16_t*)wr)[k]) * A.f[r * A.ld + k];
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
      if (W.kind == Q8) s += A.corr[r];
    }
    o[c] = s;
  }
}

// out[c * ldo + n] = x_{m + c} . W_g[n] for c < C (C <= MT) and n in n0:n1: one pass over each weight row for C rows
// of x, the weight's kind and C dispatched once for all the rows: an int4 row of V2-Lite is 1 KiB, short enough that
// a dispatch and a call per row showed in profiles of a decode step.
void dot_rows(const WeightRows& W, const Acts& A, int64_t g, int64_t n0, int64_t n1, int64_t m, int64_t C, float* out,
              int64_t ldo) {
  const int8_t* xq = A.q.data() + m * A.ld;
  const float* sx = A.sx.data() + m * A.KB;
  auto rows = [&](auto row) __attribute__((always_inline)) {  // row(wr, n, o): o[c] = x_{m + c} . W_g[n]
    for (int64_t n = n0; n < n1; ++n) {
      float o[MT];
      row(W.row(g, n), n, o);
      if (W.kind == Q8) {
        const float ws = W.scales[g * W.N + n];
        for (int64_t c = 0; c < C; ++c) o[c] = ws * (o[c] - A.corr[m + c]);
      }
      for (int64_t c = 0; c < C; ++c) out[c * ldo + n] = o[c];
    }
  };
#define MLA_ROWS(CALL) rows([&](const uint8_t* wr, int64_t n, float* o) __attribute__((always_inline)) { CALL; })
  switch (W.kind) {
#ifdef MLA_AVX512
#define MLA_F32(C_) MLA_ROWS(row_f32<C_>((const float*)wr, A.f.data() + m * A.ld, A.ld, W.K, o))
#define MLA_BF16(C_) MLA_ROWS(row_bf16<C_>((const uint16_t*)wr, A.h.data() + m * A.ld, A.ld, W.K, o))
    case F32: MLA_DISPATCH_C(C, MLA_F32) break;
    case BF16: MLA_DISPATCH_C(C, MLA_BF16) break;
#undef MLA_F32
#undef MLA_BF16
#endif
#if defined(MLA_AVX512) || defined(MLA_AVX2)
#define MLA_BF16_F32(C_) MLA_ROWS(row_f32<C_>((const uint16_t*)wr, A.f.data() + m * A.ld, A.ld, W.K, o))
    case BF16_F32: MLA_DISPATCH_C(C, MLA_BF16_F32) break;
#undef MLA_BF16_F32
#ifdef MLA_AVX2  // AVX2's signed dots, in the VNNI path's form
#define MLA_Q8(C_) \
  MLA_ROWS(row_q8<C_>(wr, xq, A.ld, sx, A.KB, W.K, o); for (int64_t c = 0; c < C; ++c) o[c] += A.corr[m + c])
#else
#define MLA_Q8(C_) MLA_ROWS(row_q8<C_>(wr, xq, A.ld, sx, A.KB, W.K, o))
#endif
#define MLA_Q4(C_) \
  MLA_ROWS(row_q4<C_>(wr, W.scales + (g * W.N + n) * W.KB, xq, A.ld, sx, A.sxsum.data() + m * A.KB, A.KB, o))
    case Q8: MLA_DISPATCH_C(C, MLA_Q8) break;
    case Q4: MLA_DISPATCH_C(C, MLA_Q4) break;
#undef MLA_Q8
#undef MLA_Q4
#endif
    default: MLA_ROWS(dot_rows_scalar(W, A, g, n, m, C, o));
  }
#undef MLA_ROWS
}

// One product: rows m0:m1 of A times weight g of W, into out[(m - m0) * ldo + n] (float32).
struct Job {
  const WeightRows* W;
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
    for (int64_t m = jb.m0; m < jb.m1; m += MT)
      dot_rows(*jb.W, *jb.A, jb.g, n0, n1, m, std::min(MT, jb.m1 - m), jb.out + (m - jb.m0) * jb.ldo, jb.ldo);
  };
  if (bytes < INLINE_BYTES) {
    for (int64_t t = 0; t < NT; ++t) task(t);
    return;
  }
  guided_for(NT, MIN_GRAB, task);
}

}  // namespace

// outs[i] [M, N_i] = x @ W_i.T for weights that share their input x [M, K] (any float dtype; a float tensor [N_i, K]
// or a quantized one each): all of their rows in one parallel pass, so that the threads wake and wait once, not once
// per weight (a layer's q_proj and kv_a_proj). outs any float dtype.
void gemvs(torch::Tensor x, const std::vector<const WeightRef*>& ws, std::vector<torch::Tensor> outs) {
  TORCH_CHECK(x.dim() == 2 && ws.size() == outs.size(), "gemvs: x [M, K], one out per weight");
  const int64_t M = x.size(0), K = x.size(1);
  const std::vector<float> xf = values_f32(x);
  std::vector<WeightRows> W;
  std::vector<Acts> A;  // x prepared once per kind of weight among ws
  std::vector<size_t> acts_of;  // weight i reads A[acts_of[i]]
  std::vector<std::vector<float>> y;
  for (size_t i = 0; i < ws.size(); ++i) {
    W.push_back(rows_of(*ws[i], x.scalar_type()));
    TORCH_CHECK(W[i].G == 1 && W[i].K == K, "gemv: x [M, K], one weight [N, K]");
    TORCH_CHECK(outs[i].is_contiguous() && outs[i].numel() == M * W[i].N && outs[i].is_floating_point(),
                "out must be contiguous [M, N]");
    size_t j = 0;
    while (j < i && W[j].kind != W[i].kind) ++j;
    if (j == i) A.emplace_back(W[i].kind, xf.data(), M, K, K);
    acts_of.push_back(j == i ? A.size() - 1 : acts_of[j]);
    y.emplace_back(M * W[i].N, NAN);  // NaN: a product left unwritten shows
  }
  std::vector<Job> jobs;
  for (size_t i = 0; i < ws.size(); ++i) jobs.push_back({&W[i], 0, &A[acts_of[i]], 0, M, y[i].data(), W[i].N});
  run(jobs);
  for (size_t i = 0; i < ws.size(); ++i) store_f32(y[i].data(), outs[i]);
}

// out [M, N] = x @ W.T for one weight w.
void gemv(torch::Tensor x, const WeightRef& w, torch::Tensor out) { gemvs(x, {&w}, {out}); }

// The sum of a float32 tensor, read as the row kernels read weights (each thread a long sequential run, with their
// software prefetch): the read rate those kernels can reach, for the roofline's read bandwidth
// (tools/kernel_bench.py), where torch's sum, which does not prefetch, reads slower than they do.
double stream_sum(torch::Tensor x) {
  TORCH_CHECK(x.is_contiguous() && x.scalar_type() == torch::kFloat32, "stream_sum: a contiguous float32 tensor");
  const float* X = x.data_ptr<float>();
  const int64_t n = x.numel(), CHUNK = 1 << 16;  // floats a thread sums at a time
  std::vector<double> part((n + CHUNK - 1) / CHUNK, 0.0);
  at::parallel_for(0, int64_t(part.size()), 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t i0 = c * CHUNK, i1 = std::min(n, i0 + CHUNK);
      float s = 0.f;
      int64_t i = i0;
#ifdef MLA_AVX512
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (; i + 64 <= i1; i += 64) {
        prefetch_row(X + i, 256);
        a0 = _mm512_add_ps(a0, _mm512_loadu_ps(X + i));
        a1 = _mm512_add_ps(a1, _mm512_loadu_ps(X + i + 16));
        a2 = _mm512_add_ps(a2, _mm512_loadu_ps(X + i + 32));
        a3 = _mm512_add_ps(a3, _mm512_loadu_ps(X + i + 48));
      }
      s = hsum(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
#endif
      for (; i < i1; ++i) s += X[i];
      part[c] = s;
    }
  });
  return std::accumulate(part.begin(), part.end(), 0.0);
}

// A MoE layer's experts for a few tokens x [T, D] in one call: the routed ones the router picked (ids [T, k] int64,
// weights topw [T, k] float32) and the shared ones, if any:
//   out[t] = sum_j topw[t, j] * w2_e @ swiglu(w13_e @ x_t)  (e = ids[t, j])  +  s2 @ swiglu(s13 @ x_t)
// w13 [E, 2I, D] (gate rows, then up rows), w2 [E, D, I]; s13 [2Is, D], s2 [D, Is]; float or quantized alike.
// Each expert's rows are read once for all of its tokens, and both stages of every expert run in one parallel
// pass each; float32 from the first product to the sum, returned in x's dtype.
torch::Tensor moe_decode(torch::Tensor x, torch::Tensor ids, torch::Tensor topw, const WeightRef& w13,
                         const WeightRef& w2, const std::optional<WeightRef>& s13, const std::optional<WeightRef>& s2) {
  const WeightRows W13 = rows_of(w13, x.scalar_type()), W2 = rows_of(w2, x.scalar_type());
  const int64_t T = x.size(0), D = x.size(1), k = ids.size(1), E = W13.G, I = W13.N / 2, P = T * k;
  TORCH_CHECK(x.dim() == 2 && W13.K == D && W13.N % 2 == 0 && W2.G == E && W2.N == D && W2.K == I,
              "moe_decode: x [T, D], w13 [E, 2I, D], w2 [E, D, I]");
  TORCH_CHECK(s13.has_value() == s2.has_value(), "moe_decode: both shared weights or neither");
  // the (token, expert) pairs in expert order: pair p = t * k + j is product row row_of[p]
  const ExpertPairs by_expert = expert_pairs(ids, topw, T, E, "moe_decode");
  const std::vector<int64_t>&start = by_expert.start, &row_of = by_expert.pos;
  const std::vector<float> xf = values_f32(x);
  std::vector<float> xs(P * D);
  for (int64_t p = 0; p < P; ++p) std::memcpy(xs.data() + row_of[p] * D, xf.data() + (p / k) * D, D * 4);
  std::optional<WeightRows> S13, S2;
  int64_t Is = 0;
  if (s13) {
    S13 = rows_of(*s13, x.scalar_type()), S2 = rows_of(*s2, x.scalar_type()), Is = S13->N / 2;
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
  MLA_PHASE("moe gather");
  run(jobs);
  MLA_PHASE("experts w13");
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
  MLA_PHASE("moe swiglu");
  run(jobs);
  MLA_PHASE("experts w2");
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


// A quantized weight -> out [N, K] in bfloat16 or float32: the operand of the prefill GEMM, written one block of
// rows at a time into one buffer by the caller. int8: qweight [N, K], scales [N]; int4: qweight [N, Kp / 2],
// scales [N, Kp / 128].
void dequantize(const WeightRef& w, torch::Tensor out) {
  TORCH_CHECK(w.scales.has_value(), "dequantize: a quantized weight (qweight and scales)");
  const torch::Tensor &qweight = w.tensor, &scales = *w.scales;
  const int64_t K = w.K;
  const bool int4 = w.int4;
  TORCH_CHECK(qweight.dim() == 2 && qweight.is_contiguous() && scales.is_contiguous(), "qweight [N, ...]");
  const int64_t N = qweight.size(0), KB = (K + QB - 1) / QB, ldw = int4 ? KB * QB / 2 : K, lds = int4 ? KB : 1;
  TORCH_CHECK(qweight.size(1) == ldw && scales.size(0) == N && (!int4 || scales.size(1) == KB), "quantized shapes");
  const bool f32 = out.scalar_type() == torch::kFloat32;
  TORCH_CHECK((f32 || out.scalar_type() == torch::kBFloat16) && out.is_contiguous() && out.numel() == N * K,
              "out bf16 or float32 [N, K]");
  const uint8_t* Q = reinterpret_cast<const uint8_t*>(qweight.data_ptr());
  const float* S = scales.data_ptr<float>();
  at::parallel_for(0, N, 8, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      if (f32)
        dequantize_row(Q + n * ldw, S + n * lds, int4, K, out.data_ptr<float>() + n * K);
      else
        dequantize_row(Q + n * ldw, S + n * lds, int4, K, reinterpret_cast<uint16_t*>(out.data_ptr<bf16>()) + n * K);
    }
  });
}

}  // namespace mla
