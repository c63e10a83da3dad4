// Absorbed MLA attention over the paged latent cache, for the few query tokens of a decode step:
//   mla_decode    o_lat = softmax(scale * (q_lat . c_kv + q_pe . k_pe)) . c_kv per head (kernels/reference.py)
//   mla_absorbed  q_nope through W_UK, mla_decode, back through W_UV, in one call
// Every head of a token reads the same cached row [c_kv | k_pe], so a block of keys is read (and, for a bf16 or int8
// cache, converted to float32) once for all heads: the query is held transposed, heads along the vector lanes, and
// each key value multiplies 16 heads at a time. A float32 cache is read in place, as is a bf16 one where the CPU has
// bf16 pair products. With VNNI an int8 cache is read in place by int8 products with int32 sums (four times the
// multiply-adds of a float32 instruction): the query's latent part quantized to int8 per head for the scores (as
// llama.cpp quantizes a query against a q8_0 cache), the probabilities as 16-bit fractions for the values. The softmax
// is online over blocks of at most KEYS keys that sit in consecutive rows of one cache block (running max and sum in
// the log2 domain); a sequence's keys are cut into splits when there are fewer sequences than threads, each split with
// its own max, sum and output, merged at the end by log-sum-exp.
// mla_absorbed fuses the two per-head products around it because, for a few tokens, the torch ops around a call
// (bmm, transposes, casts) cost as much as the products.
#include "cpu_common.h"
#include "cpu_kernels.h"

namespace mla {
namespace {

constexpr int64_t KEYS = 64;  // keys scored at a time
constexpr int64_t MIN_KEYS_PER_SPLIT = 256;
constexpr float LOG2E = 1.4426950408889634f;
constexpr int64_t DEEPSEEK_ROW = 512 + 64;  // kv_lora_rank + qk_rope_head_dim of every DeepSeek-V2/V3

// One cached token's [c_kv | k_pe] as float32, from a bf16 row or an int8 latent with its scale and k_pe in the model
// dtype (a float32 cache is read in place: gather_keys).
struct KeyReader {
  const uint8_t* cache;
  const int32_t* tables;
  int64_t max_blocks, block_size, row_bytes, R, DR;
  CacheKind kind;

  const uint8_t* row(int64_t b, int64_t pos) const {
    return cache + (tables[b * max_blocks + pos / block_size] * block_size + pos % block_size) * row_bytes;
  }

  // The keys from pos on that sit in consecutive rows of one cache block, at most n.
  int64_t run(int64_t pos, int64_t n) const { return std::min(n, block_size - pos % block_size); }

  // latent: false for k_pe alone (out[R:R + DR]; int8 rows, whose latent the int8 products read in place)
  void read(int64_t b, int64_t pos, float* out, bool latent = true) const {
    const uint8_t* row = this->row(b, pos);
    if (kind == CacheKind::BFLOAT16) {
      widen_bf16(reinterpret_cast<const uint16_t*>(row), R + DR, out);
      return;
    }
    if (latent) {
      float s;
      std::memcpy(&s, row + R, 4);
      dequantize_row(row, &s, false, R, out);
    }
    if (kind == CacheKind::INT8_BF16_ROPE)
      widen_bf16(reinterpret_cast<const uint16_t*>(row + R + 4), DR, out + R);
    else
      std::memcpy(out + R, row + R + 4, DR * 4);
  }

  static void widen_bf16(const uint16_t* v, int64_t n, float* out) {
    int64_t d = 0;
#ifdef MLA_AVX512
    for (; d < n; d += 16) _mm512_mask_storeu_ps(out + d, tail_mask16(n - d), load_bf16(v + d, tail_mask16(n - d)));
#endif
    for (; d < n; ++d) out[d] = bf16_to_float(v[d]);
  }
};

// A sequence's keys k0:k1, whose partial results (per query token of the sequence) start at row `row`.
struct Split {
  int64_t b, k0, k1, row;
};

struct SplitPlan {
  std::vector<Split> splits;
  std::vector<std::vector<int64_t>> of_sequence;  // the splits of each sequence
  int64_t rows = 0;  // partial result rows: (split, query of its sequence)
};

// Enough splits to give every thread work (about two per thread), none shorter than MIN_KEYS_PER_SPLIT keys.
SplitPlan plan_splits(const int32_t* CU, const int32_t* LEN, int64_t B, int64_t threads) {
  SplitPlan plan;
  plan.of_sequence.resize(B);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t nq = CU[b + 1] - CU[b], L = LEN[b];
    if (nq == 0) continue;
    int64_t splits = std::max<int64_t>(1, std::min((L + MIN_KEYS_PER_SPLIT - 1) / MIN_KEYS_PER_SPLIT,
                                                   (2 * threads + B - 1) / B));
    const int64_t per = (L + splits - 1) / splits;
    for (int64_t k0 = 0; k0 < L; k0 += per) {
      plan.of_sequence[b].push_back(int64_t(plan.splits.size()));
      plan.splits.push_back({b, k0, std::min(L, k0 + per), plan.rows});
      plan.rows += nq;
    }
  }
  return plan;
}

// One thread's working set: the query transposed (qT[d][h], or qT2[d / 2][h] as bf16 pairs), a block of keys (as
// float32 rows converted from the cache, none where a float32 cache is read in place, or pointers to bf16 rows read
// in place), their scores S[j][h] (then probabilities, P2 as bf16 pairs), and per head the running max m, sum l and
// the block's rescaling alpha; over an int8 cache also the query's latent part as int8 (q8, from one head's qrow at a
// time: load_query_int8) and its scales qs, the block's latent transposed for the scores (KT, with kcorr and kscale;
// ST: their latent part: scores_int8) and for the values (CT), and the probabilities as bytes (PH, PL and their
// weights whi, wlo: values_int8). HP: H rounded up to 16 lanes.
struct Scratch {
  std::vector<float> qT, keys, S, m, l, alpha, qs, whi, wlo, kscale, ST;
  std::vector<uint32_t> qT2, P2, PH, PL;
  std::vector<int32_t> kcorr;
  std::vector<const uint16_t*> kp;
  std::vector<uint8_t> q8, CT, KT;
  std::vector<int8_t> qrow;

