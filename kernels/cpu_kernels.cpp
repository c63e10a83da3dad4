// CPU kernels for the few rows of a decode step, where streaming the weights from memory is the whole cost:
// y[m, n] = x[m, :] . W_g[n, :] for the rows m of each group g (one group: a linear; one group per expert: the
// routed experts of a MoE layer). Each weight row is read once per step and used for every row of its group.
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
// Threads: at::parallel_for over (group, block of weight rows); each thread streams its own contiguous rows, one
// row at a time, and reaches the read rate of a plain sum over a large array (measured: 0.95-1.09 of it).
// Without AVX-512 (BF16 + VNNI) the same functions run a portable scalar loop.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
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
constexpr int64_t MT = 4;  // rows of x sharing one pass over a weight row

using bf16 = at::BFloat16;

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

// Run fn(g, n0, n1) over every group with rows and every block of weight rows, in parallel.
template <typename F>
void for_each_task(const std::vector<int64_t>& offsets, int64_t N, F fn) {
  std::vector<int64_t> groups;
  for (size_t g = 0; g + 1 < offsets.size(); ++g)
    if (offsets[g + 1] > offsets[g]) groups.push_back(int64_t(g));
  const int64_t blocks = (N + ROWS_PER_TASK - 1) / ROWS_PER_TASK;
  const int64_t tasks = int64_t(groups.size()) * blocks;
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t g = groups[t / blocks], b = t % blocks;
      fn(g, b * ROWS_PER_TASK, std::min(N, (b + 1) * ROWS_PER_TASK));
    }
  });
}

std::vector<int64_t> check_offsets(const torch::Tensor& offsets, int64_t M, int64_t G) {
  TORCH_CHECK(offsets.dtype() == torch::kInt64 && offsets.dim() == 1 && offsets.size(0) == G + 1,
              "offsets must be int64 [groups + 1]");
  auto o = offsets.contiguous();
  std::vector<int64_t> v(o.data_ptr<int64_t>(), o.data_ptr<int64_t>() + G + 1);
  TORCH_CHECK(v.front() == 0 && v.back() == M, "offsets must run from 0 to the rows of x");
  for (int64_t g = 0; g < G; ++g) TORCH_CHECK(v[g] <= v[g + 1], "offsets must not decrease");
  return v;
}

}  // namespace

// x [M, K] float32 / bfloat16 -> (xq int8 [M, KB * 128], sx float32 [M, KB], sxsum float32 [M, KB]):
// x ~ xq * sx per block of 128 (zero padded), sxsum = sx * sum(xq) of the block. interleave: each block stored as
// its even-indexed values, then its odd-indexed ones (the int4 nibble order).
std::vector<torch::Tensor> quantize_rows(torch::Tensor x, bool interleave) {
  TORCH_CHECK(x.dim() == 2, "x must be [M, K]");
  x = x.to(torch::kFloat32).contiguous();
  const int64_t M = x.size(0), K = x.size(1), KB = (K + QB - 1) / QB;
  auto xq = torch::zeros({M, KB * QB}, torch::kInt8);
  auto sx = torch::empty({M, KB}, torch::kFloat32);
  auto sxsum = torch::empty({M, KB}, torch::kFloat32);
  const float* X = x.data_ptr<float>();
  int8_t* Q = xq.data_ptr<int8_t>();
  float* S = sx.data_ptr<float>();
  float* C = sxsum.data_ptr<float>();
  at::parallel_for(0, M * KB, 64, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t m = i / KB, b = i % KB, k0 = b * QB, n = std::min(QB, K - k0);
      const float* xr = X + m * K + k0;
      float amax = 0.f;
      for (int64_t j = 0; j < n; ++j) amax = std::max(amax, std::fabs(xr[j]));
      const float s = amax > 0.f ? amax / 127.f : 1.f, inv = 1.f / s;
      int8_t* q = Q + m * KB * QB + k0;
      int32_t sum = 0;
      for (int64_t j = 0; j < n; ++j) {
        const int32_t v = int32_t(std::nearbyint(xr[j] * inv));
        const int64_t at = interleave ? (j % 2) * (QB / 2) + j / 2 : j;
        q[at] = int8_t(std::max(-127, std::min(127, v)));
        sum += q[at];
      }
      S[i] = s;
      C[i] = s * float(sum);
    }
  });
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
  for (; k + 64 <= K; k += 64) {
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
  for (; k + 32 <= K; k += 32) {
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
// 128; the caller subtracts the 128 * sum correction.
template <int C>
void row_q8(const uint8_t* w, const int8_t* x, int64_t ldx, const float* sx, int64_t KB, int64_t K, float* out) {
  const __m512i sign = _mm512_set1_epi8(char(0x80));
  __m512 acc[C][2];
  for (int c = 0; c < C; ++c) acc[c][0] = acc[c][1] = _mm512_setzero_ps();
  for (int64_t b = 0; b < KB; ++b) {
    const int64_t k0 = b * QB;
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
      acc[c][b & 1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_set1_ps(sx[c * KB + b]), acc[c][b & 1]);
    }
  }
  for (int c = 0; c < C; ++c) out[c] = hsum(_mm512_add_ps(acc[c][0], acc[c][1]));
}

// An int4 row (64 bytes per group of 128, scales ws[b]): the full dot, corrections included.
template <int C>
void row_q4(const uint8_t* w, const float* ws, const int8_t* x, int64_t ldx, const float* sx, const float* sxsum,
            int64_t KB, float* out) {
  const __m512i low = _mm512_set1_epi8(0x0F);
  __m512 acc[C][2];
  float corr[C];
  for (int c = 0; c < C; ++c) acc[c][0] = acc[c][1] = _mm512_setzero_ps(), corr[c] = 0.f;
  for (int64_t b = 0; b < KB; ++b) {
    const __m512i v = _mm512_loadu_si512(w + b * 64);
    const __m512i lo = _mm512_and_si512(v, low), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
    const float wsb = ws[b];
    for (int c = 0; c < C; ++c) {
      const int8_t* xb = x + c * ldx + b * QB;
      const __m512i d = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(xb)),
                                            hi, _mm512_loadu_si512(xb + 64));
      acc[c][b & 1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_set1_ps(wsb * sx[c * KB + b]), acc[c][b & 1]);
      corr[c] += 8.f * wsb * sxsum[c * KB + b];
    }
  }
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

