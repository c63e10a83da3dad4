// The int8 x int8 products of a prompt, for int8 / int4 weights in a float32 model on a CPU with VNNI but no AMX
// (kernels/matmul.py int8_gemm; EngineConfig.prefill_gemm decides it once): the activations quantized
// with one scale per row, the weight as int8 rows with one scale each (int8 as stored, int4 requantized per row),
// the int32 sums scaled back to float32.
//   quantize_tokens, requantize_rows, scale_int32   one linear's operands and epilogue around torch's int8 GEMM
//                (torch._int_mm, oneDNN)
//   moe_prompt   a MoE layer's routed experts in one call: the same products, expert by expert, each expert whole
//                on one thread; with AVX-512 VNNI through a GEMM of its own over weight blocks packed once (see there)
#include "cpu_common.h"
#include "cpu_kernels.h"

#include <ATen/ATen.h>

#include <atomic>

namespace mla {
namespace {
constexpr int64_t ROW_BLOCK = 256;  // weight rows per block of moe_prompt: packed (512 KiB at K = 2048), it stays in L2

int32_t row_sum(const int8_t* q, int64_t K) {
  int32_t s = 0;
  for (int64_t k = 0; k < K; ++k) s += q[k];
  return s;
}

// Each whole group of 128 of an int8 row as its 64 even-indexed values, then its 64 odd ones (a short last group
// stays as it is): the order of an int4 row's nibbles, in which requantize_row(interleaved) leaves the weight.
// A dot product does not depend on the order of its terms, so x in this order times such a weight is the product.
void interleave_groups(int8_t* row, int64_t K) {
  int8_t tmp[QB];
  for (int64_t g = 0; g + QB <= K; g += QB) {
    for (int64_t i = 0; i < QB / 2; ++i) tmp[i] = row[g + 2 * i], tmp[QB / 2 + i] = row[g + 2 * i + 1];
    std::memcpy(row + g, tmp, QB);
  }
}

#ifdef MLA_AVX512
// An int4 row's requantization scale: its largest magnitude / 127 (1 for an all-zero row). A value of group g is
// (q - 8) * S[g], so the largest magnitude is the largest S[g] * max |q - 8|.
float requant_scale(const uint8_t* q, const float* S, int64_t K) {
  const int64_t full = K / QB;
  const __m512i low4 = _mm512_set1_epi8(0x0F), eight = _mm512_set1_epi8(8);
  float amax = 0.f;
  for (int64_t g = 0; g < full; ++g) {
    prefetch_weights(q + g * QB / 2);  // the rows of a weight are read one after another: far enough ahead
    const __m512i b = _mm512_loadu_si512(q + g * QB / 2);
    const __m512i lo = _mm512_and_si512(b, low4), hi = _mm512_and_si512(_mm512_srli_epi16(b, 4), low4);
    const __m512i d = _mm512_max_epu8(_mm512_abs_epi8(_mm512_sub_epi8(lo, eight)),
                                      _mm512_abs_epi8(_mm512_sub_epi8(hi, eight)));
    int dmax;  // |q - 8| <= 8; a group quantized on its own largest value holds a 7 (quantize_weight): two tests
    if (_mm512_cmpge_epu8_mask(d, _mm512_set1_epi8(7)))
      dmax = _mm512_cmpeq_epi8_mask(d, eight) ? 8 : 7;
    else {
      const __m256i d2 = _mm256_max_epu8(_mm512_castsi512_si256(d), _mm512_extracti64x4_epi64(d, 1));
      __m128i m = _mm_max_epu8(_mm256_castsi256_si128(d2), _mm256_extracti128_si256(d2, 1));
      m = _mm_max_epu8(m, _mm_srli_si128(m, 8));
      m = _mm_max_epu8(m, _mm_srli_si128(m, 4));
      m = _mm_max_epu8(m, _mm_srli_si128(m, 2));
      m = _mm_max_epu8(m, _mm_srli_si128(m, 1));
      dmax = _mm_cvtsi128_si32(m) & 0xFF;
    }
    amax = std::max(amax, std::fabs(float(dmax) * S[g]));
  }
  for (int64_t k = full * QB; k < K; ++k) amax = std::max(amax, std::fabs(float(int4_nibble(q, k) - 8) * S[k / QB]));
  return amax > 0.f ? amax / 127.f : 1.f;
}

// The 16 int8 values a group of scale Sg takes, requantized at 1 / inv as quantize_row rounds them (saturated), in
// the low 16 bytes: the table the group's nibbles index.
inline __m128i group_table(float Sg, float inv) {
  const __m512i values = _mm512_sub_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                          _mm512_set1_epi32(8));
  const __m512 x = _mm512_mul_ps(_mm512_cvtepi32_ps(values), _mm512_set1_ps(Sg));  // dequantize_row's values
  return _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(x, _mm512_set1_ps(inv))));
}
#endif