  Scratch(bool pairs, bool in_place, bool int8, int64_t R, int64_t W, int64_t HP)
      : qT(pairs ? 0 : W * HP), keys(pairs || in_place ? 0 : KEYS * W), S(KEYS * HP), m(HP), l(HP), alpha(HP),
        qs(int8 ? HP : 0), whi(int8 ? HP : 0), wlo(int8 ? HP : 0), qT2(pairs ? W / 2 * HP : 0),
        P2(pairs ? KEYS / 2 * HP : 0), PH(int8 ? KEYS / 4 * HP : 0), PL(int8 ? KEYS / 4 * HP : 0), kp(KEYS),
        kscale(int8 ? KEYS : 0), ST(int8 ? HP * KEYS : 0), kcorr(int8 ? KEYS : 0), q8(int8 ? R * HP : 0),
        CT(int8 ? (R + 63) / 64 * 64 * KEYS : 0), KT(int8 ? R * KEYS : 0), qrow(int8 ? R : 0) {}
};

// The query row q [H, W] scaled into the log2 domain and transposed, so one vector of heads multiplies each key value.
void load_query(const float* q, int64_t H, int64_t W, int64_t HP, float qscale, bool pairs, Scratch& s) {
  std::fill(s.qT.begin(), s.qT.end(), 0.f);
  std::fill(s.qT2.begin(), s.qT2.end(), 0u);
  for (int64_t h = 0; h < H; ++h)
    for (int64_t d = 0; d < W; ++d) {
      const float v = q[h * W + d] * qscale;
      if (pairs)
        s.qT2[d / 2 * HP + h] |= uint32_t(bf16_bits(v)) << (16 * (d % 2));
      else
        s.qT[d * HP + h] = v;
    }
}

// The query's latent part q[h][0:R] as int8 for the scores over an int8 cache, per head as quantize_row rounds a
// prompt's activations (kernels/cpu.py quantize_tokens_reference). With VNNI the scores take q8 + 128 (vpdpbusd's
// operand is unsigned; transpose_keys' kcorr takes the 128 back off), packed four values to a head's lane,
// q8[(d / 4 * HP + h) * 4 + d % 4] (R is a multiple of 4: cache_format.py), and qs = the scale in the log2 domain;
// elsewhere q8 times the scale replaces the latent part of qT, so that every CPU computes the same scores.
void load_query_int8(const float* q, int64_t H, int64_t R, int64_t W, int64_t HP, float qscale, Scratch& s) {
  for (int64_t h = 0; h < H; ++h) {
    float scale;
    quantize_row(q + h * W, R, s.qrow.data(), &scale);
    s.qs[h] = scale * qscale;
#ifdef MLA_AVX512
    for (int64_t g = 0; g < R / 4; ++g) {  // + 128 on each byte
      uint32_t word;
      std::memcpy(&word, s.qrow.data() + 4 * g, 4);
      word ^= 0x80808080u;
      std::memcpy(s.q8.data() + (g * HP + h) * 4, &word, 4);
    }
#else
    for (int64_t d = 0; d < R; ++d) s.qT[d * HP + h] = s.qrow[d] * s.qs[h];
#endif
  }
}

// Keys kb:kb+nk of sequence b (one run): pointers to the bf16 rows in place (pairs), or float32 rows: a float32
// cache's own, or the rows converted into the scratch (with VNNI, of int8 rows only k_pe: the int8 products read
// the latent in place).
const float* gather_keys(const KeyReader& kr, int64_t b, int64_t kb, int64_t nk, int64_t W, bool pairs, bool int8,
                         Scratch& s) {
  if (kr.kind == CacheKind::FLOAT32) return reinterpret_cast<const float*>(kr.row(b, kb));
#ifndef MLA_AVX512
  int8 = false;
#endif
  for (int64_t j = 0; j < nk; ++j) {
    if (pairs)
      s.kp[j] = reinterpret_cast<const uint16_t*>(kr.row(b, kb + j));
    else
      kr.read(b, kb + j, s.keys.data() + j * W, !int8);
  }
  return s.keys.data();
}

#ifdef MLA_AVX512
inline __m512i bcast32(const void* p) {  // one 32-bit word (two bf16, four bytes) in every lane
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
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
      const __m512i q = _mm512_loadu_si512(qT2 + p * HP + hc);
      a0 = dpbf16(a0, q, bcast32(kp[j] + 2 * p));
      a1 = dpbf16(a1, q, bcast32(kp[j + 1] + 2 * p));
      a2 = dpbf16(a2, q, bcast32(kp[j + 2] + 2 * p));
      a3 = dpbf16(a3, q, bcast32(kp[j + 3] + 2 * p));
    }
    _mm512_storeu_ps(S + j * HP + hc, a0);
    _mm512_storeu_ps(S + (j + 1) * HP + hc, a1);
    _mm512_storeu_ps(S + (j + 2) * HP + hc, a2);
    _mm512_storeu_ps(S + (j + 3) * HP + hc, a3);
  }
  for (; j < nk; ++j) {
    __m512 a0 = _mm512_setzero_ps();
    for (int64_t p = 0; p < W / 2; ++p)
      a0 = dpbf16(a0, _mm512_loadu_si512(qT2 + p * HP + hc), bcast32(kp[j] + 2 * p));
    _mm512_storeu_ps(S + j * HP + hc, a0);
  }
}

// Scores of JT float32 key rows kj[u * W] for heads hc..hc+15 over the values d0:d1, added to S[u * HP + hc] (set
// when d0 = 0). Each load of 16 heads' q[d] serves JT multiply-adds, and JT independent sums keep both FMA units busy.
// WK: the row width when known at compile time (else 0, and W is read at run time): the JT rows are then constant
// offsets from one pointer, where a run-time width needs more address registers than there are and spills them.
template <int JT, int64_t WK>
inline void score_keys(const float* qT, const float* kj, int64_t W, int64_t HP, int64_t hc, int64_t d0, int64_t d1,
                       float* S) {
  if (WK) W = WK;
  __m512 a[JT];
  for (int u = 0; u < JT; ++u) a[u] = d0 == 0 ? _mm512_setzero_ps() : _mm512_loadu_ps(S + u * HP + hc);
  for (int u = 0; u < JT; ++u)  // the rows' next 64 values, from memory into L1 while these are scored
    for (int64_t d = d1; d < std::min(W, d1 + 64); d += 16)
      _mm_prefetch(reinterpret_cast<const char*>(kj + u * W + d), _MM_HINT_T0);
  for (int64_t d = d0; d < d1; ++d) {
    const __m512 q = _mm512_loadu_ps(qT + d * HP + hc);
    for (int u = 0; u < JT; ++u) a[u] = _mm512_fmadd_ps(q, _mm512_set1_ps(kj[u * W + d]), a[u]);
  }
  for (int u = 0; u < JT; ++u) _mm512_storeu_ps(S + u * HP + hc, a[u]);
}

// Scores of nk float32 key rows keys[j] for heads hc..hc+15: S[j * HP + hc + h] = q_h . k_j, 16 keys at a time over
// 64 values of the rows at a time, so that the part of q they meet (4 KiB) stays in L1 while the keys stream past.
template <int64_t WK>
void scores_f32(const float* qT, const float* keys, int64_t nk, int64_t W, int64_t HP, int64_t hc, int64_t from,
                float* S) {
  constexpr int64_t DC = 64;
  for (int64_t d0 = from; d0 < W; d0 += DC) {
    const int64_t d1 = std::min(W, d0 + DC);
    int64_t j = 0;
    for (; j + 16 <= nk; j += 16) score_keys<16, WK>(qT, keys + j * W, W, HP, hc, d0, d1, S + j * HP);
    for (; j + 4 <= nk; j += 4) score_keys<4, WK>(qT, keys + j * W, W, HP, hc, d0, d1, S + j * HP);
    for (; j < nk; ++j) score_keys<1, WK>(qT, keys + j * W, W, HP, hc, d0, d1, S + j * HP);
  }
}

