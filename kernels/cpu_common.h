// What every CPU kernel file shares: the weight stream's software prefetch, the guided split of products over the
// threads, the bf16 conversions, the AVX-512 helpers (masked tails, a vector 2^x, bf16 loads), the conversion of a
// few rows of any float dtype to float32 and back, an int8 / int4 row's dequantization and a float row's
// quantization, and the small dot and axpy over a bf16 or fp32 weight row. They are inline here, rather than in a
// file of their own, so that each kernel's inner loops can inline them: a call per 16 values would cost as much as
// the arithmetic it wraps.
//
// Without AVX-512 (F, BW and VNNI) MLA_AVX512 stays undefined and every kernel runs its portable scalar loop, except
// for the int8 / int4 products, which have AVX2 loops (MLA_AVX2). AVX512_BF16 is not required: where it is missing
// (Skylake to Ice Lake servers, and hypervisors that hide it) its pair dot is emulated (dpbf16).
#pragma once

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define MLA_AVX512 1
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__FMA__)
// AVX2 without those: the int8 / int4 products and the dequantization have loops of their own (cpu_gemv.cpp);
// the rest runs the portable loops (float weights go to torch's GEMV there: kernels/backend.py).
#define MLA_AVX2 1
#include <immintrin.h>
#endif

namespace mla {

constexpr int64_t QB = 128;  // activation quantization block = int4 weight group

// How far ahead of its loads a loop over weights prefetches them (software prefetch, on top of the hardware's, which
// stops at each 4 KiB page): far ahead into L2, so that enough lines are in flight for one core's share of the read
// rate, and nearer into L1, so that the loads find their line there (bench/results/cpu-kernel-notes.md).
constexpr int64_t PREFETCH_L2 = 6144, PREFETCH_L1 = 1024;

// The software prefetch for the weight line at p.
__attribute__((always_inline)) inline void prefetch_weights(const void* p) {
  __builtin_prefetch(static_cast<const char*>(p) + PREFETCH_L2, 0, 2);
  __builtin_prefetch(static_cast<const char*>(p) + PREFETCH_L1, 0, 3);
}

// The same for every line of a weight row of `bytes` bytes at p, for loops that read a row in one go.
inline void prefetch_row(const void* p, int64_t bytes) {
  for (int64_t o = 0; o < bytes; o += 64) prefetch_weights(static_cast<const char*>(p) + o);
}

// task(t) for t in 0:n, over the threads with guided scheduling: each grab takes half of the remaining tasks' share
// of a thread (at least min_grab), so that a thread's tasks stay long runs of consecutive ones (sequential reads,
// which the prefetchers follow) while the last small grabs even out a core that ran slower (this machine's cores do
// not run at one speed; a static split waits for the slower one).
template <typename F>
void guided_for(int64_t n, int64_t min_grab, const F& task) {
  const int64_t nth = at::get_num_threads();
  std::atomic<int64_t> next{0};
  at::parallel_for(0, nth, 1, [&](int64_t, int64_t) {
    for (int64_t t0 = next.load(), c;; t0 = next.load()) {
      do {
        const int64_t left = n - t0;
        if (left <= 0) return;
        c = std::min(left, std::max(min_grab, left / (2 * nth)));
      } while (!next.compare_exchange_weak(t0, t0 + c));
      for (int64_t t = t0; t < t0 + c; ++t) task(t);
    }
  });
}

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

template <typename T>
inline float to_f(T v) { return float(v); }
template <typename T>
inline T from_f(float v) { return T(v); }

#ifdef MLA_AVX512
inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }
inline __mmask64 tail_mask64(int64_t n) { return n >= 64 ? ~__mmask64(0) : ((__mmask64(1) << n) - 1); }
inline __mmask32 tail_mask32(int64_t n) { return n >= 32 ? ~__mmask32(0) : ((__mmask32(1) << n) - 1); }
inline __mmask16 tail_mask16(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }

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