// One int4 row (K values, group scales S) as int8 with one scale, bit for bit what dequantize_row then quantize_row
// give; with AVX-512, without the float32 row between them (every prompt converts every int4 weight it multiplies):
// each group's 16 possible values are a table its nibbles index (vpshufb). interleaved: each whole group as its
// even-indexed values, then its odd ones (interleave_groups), the nibbles' own order.
void requantize_row(const uint8_t* q, const float* S, int64_t K, int8_t* out, float* scale, bool interleaved) {
#ifndef MLA_AVX512
  std::vector<float> row(K);
  dequantize_row(q, S, true, K, row.data());
  quantize_row(row.data(), K, out, scale);
  if (interleaved) interleave_groups(out, K);
#else
  const int64_t full = K / QB, KB = (K + QB - 1) / QB;
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  const float s = requant_scale(q, S, K), inv = 1.f / s;
  const __m512i first = _mm512_set_epi64(11, 10, 3, 2, 9, 8, 1, 0);
  const __m512i second = _mm512_set_epi64(15, 14, 7, 6, 13, 12, 5, 4);
  for (int64_t g = 0; g < KB; ++g) {
    const __m128i table16 = group_table(S[g], inv);
    if (g == full) {  // the last group, short of QB values
      alignas(16) int8_t t[16];
      _mm_store_si128(reinterpret_cast<__m128i*>(t), table16);
      for (int64_t k = g * QB; k < K; ++k) out[k] = t[int4_nibble(q, k)];
      break;
    }
    const __m512i table = _mm512_broadcast_i32x4(table16);
    const __m512i b = _mm512_loadu_si512(q + g * QB / 2);
    const __m512i lo = _mm512_shuffle_epi8(table, _mm512_and_si512(b, low4));
    const __m512i hi = _mm512_shuffle_epi8(table, _mm512_and_si512(_mm512_srli_epi16(b, 4), low4));
    if (interleaved) {  // the nibbles' own order: no shuffle back
      _mm512_storeu_si512(out + g * QB, lo);
      _mm512_storeu_si512(out + g * QB + 64, hi);
      continue;
    }
    // byte i holds values 2i (low nibble) and 2i + 1: the unpacks interleave them within each 16-byte lane, lane L of
    // a holding values 32L..32L+15 and of c 32L+16..32L+31; the permutes put the lanes in order
    const __m512i a = _mm512_unpacklo_epi8(lo, hi), c = _mm512_unpackhi_epi8(lo, hi);
    _mm512_storeu_si512(out + g * QB, _mm512_permutex2var_epi64(a, first, c));
    _mm512_storeu_si512(out + g * QB + 64, _mm512_permutex2var_epi64(a, second, c));
  }
  *scale = s;
#endif
}

#ifdef MLA_AVX512
// ---- moe_prompt's int8 GEMM: a weight block packed once, tiles of 6 rows of x by 64 weight rows ------------------
// torch's int8 GEMM (oneDNN) repacks its weight operand on every call; with the few dozen rows of x an expert gets in
// a prompt, that repacking costs about as much as the products. Here each block of weight rows is packed once, as it
// is made (requantized) and while it is in cache, and the tile below reads it as packed.
constexpr int64_t TILE_M = 6, TILE_N = 64;