// from > 0: over the values from:W only, added to S (k_pe's part, after an int8 cache's latent part)
void scores_f32(const float* qT, const float* keys, int64_t nk, int64_t W, int64_t HP, int64_t hc, float* S,
                int64_t from = 0) {
  if (W == DEEPSEEK_ROW)
    scores_f32<DEEPSEEK_ROW>(qT, keys, nk, W, HP, hc, from, S);
  else
    scores_f32<0>(qT, keys, nk, W, HP, hc, from, S);
}

// The scores over an int8 cache, their latent part on int8: keys along the lanes, so that each step of the product
// takes HT broadcasts of the query's bytes and four loads of 16 keys' bytes for 4 HT vpdpbusd (heads along the lanes
// would take a broadcast of each key's bytes per vpdpbusd, which holds them to half their rate:
// bench/instr_rate_cpu.cpp). The block's latent is transposed for it once.

// The block's latent, keys along the lanes: KT[(p * 4 + g) * 64 + 4 i + k] = c_{16 g + i}[4 p + k] (zero past nk),
// with each key's 128 x its latent's sum (what the +128 on the query's bytes adds: kcorr) and its scale (kscale).
void transpose_keys(const uint8_t* rows, int64_t RB, int64_t nk, int64_t R, Scratch& s) {
  const __m512i ones = _mm512_set1_epi8(1), zero = _mm512_setzero_si512();
  for (int64_t g = 0; g * 16 < nk; ++g) {
    __m512i sum = zero;
    for (int64_t d = 0; d < R; d += 64) {
      __m512i r[16];
      for (int i = 0; i < 16; ++i)
        r[i] = 16 * g + i < nk ? _mm512_maskz_loadu_epi8(tail_mask64(R - d), rows + (16 * g + i) * RB + d) : zero;
      transpose16(r);  // r[w]: values d + 4w .. d + 4w + 3 of the 16 keys
      for (int w = 0; w < 16 && d + 4 * w < R; ++w) {
        _mm512_storeu_si512(s.KT.data() + ((d / 4 + w) * 4 + g) * 64, r[w]);
        MLA_DPBUSD(sum, ones, r[w]);
      }
    }
    _mm512_storeu_si512(s.kcorr.data() + 16 * g, _mm512_slli_epi32(sum, 7));
    for (int64_t i = 0; i < 16; ++i)
      if (16 * g + i < nk) std::memcpy(&s.kscale[16 * g + i], rows + (16 * g + i) * RB + R, 4);
      else s.kscale[16 * g + i] = 0.f;
  }
}

// The latent part of the scores of heads h0..h0+HT-1 over the block's first 16 NG key slots:
// ST[h * KEYS + j] = qs_h * s_j * (q8_h . c_j) (slots past nk: what their zeros give). Not inlined: inlined into
// attend's loop, the sums went to the stack and back on every step.
template <int HT, int NG>
__attribute__((noinline)) void scores_latent_int8(const Scratch& s, int64_t R, int64_t HP, int64_t h0, float* ST) {
  __m512i a[HT][NG];
#pragma GCC unroll 16  // every loop over the sums unrolled before GCC places them (else they stay in memory)
  for (int u = 0; u < HT; ++u)
#pragma GCC unroll 4
    for (int g = 0; g < NG; ++g) a[u][g] = _mm512_setzero_si512();
  for (int64_t p = 0; p < R / 4; ++p) {
    __m512i k[NG];
#pragma GCC unroll 4
    for (int g = 0; g < NG; ++g) k[g] = _mm512_loadu_si512(s.KT.data() + (p * 4 + g) * 64);
#pragma GCC unroll 16
    for (int u = 0; u < HT; ++u) {
      const __m512i q = bcast32(s.q8.data() + (p * HP + h0 + u) * 4);
#pragma GCC unroll 4
      for (int g = 0; g < NG; ++g) MLA_DPBUSD(a[u][g], q, k[g]);
    }
  }
#pragma GCC unroll 16
  for (int u = 0; u < HT; ++u) {
    const __m512 qs = _mm512_set1_ps(s.qs[h0 + u]);
#pragma GCC unroll 4
    for (int g = 0; g < NG; ++g) {  // the sum is exact in float32
      const __m512i dot = _mm512_sub_epi32(a[u][g], _mm512_loadu_si512(s.kcorr.data() + 16 * g));
      _mm512_storeu_ps(ST + (h0 + u) * KEYS + 16 * g,
                       _mm512_mul_ps(_mm512_cvtepi32_ps(dot),
                                     _mm512_mul_ps(qs, _mm512_loadu_ps(s.kscale.data() + 16 * g))));
    }
  }
}

// All HP heads' scores over nk int8 rows: S[j * HP + h] = qs_h * s_j * (q8_h . c_j) + q_pe_h . k_pe_j (0 for the
// padding heads), k_pe_j from the float32 rows keys[j * W + R ..].
void scores_int8(Scratch& s, const uint8_t* rows, int64_t RB, const float* keys, int64_t nk, int64_t H, int64_t HP,
                 int64_t R, int64_t W) {
  transpose_keys(rows, RB, nk, R, s);
  auto heads = [&](auto ng) {  // the groups of 16 keys the run fills (a short run: fewer products)
    constexpr int NG = decltype(ng)::value;
    int64_t h0 = 0;
    for (; h0 + 4 <= H; h0 += 4) scores_latent_int8<4, NG>(s, R, HP, h0, s.ST.data());
    for (; h0 < H; ++h0) scores_latent_int8<1, NG>(s, R, HP, h0, s.ST.data());
  };
  switch ((nk + 15) / 16) {
    case 1: heads(std::integral_constant<int, 1>()); break;
    case 2: heads(std::integral_constant<int, 2>()); break;
    case 3: heads(std::integral_constant<int, 3>()); break;
    default: heads(std::integral_constant<int, 4>());
  }
  for (int64_t hc = 0; hc < HP; hc += 16)  // ST [h][KEYS] -> S [j][HP] (0 for the padding heads), 16 x 16 at a time
    for (int64_t j0 = 0; j0 < nk; j0 += 16) {
      __m512i r[16];
      for (int i = 0; i < 16; ++i)
        r[i] = hc + i < H ? _mm512_loadu_si512(s.ST.data() + (hc + i) * KEYS + j0) : _mm512_setzero_si512();
      transpose16(r);
      for (int w = 0; w < 16 && j0 + w < nk; ++w) _mm512_storeu_si512(s.S.data() + (j0 + w) * HP + hc, r[w]);
    }
  for (int64_t hc = 0; hc < HP; hc += 16) scores_f32(s.qT.data(), keys, nk, W, HP, hc, s.S.data(), R);  // + k_pe's
}