// y [M, N] float32 = x @ W_g.T per group. w [G, N, K] bfloat16 or float32; x [M, K] (converted to w's dtype).
torch::Tensor grouped_gemv_float(torch::Tensor x, torch::Tensor offsets, torch::Tensor w) {
  TORCH_CHECK(w.dim() == 3 && w.is_contiguous(), "w must be contiguous [groups, N, K]");
  TORCH_CHECK(w.scalar_type() == torch::kBFloat16 || w.scalar_type() == torch::kFloat32, "w must be bf16 or fp32");
  const int64_t G = w.size(0), N = w.size(1), K = w.size(2), M = x.size(0);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, "x must be [M, K]");
  auto off = check_offsets(offsets, M, G);
  const bool is_bf16 = w.scalar_type() == torch::kBFloat16;
  x = x.to(w.scalar_type()).contiguous();
  auto y = torch::full({M, N}, NAN, torch::kFloat32);  // NaN: a row left unwritten shows
  float* Y = y.data_ptr<float>();
  const char* W = static_cast<const char*>(w.data_ptr());
  const char* X = static_cast<const char*>(x.data_ptr());
  const int64_t elt = w.element_size();
  for_each_task(off, N, [&](int64_t g, int64_t n0, int64_t n1) {
    for (int64_t m = off[g]; m < off[g + 1]; m += MT) {
      const int64_t C = std::min(MT, off[g + 1] - m);
      const char* xs = X + m * K * elt;
      for (int64_t n = n0; n < n1; ++n) {
        const char* wr = W + (g * N + n) * K * elt;
        float out[MT];
#ifdef MLA_AVX512
#define MLA_CALL(C_)                                                                \
  if (is_bf16)                                                                      \
    row_bf16<C_>((const uint16_t*)wr, (const uint16_t*)xs, K, K, out);              \
  else                                                                              \
    row_f32<C_>((const float*)wr, (const float*)xs, K, K, out);
        MLA_DISPATCH_C(C, MLA_CALL)
#undef MLA_CALL
#else
        for (int64_t c = 0; c < C; ++c) {
          float s = 0.f;
          for (int64_t k = 0; k < K; ++k)
            s += is_bf16 ? bf16_to_float(((const uint16_t*)wr)[k]) * bf16_to_float(((const uint16_t*)xs)[c * K + k])
                         : ((const float*)wr)[k] * ((const float*)xs)[c * K + k];
          out[c] = s;
        }
#endif
        for (int64_t c = 0; c < C; ++c) Y[(m + c) * N + n] = out[c];
      }
    }
  });
  return y;
}