// c += b . a, 64 products of unsigned (b) by signed (a) bytes summed by fours into 16 int32 (vpdpbusd). Inline asm
// rather than the intrinsic: with the intrinsic GCC copies each sum to another register and back on every step, and
// spills a tile's sums to the stack.
#define MLA_DPBUSD(c, b, a) asm("vpdpbusd %2, %1, %0" : "+v"(c) : "v"(b), "v"(a))

// r[i] = 16 dwords of row i -> r[j] = dword j of rows 0..15 in order.
inline void transpose16(__m512i r[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 4; ++j) {
      t[8 * i + j] = _mm512_shuffle_i32x4(u[8 * i + j], u[8 * i + 4 + j], 0x88);
      t[8 * i + 4 + j] = _mm512_shuffle_i32x4(u[8 * i + j], u[8 * i + 4 + j], 0xdd);
    }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_i32x4(t[j], t[8 + j], 0x88);
    r[8 + j] = _mm512_shuffle_i32x4(t[j], t[8 + j], 0xdd);
  }
}

// acc + the pair dot of bf16 pairs: lane i gains a[2i] * b[2i] + a[2i + 1] * b[2i + 1] (vdpbf16ps). Emulated
// without AVX512_BF16 by two fp32 multiply-adds, whose rounding may differ from the instruction's in the last bit.
inline __m512 dpbf16(__m512 acc, __m512i a, __m512i b) {
#ifdef __AVX512BF16__
  return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
#else
  const __m512i high = _mm512_set1_epi32(int32_t(0xFFFF0000u));
  acc = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(a, 16)), _mm512_castsi512_ps(_mm512_slli_epi32(b, 16)),
                        acc);
  return _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(a, high)),
                         _mm512_castsi512_ps(_mm512_and_si512(b, high)), acc);
#endif
}

// 16 floats to bf16, rounded to nearest even as torch rounds (NaN kept a NaN), by integer rounding on every CPU:
// vcvtneps2bf16 (AVX512_BF16) flushes subnormal inputs to zero, which torch does not.
inline __m256i to_bf16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q),
                            _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
  return _mm512_cvtepi32_epi16(r);
}

inline __m512 load_w(const void* w, bool is_bf16, int64_t i, __mmask16 mk) {
  return is_bf16 ? load_bf16(static_cast<const uint16_t*>(w) + i, mk)
                 : _mm512_maskz_loadu_ps(mk, static_cast<const float*>(w) + i);
}
#endif

#ifdef MLA_AVX2
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// 2^t as exp2_ps above, 8 lanes; 2^round added to the exponent bits (no scalef in AVX2).
inline __m256 exp2_ps(__m256 t) {
  t = _mm256_max_ps(t, _mm256_set1_ps(-126.f));
  const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(t, n);
  __m256 p = _mm256_set1_ps(1.540353e-4f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3333558e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.6181291e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.5504109e-2f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.4022651e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.9314718e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f));
  return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23)));
}

// 8 values of w (bf16 or float32) from index i, as float32.
inline __m256 load8_w(const void* w, bool is_bf16, int64_t i) {
  return is_bf16 ? _mm256_castsi256_ps(_mm256_slli_epi32(
                       _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(w) + i))), 16))
                 : _mm256_loadu_ps(static_cast<const float*>(w) + i);
}
#endif

// y[0:n] += a * w[0:n], w bf16 or float32.
inline void axpy(float* y, float a, const void* w, bool is_bf16, int64_t n) {
  int64_t i = 0;
#ifdef MLA_AVX512
  const __m512 av = _mm512_set1_ps(a);
  for (; i < n; i += 16) {
    const __mmask16 mk = tail_mask16(n - i);
    _mm512_mask_storeu_ps(y + i, mk, _mm512_fmadd_ps(av, load_w(w, is_bf16, i, mk), _mm512_maskz_loadu_ps(mk, y + i)));
  }
#elif defined(MLA_AVX2)
  const __m256 av = _mm256_set1_ps(a);
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, load8_w(w, is_bf16, i), _mm256_loadu_ps(y + i)));
#endif
  for (; i < n; ++i)
    y[i] += a * (is_bf16 ? bf16_to_float(static_cast<const uint16_t*>(w)[i]) : static_cast<const float*>(w)[i]);
}