// The values over an int8 cache on int8 too: acc[h] = acc[h] * alpha[h] + sum_j p_j[h] s_j c_j, with s_j the row's
// scale, c_j its int8 latent. vpdpbusd multiplies unsigned by signed bytes, so the probabilities times the scales
// become 16-bit fractions of their largest in the block per head, taken as two bytes (a high and a low pass), and
// the latent is held transposed, a column's four keys in each 32-bit lane: each instruction then adds four keys'
// products to 16 columns of one head. Two passes of 64 multiply-adds per instruction: twice float32's rate.

// The block's latent transposed: CT[(cc * NQ + q) * 64 + 4 * i + k] = c_{4q + k}[16 cc + i], NQ = ceil(nk / 4)
// (zero past nk and R).
void transpose_latent(const uint8_t* rows, int64_t RB, int64_t nk, int64_t R, uint8_t* CT) {
  const int64_t NQ = (nk + 3) / 4;
  for (int64_t c = 0; c < R; c += 64) {
    const __mmask64 mk = tail_mask64(R - c);
    for (int64_t q = 0; q < NQ; ++q) {
      __m512i r[4];
      for (int k = 0; k < 4; ++k)
        r[k] = 4 * q + k < nk ? _mm512_maskz_loadu_epi8(mk, rows + (4 * q + k) * RB + c) : _mm512_setzero_si512();
      // per 128-bit lane L: a, b = columns 16L..16L+7, 16L+8..16L+15 of keys 0, 1 interleaved; e, f of keys 2, 3
      const __m512i a = _mm512_unpacklo_epi8(r[0], r[1]), b = _mm512_unpackhi_epi8(r[0], r[1]);
      const __m512i e = _mm512_unpacklo_epi8(r[2], r[3]), f = _mm512_unpackhi_epi8(r[2], r[3]);
      // z[k], lane L: columns 16L + 4k .. 16L + 4k + 3, four keys each; then lanes transposed: n[L] = columns 16L..
      const __m512i z0 = _mm512_unpacklo_epi16(a, e), z1 = _mm512_unpackhi_epi16(a, e);
      const __m512i z2 = _mm512_unpacklo_epi16(b, f), z3 = _mm512_unpackhi_epi16(b, f);
      const __m512i t0 = _mm512_shuffle_i32x4(z0, z1, 0x44), t1 = _mm512_shuffle_i32x4(z0, z1, 0xEE);
      const __m512i t2 = _mm512_shuffle_i32x4(z2, z3, 0x44), t3 = _mm512_shuffle_i32x4(z2, z3, 0xEE);
      const __m512i n[4] = {_mm512_shuffle_i32x4(t0, t2, 0x88), _mm512_shuffle_i32x4(t0, t2, 0xDD),
                            _mm512_shuffle_i32x4(t1, t3, 0x88), _mm512_shuffle_i32x4(t1, t3, 0xDD)};
      for (int L = 0; L < 4; ++L) _mm512_storeu_si512(CT + ((c / 16 + L) * NQ + q) * 64, n[L]);
    }
  }
}

// The block's probabilities for heads hc..hc+15 times the rows' scales, as 16-bit fractions of the largest per head
// (wlo = largest / 65535, the low byte's weight; whi = 256 wlo), high and low bytes packed four keys to a head's lane:
// PH[q * HP + h] byte k = the high byte of key 4q + k's (zero past nk).
void quantize_probs(const float* S, int64_t nk, int64_t HP, int64_t hc, Scratch& s) {
  auto scaled = [&](int64_t j) {  // the rows' scales as transpose_keys took them
    return _mm512_mul_ps(_mm512_loadu_ps(S + j * HP + hc), _mm512_set1_ps(s.kscale[j]));
  };
  __m512 mx = _mm512_setzero_ps();
  for (int64_t j = 0; j < nk; ++j) mx = _mm512_max_ps(mx, scaled(j));
  const __mmask16 live = _mm512_cmp_ps_mask(mx, _mm512_setzero_ps(), _CMP_GT_OQ);
  const __m512 to16 = _mm512_maskz_div_ps(live, _mm512_set1_ps(65535.f), mx);
  const __m512 unit = _mm512_mul_ps(mx, _mm512_set1_ps(1.f / 65535.f));
  _mm512_storeu_ps(s.wlo.data() + hc, unit);
  _mm512_storeu_ps(s.whi.data() + hc, _mm512_mul_ps(unit, _mm512_set1_ps(256.f)));
  const __m512i byte = _mm512_set1_epi32(255);
  for (int64_t q = 0; q < (nk + 3) / 4; ++q) {
    __m512i hi = _mm512_setzero_si512(), lo = hi;
    for (int k = 0; k < 4 && 4 * q + k < nk; ++k) {
      const __m512i p16 = _mm512_cvtps_epi32(_mm512_mul_ps(scaled(4 * q + k), to16));  // nearest, <= 65535
      hi = _mm512_or_si512(hi, _mm512_slli_epi32(_mm512_srli_epi32(p16, 8), 8 * k));
      lo = _mm512_or_si512(lo, _mm512_slli_epi32(_mm512_and_si512(p16, byte), 8 * k));
    }
    _mm512_storeu_si512(s.PH.data() + q * HP + hc, hi);
    _mm512_storeu_si512(s.PL.data() + q * HP + hc, lo);
  }
}

// One pass (the probabilities' high or low bytes P) for HT heads from h0 over the latent columns c..c+63 (ct: their
// four transposed chunks, NQ * 64 bytes apart): the int32 sums, times w per head, added to acc (scaled by alpha first
// when `first`). Each step takes HT broadcasts and four loads for 4 HT vpdpbusd: a broadcast from memory per
// vpdpbusd held them to about half their rate (bench/instr_rate_cpu.cpp). Not inlined, for the reason of scores_int8.
template <int HT>
__attribute__((noinline)) void values_pass(const uint8_t* ct, const uint32_t* P, int64_t NQ, int64_t HP, int64_t h0,
                                           int64_t R, int64_t c, const float* w, const float* alpha, bool first,
                                           float* acc) {
  __m512i a[HT][4];
#pragma GCC unroll 16
  for (int u = 0; u < HT; ++u)
#pragma GCC unroll 4
    for (int z = 0; z < 4; ++z) a[u][z] = _mm512_setzero_si512();
  for (int64_t q = 0; q < NQ; ++q) {
    __m512i k4[4];
#pragma GCC unroll 4
    for (int z = 0; z < 4; ++z) k4[z] = _mm512_loadu_si512(ct + (z * NQ + q) * 64);
#pragma GCC unroll 16
    for (int u = 0; u < HT; ++u) {
      const __m512i p = bcast32(P + q * HP + h0 + u);
#pragma GCC unroll 4
      for (int z = 0; z < 4; ++z) MLA_DPBUSD(a[u][z], p, k4[z]);
    }
  }
#pragma GCC unroll 16
  for (int u = 0; u < HT; ++u) {
    const __m512 wu = _mm512_set1_ps(w[h0 + u]), au = _mm512_set1_ps(alpha[h0 + u]);
#pragma GCC unroll 4
    for (int z = 0; z < 4; ++z) {
      const __mmask16 mk = tail_mask16(std::max<int64_t>(0, R - c - 16 * z));  // chunks past R: zeros, not stored
      float* o = acc + (h0 + u) * R + c + 16 * z;
      __m512 old = _mm512_maskz_loadu_ps(mk, o);
      if (first) old = _mm512_mul_ps(old, au);
      _mm512_mask_storeu_ps(o, mk, _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[u][z]), wu, old));
    }
  }
}