// y [M, N] float32 = x @ W_g.T per group for weight-only quantized W (kernels/weights.py layouts):
//   int8: qweight int8 [G, N, K], scales float32 [G, N]
//   int4: qweight uint8 [G, N, Kp / 2], scales float32 [G, N, Kp / 128]
// x given as quantize_rows(x, interleave = int4) returned it.
torch::Tensor grouped_gemv_quant(torch::Tensor xq, torch::Tensor sx, torch::Tensor sxsum, torch::Tensor offsets,
                                 torch::Tensor qweight, torch::Tensor scales, int64_t K, bool int4) {
  TORCH_CHECK(qweight.dim() == 3 && qweight.is_contiguous() && scales.is_contiguous(),
              "qweight must be contiguous [groups, N, ...]");
  const int64_t G = qweight.size(0), N = qweight.size(1), M = xq.size(0), KB = (K + QB - 1) / QB;
  TORCH_CHECK(xq.size(1) == KB * QB && sx.size(1) == KB && sxsum.size(1) == KB, "x quantized for another K");
  if (int4) {
    TORCH_CHECK(qweight.scalar_type() == torch::kUInt8 && qweight.size(2) == KB * QB / 2, "int4 qweight [G, N, Kp/2]");
    TORCH_CHECK(scales.dim() == 3 && scales.size(2) == KB, "int4 scales [G, N, Kp/128]");
  } else {
    TORCH_CHECK(qweight.scalar_type() == torch::kInt8 && qweight.size(2) == K, "int8 qweight [G, N, K]");
    TORCH_CHECK(scales.dim() == 2 && scales.size(1) == N, "int8 scales [G, N]");
  }
  auto off = check_offsets(offsets, M, G);
  auto y = torch::full({M, N}, NAN, torch::kFloat32);  // NaN: a row left unwritten shows
  const int8_t* XQ = xq.data_ptr<int8_t>();
  const float* SX = sx.data_ptr<float>();
  const float* SC = sxsum.data_ptr<float>();
  const float* WS = scales.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  // int8: the correction 128 * sum_b sx * sum(xq) depends on the row of x only
  std::vector<float> corr(M, 0.f);
  if (!int4)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t b = 0; b < KB; ++b) corr[m] += 128.f * SC[m * KB + b];
  const int64_t ldw = int4 ? KB * QB / 2 : K, ldx = KB * QB;
  const uint8_t* QW = reinterpret_cast<const uint8_t*>(qweight.data_ptr());
  for_each_task(off, N, [&](int64_t g, int64_t n0, int64_t n1) {
    for (int64_t m = off[g]; m < off[g + 1]; m += MT) {
      const int64_t C = std::min(MT, off[g + 1] - m);
      for (int64_t n = n0; n < n1; ++n) {
        const uint8_t* wr = QW + (g * N + n) * ldw;
        const float* ws = WS + (g * N + n) * (int4 ? KB : 1);
        const int8_t* xs = XQ + m * ldx;
        float out[MT];
#ifdef MLA_AVX512
#define MLA_CALL(C_)                                                            \
  if (int4)                                                                     \
    row_q4<C_>(wr, ws, xs, ldx, SX + m * KB, SC + m * KB, KB, out);             \
  else                                                                          \
    row_q8<C_>(wr, xs, ldx, SX + m * KB, KB, K, out);
        MLA_DISPATCH_C(C, MLA_CALL)
#undef MLA_CALL
#else
        for (int64_t c = 0; c < C; ++c) {
          const int8_t* xr = xs + c * ldx;
          float s = 0.f;
          for (int64_t b = 0; b < KB; ++b) {
            int32_t d = 0;
            if (int4) {
              for (int64_t j = 0; j < 64; ++j) {
                const uint8_t byte = wr[b * 64 + j];
                d += (int32_t(byte & 0xF) - 8) * xr[b * QB + j] + (int32_t(byte >> 4) - 8) * xr[b * QB + 64 + j];
              }
              s += ws[b] * SX[(m + c) * KB + b] * float(d);
            } else {
              for (int64_t k = b * QB; k < std::min(K, (b + 1) * QB); ++k) d += int32_t(int8_t(wr[k])) * xr[k];
              s += SX[(m + c) * KB + b] * float(d);
            }
          }
          out[c] = int4 ? s : s + corr[m + c];  // the int8 sums carry + corr, as the AVX-512 path's do
        }
#endif
        for (int64_t c = 0; c < C; ++c) Y[(m + c) * N + n] = int4 ? out[c] : ws[0] * (out[c] - corr[m + c]);
      }
    }
  });
  return y;
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
        const bf16 b(v);
        std::memcpy(o + k, &b, 2);
      }
    }
  });
}

bool has_avx512() {
#ifdef MLA_AVX512
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("quantize_rows", &quantize_rows);
  m.def("grouped_gemv_float", &grouped_gemv_float);
  m.def("grouped_gemv_quant", &grouped_gemv_quant);
  m.def("dequantize", &dequantize);
  m.def("has_avx512", &has_avx512);
}