// x[0:n] . w[0:n], w bf16 or float32.
inline float dot(const float* x, const void* w, bool is_bf16, int64_t n) {
  float s = 0.f;
  int64_t i = 0;
#ifdef MLA_AVX512
  __m512 acc = _mm512_setzero_ps();
  for (; i < n; i += 16) {
    const __mmask16 mk = tail_mask16(n - i);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, x + i), load_w(w, is_bf16, i, mk), acc);
  }
  s = hsum(acc);
#elif defined(MLA_AVX2)
  __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0;
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), load8_w(w, is_bf16, i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 8), load8_w(w, is_bf16, i + 8), acc1);
  }
  s = hsum(_mm256_add_ps(acc0, acc1));
#endif
  for (; i < n; ++i)
    s += x[i] * (is_bf16 ? bf16_to_float(static_cast<const uint16_t*>(w)[i]) : static_cast<const float*>(w)[i]);
  return s;
}

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
inline std::vector<float> values_f32(torch::Tensor x) {
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
inline void store_f32(const float* v, torch::Tensor& out) {
  TORCH_CHECK(out.is_contiguous(), "out must be contiguous");
  float_dispatch(out.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    T* p = out.data_ptr<T>();
    for (int64_t i = 0; i < out.numel(); ++i) p[i] = T(v[i]);
  });
}

inline void put(float v, float* o) { *o = v; }
inline void put(float v, uint16_t* o) { *o = bf16_bits(v); }

// Value k of an int4 row as stored (0..15 for -8..7; two per byte, the even one in the low nibble).
inline int32_t int4_nibble(const uint8_t* q, int64_t k) { return k % 2 ? q[k / 2] >> 4 : q[k / 2] & 0xF; }

// One quantized row (its scales S: int8 one, int4 one per group) -> K values of O (float32, or bf16 bits).
template <typename O>
void dequantize_row(const uint8_t* q, const float* S, bool int4, int64_t K, O* o) {
  int64_t k = 0;
#ifdef MLA_AVX512
  if constexpr (std::is_same_v<O, uint16_t>) {
    if (int4) {  // 16 bytes -> 32 values: each byte's low nibble then its high one, packed as two bf16 per 32 bits
      for (; k + 32 <= K; k += 32) {
        const __m512 s = _mm512_set1_ps(S[k / QB]);
        const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k / 2)));
        const __m512i eight = _mm512_set1_epi32(8);
        const __m512 lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(v, _mm512_set1_epi32(15)), eight)), s);
        const __m512 hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(v, 4), eight)), s);
        const __m512i lo16 = _mm512_cvtepu16_epi32(to_bf16(lo));
        const __m512i hi16 = _mm512_cvtepu16_epi32(to_bf16(hi));
        _mm512_storeu_si512(o + k, _mm512_or_si512(lo16, _mm512_slli_epi32(hi16, 16)));
      }
    } else {
      const __m512 s = _mm512_set1_ps(S[0]);
      for (; k + 16 <= K; k += 16) {
        const __m512i v = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k)));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + k),
                            to_bf16(_mm512_mul_ps(_mm512_cvtepi32_ps(v), s)));
      }
    }
  } else if (!int4) {
    const __m512 s = _mm512_set1_ps(S[0]);
    for (; k + 16 <= K; k += 16) {
      const __m512i v = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k)));
      _mm512_storeu_ps(o + k, _mm512_mul_ps(_mm512_cvtepi32_ps(v), s));
    }
  }
#endif
#if defined(MLA_AVX512) || defined(MLA_AVX2)
  if constexpr (std::is_same_v<O, float>) {
    if (int4) {  // 8 bytes -> 16 values: the low nibbles and the high ones interleaved back into k order
      const __m256i fifteen = _mm256_set1_epi32(15), eight = _mm256_set1_epi32(8);
      for (; k + 16 <= K; k += 16) {
        const __m256 s = _mm256_set1_ps(S[k / QB]);
        const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + k / 2)));
        const __m256 lo = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(v, fifteen), eight)), s);
        const __m256 hi = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(v, 4), eight)), s);
        const __m256 a = _mm256_unpacklo_ps(lo, hi), b = _mm256_unpackhi_ps(lo, hi);
        _mm256_storeu_ps(o + k, _mm256_permute2f128_ps(a, b, 0x20));
        _mm256_storeu_ps(o + k + 8, _mm256_permute2f128_ps(a, b, 0x31));
      }
    } else {
      const __m256 s = _mm256_set1_ps(S[0]);
      for (; k + 8 <= K; k += 8)
        _mm256_storeu_ps(o + k, _mm256_mul_ps(
                                    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + k)))), s));
    }
  }