void values_int8(Scratch& s, const uint8_t* rows, int64_t RB, int64_t nk, int64_t H, int64_t HP, int64_t R,
                 float* acc) {
  transpose_latent(rows, RB, nk, R, s.CT.data());
  for (int64_t hc = 0; hc < HP; hc += 16) quantize_probs(s.S.data(), nk, HP, hc, s);
  const int64_t NQ = (nk + 3) / 4;
  const float* whi = s.whi.data();
  const float* wlo = s.wlo.data();
  for (int64_t c = 0; c < R; c += 64) {  // CT holds whole groups of 64 columns
    const uint8_t* ct = s.CT.data() + c / 16 * NQ * 64;
    int64_t h0 = 0;
    for (; h0 + 4 <= H; h0 += 4) {
      values_pass<4>(ct, s.PH.data(), NQ, HP, h0, R, c, whi, s.alpha.data(), true, acc);
      values_pass<4>(ct, s.PL.data(), NQ, HP, h0, R, c, wlo, s.alpha.data(), false, acc);
    }
    for (; h0 < H; ++h0) {
      values_pass<1>(ct, s.PH.data(), NQ, HP, h0, R, c, whi, s.alpha.data(), true, acc);
      values_pass<1>(ct, s.PL.data(), NQ, HP, h0, R, c, wlo, s.alpha.data(), false, acc);
    }
  }
}

// The online softmax for heads hc..hc+15 over a block of nk scores: the block's max, the old sum rescaled by
// alpha = 2^(old max - new max), the scores turned into probabilities in place and added to the sum.
void softmax_update(float* S, int64_t nk, int64_t HP, int64_t hc, float* m, float* l, float* alpha) {
  const __m512 old = _mm512_loadu_ps(m + hc);
  __m512 mx = old;
  for (int64_t j = 0; j < nk; ++j) mx = _mm512_max_ps(mx, _mm512_loadu_ps(S + j * HP + hc));
  const __m512 a = exp2_ps(_mm512_sub_ps(old, mx));  // old = -inf: 0
  __m512 lv = _mm512_mul_ps(_mm512_loadu_ps(l + hc), a);
  for (int64_t j = 0; j < nk; ++j) {
    const __m512 p = exp2_ps(_mm512_sub_ps(_mm512_loadu_ps(S + j * HP + hc), mx));
    _mm512_storeu_ps(S + j * HP + hc, p);
    lv = _mm512_add_ps(lv, p);
  }
  _mm512_storeu_ps(l + hc, lv);
  _mm512_storeu_ps(m + hc, mx);
  _mm512_storeu_ps(alpha + hc, a);
}

// The probabilities of key pairs as bf16 pairs, P2[j / 2 * HP + h] = (p_j[h], p_j+1[h]), what accumulate_bf16 reads.
void probs_as_pairs(const float* S, int64_t nk, int64_t HP, uint32_t* P2) {
  for (int64_t j = 0; j < nk; j += 2)
    for (int64_t h = 0; h < HP; ++h)
      P2[j / 2 * HP + h] = bf16_bits(S[j * HP + h]) | (j + 1 < nk ? uint32_t(bf16_bits(S[(j + 1) * HP + h])) << 16 : 0u);
}

// acc[h] = acc[h] * alpha[h] + sum_j p_j[h] * c_kv_j (the first R values of key row j) for the H heads, with p given
// as bf16 pairs P2[jp * HP + h] = (p_2jp[h], p_2jp+1[h]). Per 16 values of R, two key rows are interleaved into one
// vector of pairs and 16 heads' sums are kept in registers.
void accumulate_bf16(const uint32_t* P2, const uint16_t* const* kp, int64_t nk, int64_t H, int64_t HP, int64_t R,
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
        const __m512i v = _mm512_or_si512(lo, hi);
        const uint32_t* pp = P2 + (j / 2) * HP + h0;
        for (int u = 0; u < 16; ++u) a[u] = dpbf16(a[u], v, bcast32(pp + u));
      }
      for (int u = 0; u < 16; ++u)
        if (u < nh) _mm512_mask_storeu_ps(acc + (h0 + u) * R + c, mk, a[u]);
    }
  }
}

// acc[h] = acc[h] * alpha[h] + sum_j p[j][h] * c_kv_j over float32 key rows for heads h0..h0+HT-1 and the latent
// values c..c+16*CV-1 (masked past R): per key, CV loads of its row and HT broadcasts of its probabilities feed
// HT x CV multiply-adds into sums held in registers.
template <int HT, int CV>
inline void accumulate_tile(const float* S, const float* keys, int64_t nk, int64_t HP, int64_t R, int64_t W, int64_t h0,
                            int64_t c, const float* alpha, float* acc) {
  __mmask16 mk[CV];
  __m512 v[HT][CV];
  for (int z = 0; z < CV; ++z) mk[z] = tail_mask16(std::max<int64_t>(0, R - c - 16 * z));
  for (int u = 0; u < HT; ++u)
    for (int z = 0; z < CV; ++z)
      v[u][z] = _mm512_mul_ps(_mm512_maskz_loadu_ps(mk[z], acc + (h0 + u) * R + c + 16 * z),
                              _mm512_set1_ps(alpha[h0 + u]));
  for (int64_t j = 0; j < nk; ++j) {
    __m512 kv[CV];
    for (int z = 0; z < CV; ++z) kv[z] = _mm512_maskz_loadu_ps(mk[z], keys + j * W + c + 16 * z);
    const float* sj = S + j * HP + h0;
    for (int u = 0; u < HT; ++u) {
      const __m512 p = _mm512_set1_ps(sj[u]);
      for (int z = 0; z < CV; ++z) v[u][z] = _mm512_fmadd_ps(p, kv[z], v[u][z]);
    }
  }
  for (int u = 0; u < HT; ++u)
    for (int z = 0; z < CV; ++z) _mm512_mask_storeu_ps(acc + (h0 + u) * R + c + 16 * z, mk[z], v[u][z]);
}