// Weight rows w[0..nr) (nr <= 16, row stride ldw, K int8 values each) as 16 columns of a packed block: the dword at
// B + k4 * ldb + 4 * i holds w[i][4 k4 .. 4 k4 + 3] + 128 (vpdpbusd's unsigned operand). Bytes past K and rows past
// nr are 0, so they add nothing, whatever x holds there.
void pack16(const int8_t* w, int64_t ldw, int64_t nr, int64_t K, uint8_t* B, int64_t ldb) {
  const __m512i bias = _mm512_set1_epi8(char(0x80));
  for (int64_t k0 = 0; k0 < K; k0 += 64) {
    const __mmask64 mk = tail_mask64(K - k0);
    __m512i r[16];
    for (int i = 0; i < 16; ++i)
      r[i] = i < nr ? _mm512_maskz_mov_epi8(mk, _mm512_xor_si512(_mm512_maskz_loadu_epi8(mk, w + i * ldw + k0), bias))
                    : _mm512_setzero_si512();
    transpose16(r);
    for (int64_t d = 0; d < std::min<int64_t>(16, (K - k0 + 3) / 4); ++d) _mm512_storeu_si512(B + (k0 / 4 + d) * ldb, r[d]);
  }
}

// pack16 of int4 rows q[0..nr) (row stride ldq bytes; group scales S, row stride lds), requantized as
// requantize_row(interleaved) does it, without the int8 rows between (K a whole number of groups): each group of the
// 16 rows is looked up, shifted by 128 and transposed in registers. scales[i]: row i's requantization scale.
void pack16_int4(const uint8_t* q, int64_t ldq, const float* S, int64_t lds, int64_t nr, int64_t K, uint8_t* B,
                 int64_t ldb, float* scales) {
  const __m512i low4 = _mm512_set1_epi8(0x0F), bias = _mm512_set1_epi8(char(0x80));
  float inv[16];
  for (int64_t i = 0; i < nr; ++i) {
    scales[i] = requant_scale(q + i * ldq, S + i * lds, K);
    inv[i] = 1.f / scales[i];
  }
  for (int64_t g = 0; g < K / QB; ++g) {
    __m512i table[16], r[16];
    for (int64_t i = 0; i < nr; ++i)  // vpdpbusd's unsigned operand: every value + 128
      table[i] = _mm512_xor_si512(_mm512_broadcast_i32x4(group_table(S[i * lds + g], inv[i])), bias);
    for (int half = 0; half < 2; ++half) {  // the low nibbles (even k), then the high ones
      for (int64_t i = 0; i < 16; ++i) {
        if (i >= nr) {
          r[i] = _mm512_setzero_si512();
          continue;
        }
        const __m512i b = _mm512_loadu_si512(q + i * ldq + g * QB / 2);
        r[i] = _mm512_shuffle_epi8(table[i], _mm512_and_si512(half ? _mm512_srli_epi16(b, 4) : b, low4));
      }
      transpose16(r);
      for (int d = 0; d < 16; ++d) _mm512_storeu_si512(B + (g * QB / 4 + 16 * half + d) * ldb, r[d]);
    }
  }
}