#endif
  for (; k < K; ++k)
    put(int4 ? float(int4_nibble(q, k) - 8) * S[k / QB] : float(int8_t(q[k])) * S[0], o + k);
}

inline torch::Tensor tensor_from(const float* v, at::IntArrayRef shape, at::ScalarType st) {
  auto out = torch::empty(shape, torch::TensorOptions().dtype(st));
  store_f32(v, out);
  return out;
}

// A router's picks, ids [T, k] (int64) with their weights topw [T, k] (float32), as the pairs p = t * k + j grouped
// by expert (a counting sort): expert e's pairs are pairs[start[e] .. start[e + 1]), in token order, and pair p is at
// position pos[p]. Checks the arguments; `who` names the caller in the errors.
struct ExpertPairs {
  std::vector<int64_t> start, pairs, pos;
};

inline ExpertPairs expert_pairs(const torch::Tensor& ids, const torch::Tensor& topw, int64_t T, int64_t E,
                                const char* who) {
  TORCH_CHECK(ids.dim() == 2 && ids.size(0) == T && ids.scalar_type() == torch::kInt64 && ids.is_contiguous() &&
                  topw.sizes() == ids.sizes() && topw.scalar_type() == torch::kFloat32 && topw.is_contiguous(),
              who, ": ids int64 [T, k], topw float32 [T, k]");
  const int64_t P = ids.numel(), *ID = ids.data_ptr<int64_t>();
  ExpertPairs r{std::vector<int64_t>(E + 1, 0), std::vector<int64_t>(P), std::vector<int64_t>(P)};
  for (int64_t p = 0; p < P; ++p) {
    TORCH_CHECK(ID[p] >= 0 && ID[p] < E, who, ": expert id out of range");
    ++r.start[ID[p] + 1];
  }
  for (int64_t e = 0; e < E; ++e) r.start[e + 1] += r.start[e];
  std::vector<int64_t> next(r.start.begin(), r.start.end() - 1);
  for (int64_t p = 0; p < P; ++p) {
    r.pos[p] = next[ID[p]]++;
    r.pairs[r.pos[p]] = p;
  }
  return r;
}

// K float32 values -> K int8 with one scale, amax / 127 (1 for an all-zero row); rounded to nearest, ties to even.
inline void quantize_row(const float* x, int64_t K, int8_t* q, float* scale) {
  float amax = 0.f;
  int64_t k = 0;
#ifdef MLA_AVX512
  __m512 mx = _mm512_setzero_ps();
  for (; k < K; k += 16) mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_maskz_loadu_ps(tail_mask16(K - k), x + k)));
  amax = _mm512_reduce_max_ps(mx);
#endif
  for (; k < K; ++k) amax = std::max(amax, std::fabs(x[k]));
  const float s = amax > 0.f ? amax / 127.f : 1.f, inv = 1.f / s;
  k = 0;
#ifdef MLA_AVX512
  for (; k < K; k += 16) {
    const __mmask16 mk = tail_mask16(K - k);
    const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(mk, x + k), _mm512_set1_ps(inv)));
    _mm512_mask_cvtsepi32_storeu_epi8(q + k, mk, v);
  }
#endif
  for (; k < K; ++k) q[k] = int8_t(std::max(-127.f, std::min(127.f, std::nearbyint(x[k] * inv))));
  *scale = s;
}

// SwiGLU's middle in float32, in place: row r of h [P, 2I] (gate | up) -> its first I values = silu(gate) * up.
inline void swiglu_rows(float* h, int64_t P, int64_t I) {
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

}  // namespace mla