// The values of a block over float32 key rows: tiles of 8 heads x 32 latent values (heads past a multiple of 8: one
// at a time).
void accumulate_f32(const float* S, const float* keys, int64_t nk, int64_t H, int64_t HP, int64_t R, int64_t W,
                    const float* alpha, float* acc) {
  for (int64_t c = 0; c < R; c += 32) {
    int64_t h0 = 0;
    for (; h0 + 8 <= H; h0 += 8) accumulate_tile<8, 2>(S, keys, nk, HP, R, W, h0, c, alpha, acc);
    for (; h0 < H; ++h0) accumulate_tile<1, 2>(S, keys, nk, HP, R, W, h0, c, alpha, acc);
  }
}
#elif defined(MLA_AVX2)
// The float32 path above with 8 heads per vector (AVX2): scores, the online-softmax update, the values.
void scores_f32(const float* qT, const float* keys, int64_t nk, int64_t W, int64_t HP, int64_t hc, float* S) {
  for (int64_t j = 0; j < nk; ++j) {
    const float* kj = keys + j * W;
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int64_t d = 0;
    for (; d + 2 <= W; d += 2) {
      s0 = _mm256_fmadd_ps(_mm256_loadu_ps(qT + d * HP + hc), _mm256_set1_ps(kj[d]), s0);
      s1 = _mm256_fmadd_ps(_mm256_loadu_ps(qT + (d + 1) * HP + hc), _mm256_set1_ps(kj[d + 1]), s1);
    }
    if (d < W) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(qT + d * HP + hc), _mm256_set1_ps(kj[d]), s0);
    _mm256_storeu_ps(S + j * HP + hc, _mm256_add_ps(s0, s1));
  }
}

void softmax_update(float* S, int64_t nk, int64_t HP, int64_t hc, float* m, float* l, float* alpha) {
  const __m256 old = _mm256_loadu_ps(m + hc);
  __m256 mx = old;
  for (int64_t j = 0; j < nk; ++j) mx = _mm256_max_ps(mx, _mm256_loadu_ps(S + j * HP + hc));
  const __m256 a = exp2_ps(_mm256_sub_ps(old, mx));  // old = -inf: about 0
  __m256 lv = _mm256_mul_ps(_mm256_loadu_ps(l + hc), a);
  for (int64_t j = 0; j < nk; ++j) {
    const __m256 p = exp2_ps(_mm256_sub_ps(_mm256_loadu_ps(S + j * HP + hc), mx));
    _mm256_storeu_ps(S + j * HP + hc, p);
    lv = _mm256_add_ps(lv, p);
  }
  _mm256_storeu_ps(l + hc, lv);
  _mm256_storeu_ps(m + hc, mx);
  _mm256_storeu_ps(alpha + hc, a);
}

void accumulate_f32(const float* S, const float* keys, int64_t nk, int64_t H, int64_t HP, int64_t R, int64_t W,
                    const float* alpha, float* acc) {
  for (int64_t h = 0; h < H; ++h) {
    const __m256 a = _mm256_set1_ps(alpha[h]);
    float* ah = acc + h * R;
    int64_t c = 0;
    for (; c + 8 <= R; c += 8) {
      __m256 v = _mm256_mul_ps(_mm256_loadu_ps(ah + c), a);
      for (int64_t j = 0; j < nk; ++j)
        v = _mm256_fmadd_ps(_mm256_set1_ps(S[j * HP + h]), _mm256_loadu_ps(keys + j * W + c), v);
      _mm256_storeu_ps(ah + c, v);
    }
    for (; c < R; ++c) {
      float v = ah[c] * alpha[h];
      for (int64_t j = 0; j < nk; ++j) v += S[j * HP + h] * keys[j * W + c];
      ah[c] = v;
    }
  }
}
#else
// The portable loops, per head: scores, the online-softmax update, the values.
void scores_scalar(const float* qT, const float* keys, int64_t nk, int64_t H, int64_t W, int64_t HP, float* S) {
  for (int64_t h = 0; h < H; ++h)
    for (int64_t j = 0; j < nk; ++j) {
      float sv = 0.f;
      for (int64_t d = 0; d < W; ++d) sv += qT[d * HP + h] * keys[j * W + d];
      S[j * HP + h] = sv;
    }
}

void softmax_update_scalar(float* S, int64_t nk, int64_t H, int64_t HP, float* m, float* l, float* alpha) {
  for (int64_t h = 0; h < H; ++h) {
    float mx = m[h];
    for (int64_t j = 0; j < nk; ++j) mx = std::max(mx, S[j * HP + h]);
    const float a = std::exp2(m[h] - mx);
    l[h] *= a;
    for (int64_t j = 0; j < nk; ++j) {
      S[j * HP + h] = std::exp2(S[j * HP + h] - mx);
      l[h] += S[j * HP + h];
    }
    m[h] = mx;
    alpha[h] = a;
  }
}

void accumulate_scalar(const float* S, const float* keys, int64_t nk, int64_t H, int64_t HP, int64_t R, int64_t W,
                   const float* alpha, float* acc) {
  for (int64_t h = 0; h < H; ++h)
    for (int64_t c = 0; c < R; ++c) {
      float v = acc[h * R + c] * alpha[h];
      for (int64_t j = 0; j < nk; ++j) v += S[j * HP + h] * keys[j * W + c];
      acc[h * R + c] = v;
    }
}
#endif

// One block of nk keys for one query row: scores, the online-softmax update, the values into acc [H, R]. keys: the
// float32 rows; rows: the cache's own, RB bytes apart (read by the int8 scores).
void attend_block(Scratch& s, const float* keys, const uint8_t* rows, int64_t RB, int64_t nk, int64_t H, int64_t HP,
                  int64_t R, int64_t W, bool pairs, bool int8, float* acc) {
#ifdef MLA_AVX512
  if (int8) scores_int8(s, rows, RB, keys, nk, H, HP, R, W);
  for (int64_t hc = 0; hc < HP; hc += 16) {
    if (pairs)
      scores_bf16(s.qT2.data(), s.kp.data(), nk, W, HP, hc, s.S.data());
    else if (!int8)
      scores_f32(s.qT.data(), keys, nk, W, HP, hc, s.S.data());
    softmax_update(s.S.data(), nk, HP, hc, s.m.data(), s.l.data(), s.alpha.data());
  }
  if (pairs) {
    probs_as_pairs(s.S.data(), nk, HP, s.P2.data());
    accumulate_bf16(s.P2.data(), s.kp.data(), nk, H, HP, R, s.alpha.data(), acc);
  } else if (int8) {
    values_int8(s, rows, RB, nk, H, HP, R, acc);
  } else {
    accumulate_f32(s.S.data(), keys, nk, H, HP, R, W, s.alpha.data(), acc);
  }
#elif defined(MLA_AVX2)
  (void)pairs, (void)int8, (void)rows, (void)RB;  // int8: the query's dequantized int8 values are in qT
  for (int64_t hc = 0; hc < HP; hc += 8) {
    scores_f32(s.qT.data(), keys, nk, W, HP, hc, s.S.data());
    softmax_update(s.S.data(), nk, HP, hc, s.m.data(), s.l.data(), s.alpha.data());
  }
  accumulate_f32(s.S.data(), keys, nk, H, HP, R, W, s.alpha.data(), acc);
#else
  (void)pairs, (void)int8, (void)rows, (void)RB;
  scores_scalar(s.qT.data(), keys, nk, H, W, HP, s.S.data());
  softmax_update_scalar(s.S.data(), nk, H, HP, s.m.data(), s.l.data(), s.alpha.data());
  accumulate_scalar(s.S.data(), keys, nk, H, HP, R, W, s.alpha.data(), acc);
#endif
}