// c [MR][TILE_N] = rows a[0..MR) (stride lda) . TILE_N packed columns at B, over K4 dwords: each sum is the product
// plus 128 * sum(a's row).
template <int MR>
void tile(const int8_t* a, int64_t lda, int64_t K4, const uint8_t* B, int64_t ldb, int32_t* c) {
  __m512i acc[MR][4];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_setzero_si512();
  for (int64_t k4 = 0; k4 < K4; ++k4) {
    const uint8_t* b = B + k4 * ldb;
    const __m512i b0 = _mm512_loadu_si512(b), b1 = _mm512_loadu_si512(b + 64), b2 = _mm512_loadu_si512(b + 128),
                  b3 = _mm512_loadu_si512(b + 192);
#pragma GCC unroll 6
    for (int i = 0; i < MR; ++i) {
      int32_t v;
      std::memcpy(&v, a + i * lda + 4 * k4, 4);
      const __m512i x = _mm512_set1_epi32(v);
      MLA_DPBUSD(acc[i][0], b0, x);
      MLA_DPBUSD(acc[i][1], b1, x);
      MLA_DPBUSD(acc[i][2], b2, x);
      MLA_DPBUSD(acc[i][3], b3, x);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < 4; ++j) _mm512_storeu_si512(c + i * TILE_N + 16 * j, acc[i][j]);
}

// acc [n][N] (int32) = a [n][K] (row stride lda, readable 3 bytes past each row's end) times the N packed weight
// columns at B (dword row stride ldb), exact: xsum[m] = sum of a's row m takes the +128 back out.
void packed_product(const int8_t* a, int64_t lda, int64_t n, int64_t K, const int32_t* xsum, const uint8_t* B,
                    int64_t ldb, int64_t N, int32_t* acc) {
  const int64_t K4 = (K + 3) / 4;
  alignas(64) int32_t c[TILE_M * TILE_N];
  for (int64_t n0 = 0; n0 < N; n0 += TILE_N)  // a 64-column panel of B stays in L2 for every tile of rows
    for (int64_t m0 = 0; m0 < n; m0 += TILE_M) {
      const int64_t mr = std::min(TILE_M, n - m0), nc = std::min(TILE_N, N - n0);
      const int8_t* am = a + m0 * lda;
      switch (mr) {
        case 1: tile<1>(am, lda, K4, B + 4 * n0, ldb, c); break;
        case 2: tile<2>(am, lda, K4, B + 4 * n0, ldb, c); break;
        case 3: tile<3>(am, lda, K4, B + 4 * n0, ldb, c); break;
        case 4: tile<4>(am, lda, K4, B + 4 * n0, ldb, c); break;
        case 5: tile<5>(am, lda, K4, B + 4 * n0, ldb, c); break;
        default: tile<6>(am, lda, K4, B + 4 * n0, ldb, c);
      }
      for (int64_t i = 0; i < mr; ++i)
        for (int64_t j = 0; j < nc; ++j) acc[(m0 + i) * N + n0 + j] = c[i * TILE_N + j] - 128 * xsum[m0 + i];
    }
}
#endif
}  // namespace

// x float32 [M, K] (rows contiguous) -> (xq int8 [M, K], sx float32 [M]): each row with one scale.
std::vector<torch::Tensor> quantize_tokens(torch::Tensor x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.stride(1) == 1, "x must be float32 [M, K]");
  const int64_t M = x.size(0), K = x.size(1), ld = x.stride(0);
  auto xq = torch::empty({M, K}, torch::kInt8);
  auto sx = torch::empty({M}, torch::kFloat32);
  const float* X = x.data_ptr<float>();
  at::parallel_for(0, M, 4, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) quantize_row(X + m * ld, K, xq.data_ptr<int8_t>() + m * K, sx.data_ptr<float>() + m);
  });
  return {xq, sx};
}