// Query token i of split sp: its unnormalised output acc [H, R] and per head (max, sum) ml [H, 2] over the split's
// keys up to the query's own position (causal).
void attend_query(const KeyReader& kr, const Split& sp, const float* q, int64_t i, int64_t start, int64_t H, int64_t HP,
                  int64_t R, int64_t W, float qscale, bool pairs, bool int8, Scratch& s, float* acc, float* ml) {
  load_query(q, H, W, HP, qscale, pairs, s);
  if (int8) load_query_int8(q, H, R, W, HP, qscale, s);
  std::fill(acc, acc + H * R, 0.f);
  std::fill(s.m.begin(), s.m.end(), -INFINITY);
  std::fill(s.l.begin(), s.l.end(), 0.f);
  const int64_t kend = std::min(sp.k1, start + i + 1);  // causal: keys up to the query's position
  for (int64_t kb = sp.k0, nk; kb < kend; kb += nk) {  // runs of at most KEYS keys
    nk = kr.run(kb, std::min(KEYS, kend - kb));
    const float* keys = gather_keys(kr, sp.b, kb, nk, W, pairs, int8, s);
    attend_block(s, keys, kr.row(sp.b, kb), kr.row_bytes, nk, H, HP, R, W, pairs, int8, acc);
  }
  for (int64_t h = 0; h < H; ++h) {
    ml[h * 2] = s.m[h];
    ml[h * 2 + 1] = s.l[h];
  }
}

// Each query token's splits merged by their log-sum-exp into O [T, H, R].
void merge_splits(const SplitPlan& plan, const int32_t* CU, int64_t B, int64_t H, int64_t R, const float* ACC,
                  const float* ML, float* O) {
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t q0 = CU[b], nq = CU[b + 1] - q0;
      for (int64_t i = 0; i < nq; ++i)
        for (int64_t h = 0; h < H; ++h) {
          float M = -INFINITY;
          for (int64_t t : plan.of_sequence[b]) M = std::max(M, ML[((plan.splits[t].row + i) * H + h) * 2]);
          float den = 0.f;
          float* o = O + ((q0 + i) * H + h) * R;
          std::fill(o, o + R, 0.f);
          for (int64_t t : plan.of_sequence[b]) {
            const float* ml = ML + ((plan.splits[t].row + i) * H + h) * 2;
            if (ml[1] == 0.f) continue;  // a split past the query's position
            const float w = std::exp2(ml[0] - M);
            den += w * ml[1];
            const float* a = ACC + ((plan.splits[t].row + i) * H + h) * R;
            for (int64_t c = 0; c < R; ++c) o[c] += w * a[c];
          }
          for (int64_t c = 0; c < R; ++c) o[c] /= den;
        }
    }
  });
}

// O [T, H, R] float32 = softmax(scale * (q_lat . c_kv + q_pe . k_pe)) . c_kv per head, each query token over its
// sequence's cached tokens up to its own position (kernels/reference.py mla_decode); Q [T, H, R + DR] float32 is
// [q_lat | q_pe]; bf16_model: the model's activations are bf16 (a float32 model keeps its query in float32).
void attend(const float* Q, int64_t T, int64_t H, int64_t R, int64_t DR, const torch::Tensor& cache,
            const torch::Tensor& block_tables, const torch::Tensor& cu_seqlens_q, const torch::Tensor& seq_lens,
            double scale, CacheKind kind, bool bf16_model, float* O) {
  TORCH_CHECK(cache.dim() == 3 && cache.is_contiguous(), "the cache must be contiguous [blocks, block_size, width]");
  const int64_t W = R + DR, B = block_tables.size(0), HP = (H + 15) / 16 * 16;
  auto bt = block_tables.to(torch::kInt32).contiguous();
  auto cu = cu_seqlens_q.to(torch::kInt32).contiguous();
  auto lens = seq_lens.to(torch::kInt32).contiguous();
  const int32_t* CU = cu.data_ptr<int32_t>();
  const int32_t* LEN = lens.data_ptr<int32_t>();
  const KeyReader kr{reinterpret_cast<const uint8_t*>(cache.data_ptr()), bt.data_ptr<int32_t>(), bt.size(1),
                     cache.size(1), cache.size(2) * cache.element_size(), R, DR, kind};
  const SplitPlan plan = plan_splits(CU, LEN, B, at::get_num_threads());
  auto acc_part = torch::empty({plan.rows, H, R}, torch::kFloat32);
  auto ml_part = torch::empty({plan.rows, H, 2}, torch::kFloat32);
  float* ACC = acc_part.data_ptr<float>();
  float* ML = ml_part.data_ptr<float>();
  const float qscale = float(scale) * LOG2E;  // scores in the log2 domain
#if defined(MLA_AVX512) && defined(__AVX512BF16__)
  // a bf16 cache under a bf16 model, read in place by bf16 pair products (the query and probabilities rounded to
  // bf16, as the model's own activations are). Without the instruction its emulation is no faster than the float32
  // path, which keeps them in float32.
  const bool pairs = kind == CacheKind::BFLOAT16 && W % 2 == 0 && bf16_model;
#else
  const bool pairs = false;
  (void)bf16_model;
#endif
  const bool int8 = kind == CacheKind::INT8_BF16_ROPE || kind == CacheKind::INT8_FP32_ROPE;
  at::parallel_for(0, int64_t(plan.splits.size()), 1, [&](int64_t i0, int64_t i1) {
    Scratch s(pairs, kind == CacheKind::FLOAT32, int8, R, W, HP);
    for (int64_t ti = i0; ti < i1; ++ti) {
      const Split& sp = plan.splits[ti];
      const int64_t q0 = CU[sp.b], nq = CU[sp.b + 1] - q0, start = LEN[sp.b] - nq;
      for (int64_t i = 0; i < nq; ++i)
        attend_query(kr, sp, Q + (q0 + i) * H * W, i, start, H, HP, R, W, qscale, pairs, int8, s,
                     ACC + (sp.row + i) * H * R, ML + (sp.row + i) * H * 2);
    }
  });
  merge_splits(plan, CU, B, H, R, ACC, ML, O);
}

const void* head_weight(const torch::Tensor& w, int64_t H) {
  TORCH_CHECK(w.dim() == 3 && w.size(0) == H && w.is_contiguous() &&
                  (w.scalar_type() == torch::kBFloat16 || w.scalar_type() == torch::kFloat32),
              "per-head weights must be contiguous bf16 or fp32 [H, ., .]");
  return w.data_ptr();
}

// q[0:R] += sum_a qn[a] * W[a, 0:R] for the DN rows of W (bf16 or float32), in a's order with axpy's rounding, four
// rows of W per load and store of q (a row at a time, q's loads and stores outnumbered the weight's), the rows
// prefetched: at a small depth the products through W_UK and W_UV are most of the attention's time.
void absorb_q(const float* qn, const char* W, bool w16, int64_t DN, int64_t R, float* q) {
  const int64_t row = R * (w16 ? 2 : 4);
  int64_t a = 0;
#ifdef MLA_AVX512
  for (; a + 4 <= DN; a += 4) {
    const char* w = W + a * row;
    prefetch_row(w, 4 * row);
    const __m512 s0 = _mm512_set1_ps(qn[a]), s1 = _mm512_set1_ps(qn[a + 1]), s2 = _mm512_set1_ps(qn[a + 2]),
                 s3 = _mm512_set1_ps(qn[a + 3]);
    for (int64_t i = 0; i < R; i += 16) {
      const __mmask16 mk = tail_mask16(R - i);
      __m512 y = _mm512_fmadd_ps(s0, load_w(w, w16, i, mk), _mm512_maskz_loadu_ps(mk, q + i));
      y = _mm512_fmadd_ps(s1, load_w(w + row, w16, i, mk), y);
      y = _mm512_fmadd_ps(s2, load_w(w + 2 * row, w16, i, mk), y);
      _mm512_mask_storeu_ps(q + i, mk, _mm512_fmadd_ps(s3, load_w(w + 3 * row, w16, i, mk), y));
    }
  }
#endif
  for (; a < DN; ++a) {
    prefetch_row(W + a * row, row);
    axpy(q, qn[a], W + a * row, w16, R);
  }
}

// o[j] = x . W[j] for the n <= 4 rows of W (bf16 or float32), each sum in dot's order, the four at once: a row's
// multiply-adds wait on each other, four rows' do not.
void dots(const float* x, const char* W, bool w16, int64_t n, int64_t R, float* o) {
  const int64_t row = R * (w16 ? 2 : 4);
#ifdef MLA_AVX512
  if (n == 4) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t i = 0; i < R; i += 16) {
      const __mmask16 mk = tail_mask16(R - i);
      const __m512 xv = _mm512_maskz_loadu_ps(mk, x + i);
      a0 = _mm512_fmadd_ps(xv, load_w(W, w16, i, mk), a0);
      a1 = _mm512_fmadd_ps(xv, load_w(W + row, w16, i, mk), a1);
      a2 = _mm512_fmadd_ps(xv, load_w(W + 2 * row, w16, i, mk), a2);
      a3 = _mm512_fmadd_ps(xv, load_w(W + 3 * row, w16, i, mk), a3);
    }
    o[0] = hsum(a0), o[1] = hsum(a1), o[2] = hsum(a2), o[3] = hsum(a3);
    return;
  }
#endif
  for (int64_t j = 0; j < n; ++j) o[j] = dot(x, W + j * row, w16, R);
}

}  // namespace

// kernels/reference.py mla_decode: o_lat [T, H, R] in q_lat's dtype.
torch::Tensor mla_decode(torch::Tensor q_lat, torch::Tensor q_pe, torch::Tensor cache, torch::Tensor block_tables,
                         torch::Tensor cu_seqlens_q, torch::Tensor seq_lens, double scale, CacheKind kind) {
  TORCH_CHECK(q_lat.dim() == 3 && q_pe.dim() == 3 && q_pe.size(0) == q_lat.size(0) && q_pe.size(1) == q_lat.size(1),
              "mla_decode: q_lat [T, H, R], q_pe [T, H, DR]");
  const int64_t T = q_lat.size(0), H = q_lat.size(1), R = q_lat.size(2), DR = q_pe.size(2);
  const std::vector<float> ql = values_f32(q_lat), qp = values_f32(q_pe);
  std::vector<float> q(T * H * (R + DR)), o(T * H * R, NAN);
  for (int64_t i = 0; i < T * H; ++i) {
    std::memcpy(q.data() + i * (R + DR), ql.data() + i * R, R * 4);
    std::memcpy(q.data() + i * (R + DR) + R, qp.data() + i * DR, DR * 4);
  }
  attend(q.data(), T, H, R, DR, cache, block_tables, cu_seqlens_q, seq_lens, scale, kind,
         q_lat.scalar_type() == torch::kBFloat16, o.data());
  return tensor_from(o.data(), {T, H, R}, q_lat.scalar_type());
}

// The absorbed attention of a decode step in one call: q_lat = q_nope through W_UK, mla_decode over the latent
// cache, back through W_UV. q_nope [T, H, nope], q_pe [T, H, DR] (views of q), w_uk [H, nope, R], w_uv [H, v, R]
// (bf16 or fp32) -> o [T, H, v] in q_nope's dtype; float32 throughout.
torch::Tensor mla_absorbed(torch::Tensor q_nope, torch::Tensor q_pe, torch::Tensor w_uk, torch::Tensor w_uv,
                           torch::Tensor cache, torch::Tensor block_tables, torch::Tensor cu_seqlens_q,
                           torch::Tensor seq_lens, double scale, CacheKind kind) {
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
  guided_for(H, 1, [&](int64_t h) {  // q_lat[t, h] = q_nope[t, h] @ W_UK[h]
    for (int64_t t = 0; t < T; ++t) {
      float* qr = q.data() + (t * H + h) * W;
      absorb_q(qn.data() + (t * H + h) * DN, static_cast<const char*>(UK) + h * DN * R * uk_elt, uk16, DN, R, qr);
      std::memcpy(qr + R, qp.data() + (t * H + h) * DR, DR * 4);
    }
  });
  MLA_PHASE("w_uk");
  attend(q.data(), T, H, R, DR, cache, block_tables, cu_seqlens_q, seq_lens, scale, kind,
         q_nope.scalar_type() == torch::kBFloat16, o_lat.data());
  MLA_PHASE("attention");
  guided_for(H, 1, [&](int64_t h) {  // o[t, h] = o_lat[t, h] @ W_UV[h].T
    for (int64_t v = 0; v < V; v += 4) {
      const int64_t n = std::min<int64_t>(4, V - v);
      const char* wr = static_cast<const char*>(UV) + (h * V + v) * R * uv_elt;
      prefetch_row(wr, n * R * uv_elt);
      for (int64_t t = 0; t < T; ++t)
        dots(o_lat.data() + (t * H + h) * R, wr, uv16, n, R, o.data() + (t * H + h) * V + v);
    }
  });
  MLA_PHASE("w_uv");
  return tensor_from(o.data(), {T, H, V}, q_nope.scalar_type());
}

}  // namespace mla