// An int4 weight's rows as int8 with one scale per row (its dequantized values requantized, amax / 127): the
// weight operand of the int8 GEMM, one block of rows at a time into buffers of the caller's. (int8 weights are in
// that form as stored.)
void requantize_rows(const WeightRef& w, torch::Tensor out, torch::Tensor scales_out) {
  TORCH_CHECK(w.scales.has_value() && w.int4, "requantize_rows: an int4 weight");
  const torch::Tensor &qweight = w.tensor, &scales = *w.scales;
  const int64_t K = w.K, N = qweight.size(0), KB = (K + QB - 1) / QB;
  TORCH_CHECK(qweight.dim() == 2 && qweight.is_contiguous() && qweight.size(1) == KB * QB / 2 &&
                  scales.is_contiguous() && scales.size(0) == N && scales.size(1) == KB, "int4 weight [N, Kp / 2]");
  TORCH_CHECK(out.scalar_type() == torch::kInt8 && out.is_contiguous() && out.numel() == N * K, "out int8 [N, K]");
  TORCH_CHECK(scales_out.scalar_type() == torch::kFloat32 && scales_out.numel() == N, "scales_out float32 [N]");
  const uint8_t* Q = qweight.data_ptr<uint8_t>();
  const float* S = scales.data_ptr<float>();
  int8_t* O = out.data_ptr<int8_t>();
  float* SO = scales_out.data_ptr<float>();
  at::parallel_for(0, N, 8, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) requantize_row(Q + n * KB * QB / 2, S + n * KB, K, O + n * K, SO + n, false);
  });
}

// out[m, n] = acc[m, n] * sx[m] * sw[n]: the int8 GEMM's int32 sums [M, N] as float32, into out (rows contiguous,
// e.g. a block of columns of the whole product).
void scale_int32(torch::Tensor acc, torch::Tensor sx, torch::Tensor sw, torch::Tensor out) {
  TORCH_CHECK(acc.dim() == 2 && acc.scalar_type() == torch::kInt32 && acc.is_contiguous(), "acc int32 [M, N]");
  const int64_t M = acc.size(0), N = acc.size(1);
  TORCH_CHECK(sx.scalar_type() == torch::kFloat32 && sx.is_contiguous() && sx.numel() == M, "sx float32 [M]");
  TORCH_CHECK(sw.scalar_type() == torch::kFloat32 && sw.is_contiguous() && sw.numel() == N, "sw float32 [N]");
  TORCH_CHECK(out.scalar_type() == torch::kFloat32 && out.dim() == 2 && out.size(0) == M && out.size(1) == N &&
                  out.stride(1) == 1, "out float32 [M, N], rows contiguous");
  const int32_t* A = acc.data_ptr<int32_t>();
  const float *SX = sx.data_ptr<float>(), *SW = sw.data_ptr<float>();
  float* O = out.data_ptr<float>();
  const int64_t ld = out.stride(0);
  at::parallel_for(0, M, 4, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t n = 0; n < N; ++n) O[m * ld + n] = float(A[m * N + n]) * SX[m] * SW[n];
  });
}
// A MoE layer's routed experts for a prompt's tokens x [T, D] (float32) in one call, with int8 / int4 experts
// (w13 [E, 2I, D], w2 [E, D, I], stacked QuantWeights):
//   out[t] = sum_j topw[t, j] * w2_e @ swiglu(w13_e @ x_t)  (e = ids[t, j])
// each product as int8_gemm computes it (x quantized per token, once for all its experts; the swiglu rows per row).
// A prompt gives each expert a few dozen tokens: split over the threads, each such GEMM would end in a wait, and a
// loop over experts in Python costs about twenty small torch calls each. So each expert runs whole on one thread,
// the threads taking experts largest first from a shared counter; each pair's product goes to its own row, and the
// router-weighted sum per token comes last. An expert's weight is made int8 ROW_BLOCK rows at a time in the
// thread's buffers (int4: requantized, in the nibbles' order, x permuted to match) and, with AVX-512, packed as it is
// made and multiplied by packed_product; without, torch's GEMM runs single-threaded inside the parallel region.
torch::Tensor moe_prompt(torch::Tensor x, torch::Tensor ids, torch::Tensor topw, const WeightRef& w13,
                         const WeightRef& w2) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "moe_prompt: x float32 [T, D]");
  TORCH_CHECK(w13.scales && w2.scales && w13.int4 == w2.int4 && w13.tensor.dim() == 3 && w2.tensor.dim() == 3 &&
                  w13.tensor.is_contiguous() && w2.tensor.is_contiguous() && w13.scales->is_contiguous() &&
                  w2.scales->is_contiguous(), "moe_prompt: w13 and w2 stacked QuantWeights of one mode");
  const int64_t T = x.size(0), D = x.size(1), k = ids.size(1), E = w13.tensor.size(0), I = w13.tensor.size(1) / 2;
  TORCH_CHECK(w13.K == D && w2.K == I && w2.tensor.size(0) == E && w2.tensor.size(1) == D && w13.tensor.size(1) == 2 * I,
              "moe_prompt: w13 [E, 2I, D], w2 [E, D, I]");
  const int64_t P = T * k;
  const ExpertPairs by_expert = expert_pairs(ids, topw, T, E, "moe_prompt");
  const std::vector<int64_t>&start = by_expert.start, &pairs = by_expert.pairs;
  std::vector<int64_t> busy;  // the experts with pairs, largest first
  for (int64_t e = 0; e < E; ++e)
    if (start[e + 1] > start[e]) busy.push_back(e);
  std::stable_sort(busy.begin(), busy.end(), [&](int64_t a, int64_t b) {
    return start[a + 1] - start[a] > start[b + 1] - start[b];
  });
  const bool int4 = w13.int4;
  const auto q = quantize_tokens(x);
  const int8_t* XQ = q[0].data_ptr<int8_t>();
  if (int4)
    at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) interleave_groups(q[0].data_ptr<int8_t>() + t * D, D);
    });
  const float* SX = q[1].data_ptr<float>();
  std::vector<int32_t> XSUM(T);
  for (int64_t t = 0; t < T; ++t) XSUM[t] = row_sum(XQ + t * D, D);
  auto y = torch::full({P, D}, NAN, torch::kFloat32);  // NaN: a pair left unwritten shows
  float* Y = y.data_ptr<float>();
  // What one thread keeps between experts: x's rows (a, with their scales sa and sums xsum), the first product h, an
  // int4 weight's rows requantized (wq, sq), the packed block and the products of one block (acc).
  struct Buffers {
    std::vector<int8_t> a, wq;
    std::vector<float> sa, h, sq;
    std::vector<int32_t> xsum, acc;
    std::vector<uint8_t> packed;
  };
  const int64_t Kmax = std::max(D, I);
  // a [n, K] (int8, in the weight's order; xsum its rows' sums) times expert e's weight [N, K] of w, ROW_BLOCK rows
  // at a time, each block made int8 (int4: requantized) and packed while in cache:
  // epilogue(r0, r1, acc int32 [n, r1 - r0], the rows' scales)
  auto product = [&](int64_t n, const WeightRef& w, int64_t e, int64_t N, Buffers& b, auto&& epilogue) {
    const int64_t K = w.K, KB = (K + QB - 1) / QB;
    const auto* Q = static_cast<const uint8_t*>(w.tensor.data_ptr());
    const float* S = w.scales->data_ptr<float>() + e * N * (int4 ? KB : 1);
    const int8_t* stored = reinterpret_cast<const int8_t*>(Q) + e * N * K;  // int8 weights
    for (int64_t r0 = 0; r0 < N; r0 += ROW_BLOCK) {
      const int64_t r1 = std::min(N, r0 + ROW_BLOCK);
      const float* sw = int4 ? b.sq.data() : S + r0;
#ifdef MLA_AVX512
      for (int64_t c0 = r0; c0 < r1; c0 += 16) {
        const int64_t nr = std::min<int64_t>(16, r1 - c0);
        uint8_t* B = b.packed.data() + 4 * (c0 - r0);
        if (int4 && K % QB == 0) {
          pack16_int4(Q + (e * N + c0) * KB * QB / 2, KB * QB / 2, S + c0 * KB, KB, nr, K, B, 4 * ROW_BLOCK,
                      &b.sq[c0 - r0]);
          continue;
        }
        const int8_t* rows = stored + c0 * K;
        if (int4) {
          for (int64_t i = 0; i < nr; ++i)
            requantize_row(Q + (e * N + c0 + i) * KB * QB / 2, S + (c0 + i) * KB, K, &b.wq[i * K], &b.sq[c0 - r0 + i],
                           true);
          rows = b.wq.data();
        }
        pack16(rows, K, nr, K, B, 4 * ROW_BLOCK);
      }
      packed_product(b.a.data(), K, n, K, b.xsum.data(), b.packed.data(), 4 * ROW_BLOCK, r1 - r0, b.acc.data());
      epilogue(r0, r1, b.acc.data(), sw);
#else
      const int8_t* rows = stored + r0 * K;
      if (int4) {
        for (int64_t r = r0; r < r1; ++r)
          requantize_row(Q + (e * N + r) * KB * QB / 2, S + r * KB, K, &b.wq[(r - r0) * K], &b.sq[r - r0], true);
        rows = b.wq.data();
      }
      const auto i8 = torch::TensorOptions().dtype(torch::kInt8);
      const auto acc = at::_int_mm(torch::from_blob(b.a.data(), {n, K}, i8),
                                   torch::from_blob(const_cast<int8_t*>(rows), {r1 - r0, K}, i8).t());
      epilogue(r0, r1, acc.data_ptr<int32_t>(), sw);
#endif
    }
  };
  std::atomic<int64_t> next{0};
  const int64_t nth = std::min<int64_t>(at::get_num_threads(), busy.size());
  at::parallel_for(0, nth, 1, [&](int64_t, int64_t) {
    Buffers b;
#ifdef MLA_AVX512
    b.wq.resize(16 * Kmax), b.packed.resize(((Kmax + 3) / 4) * 4 * ROW_BLOCK);
#else
    b.wq.resize(int4 ? ROW_BLOCK * Kmax : 0);
#endif
    b.sq.resize(ROW_BLOCK);
    for (int64_t i; (i = next++) < int64_t(busy.size());) {
      const int64_t e = busy[i], n = start[e + 1] - start[e], *pe = pairs.data() + start[e];
      b.a.resize(n * Kmax + 64), b.sa.resize(n), b.xsum.resize(n), b.h.resize(n * 2 * I), b.acc.resize(n * ROW_BLOCK);
      for (int64_t m = 0; m < n; ++m) {
        std::memcpy(&b.a[m * D], XQ + (pe[m] / k) * D, D);
        b.sa[m] = SX[pe[m] / k], b.xsum[m] = XSUM[pe[m] / k];
      }
      product(n, w13, e, 2 * I, b, [&](int64_t r0, int64_t r1, const int32_t* acc, const float* sw) {
        for (int64_t m = 0; m < n; ++m)
          for (int64_t c = r0; c < r1; ++c)
            b.h[m * 2 * I + c] = float(acc[m * (r1 - r0) + c - r0]) * b.sa[m] * sw[c - r0];
      });
      swiglu_rows(b.h.data(), n, I);
      for (int64_t m = 0; m < n; ++m) {
        quantize_row(&b.h[m * 2 * I], I, &b.a[m * I], &b.sa[m]);
        if (int4) interleave_groups(&b.a[m * I], I);
        b.xsum[m] = row_sum(&b.a[m * I], I);
      }
      product(n, w2, e, D, b, [&](int64_t r0, int64_t r1, const int32_t* acc, const float* sw) {
        for (int64_t m = 0; m < n; ++m)
          for (int64_t d = r0; d < r1; ++d) Y[pe[m] * D + d] = float(acc[m * (r1 - r0) + d - r0]) * b.sa[m] * sw[d - r0];
      });
    }
  });
  auto out = torch::empty({T, D}, torch::kFloat32);
  float* O = out.data_ptr<float>();
  const float* TW = topw.data_ptr<float>();
  at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      float* o = O + t * D;
      std::fill(o, o + D, 0.f);
      for (int64_t j = 0; j < k; ++j)
        for (int64_t d = 0; d < D; ++d) o[d] += TW[t * k + j] * Y[(t * k + j) * D + d];
    }
  });
  return out;
}
}  // namespace mla
