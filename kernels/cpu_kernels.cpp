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
#include <pybind11/stl.h>
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

void check_offsets(const std::vector<int64_t>& v, int64_t M, int64_t G) {
  TORCH_CHECK(int64_t(v.size()) == G + 1, "offsets must have groups + 1 entries");
  TORCH_CHECK(v.front() == 0 && v.back() == M, "offsets must run from 0 to the rows of x");
  for (int64_t g = 0; g < G; ++g) TORCH_CHECK(v[g] <= v[g + 1], "offsets must not decrease");
}

// The output's element i = v, in out's float dtype.
struct Out {
  void* p;
  at::ScalarType t;
  void set(int64_t i, float v) const {
    if (t == torch::kFloat32) static_cast<float*>(p)[i] = v;
    else if (t == torch::kBFloat16) static_cast<at::BFloat16*>(p)[i] = at::BFloat16(v);
    else static_cast<at::Half*>(p)[i] = at::Half(v);
  }
};

Out output(const torch::Tensor& out, int64_t M, int64_t N) {
  TORCH_CHECK(out.is_contiguous() && out.numel() == M * N && out.is_floating_point(), "out must be contiguous [M, N]");
  return Out{out.data_ptr(), out.scalar_type()};
}

float read_f(const torch::Tensor& x, int64_t i) {
  switch (x.scalar_type()) {
    case torch::kFloat32: return x.data_ptr<float>()[i];
    case torch::kBFloat16: return float(x.data_ptr<at::BFloat16>()[i]);
    case torch::kHalf: return float(x.data_ptr<at::Half>()[i]);
    default: TORCH_CHECK(false, "x must be float32, bfloat16 or float16");
  }
}

// Rows of x quantized per block of 128 into Q [M, KB * 128] (zero padded), S [M, KB] scales, C [M, KB] scale *
// sum of the block's integers; interleave: each block as its even-indexed values, then its odd ones.
void quantize_into(const torch::Tensor& x, bool interleave, int8_t* Q, float* S, float* C) {
  const int64_t M = x.size(0), K = x.size(1), KB = (K + QB - 1) / QB;
  std::fill(Q, Q + M * KB * QB, int8_t(0));
  std::vector<float> xr(QB);
  for (int64_t i = 0; i < M * KB; ++i) {
    const int64_t m = i / KB, b = i % KB, k0 = b * QB, n = std::min(QB, K - k0);
    float amax = 0.f;
    for (int64_t j = 0; j < n; ++j) amax = std::max(amax, std::fabs(xr[j] = read_f(x, m * K + k0 + j)));
    const float s = amax > 0.f ? amax / 127.f : 1.f, inv = 1.f / s;
    int8_t* q = Q + m * KB * QB + k0;
    int32_t sum = 0;
    for (int64_t j = 0; j < n; ++j) {
      const int32_t v = std::max(-127, std::min(127, int32_t(std::nearbyint(xr[j] * inv))));
      q[interleave ? (j % 2) * (QB / 2) + j / 2 : j] = int8_t(v);
      sum += v;
    }
    S[i] = s;
    C[i] = s * float(sum);
  }
}

}  // namespace

// x [M, K] -> (xq int8 [M, KB * 128], sx float32 [M, KB], sx * sum(xq) float32 [M, KB]): what gemv_quant uses.
std::vector<torch::Tensor> quantize_rows(torch::Tensor x, bool interleave) {
  TORCH_CHECK(x.dim() == 2, "x must be [M, K]");
  x = x.contiguous();
  const int64_t M = x.size(0), KB = (x.size(1) + QB - 1) / QB;
  auto xq = torch::empty({M, KB * QB}, torch::kInt8);
  auto sx = torch::empty({M, KB}, torch::kFloat32);
  auto sxsum = torch::empty({M, KB}, torch::kFloat32);
  quantize_into(x, interleave, xq.data_ptr<int8_t>(), sx.data_ptr<float>(), sxsum.data_ptr<float>());
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

// out [M, N] = x @ W_g.T for the rows offsets[g]:offsets[g + 1] of x and each group g. w [G, N, K] (or [N, K]: one
// group) bfloat16 or float32; x [M, K] any float dtype (converted to w's); out any float dtype.
void gemv(torch::Tensor x, std::vector<int64_t> off, torch::Tensor w, torch::Tensor out) {
  if (w.dim() == 2) w = w.unsqueeze(0);
  TORCH_CHECK(w.dim() == 3 && w.is_contiguous(), "w must be contiguous [groups, N, K]");
  TORCH_CHECK(w.scalar_type() == torch::kBFloat16 || w.scalar_type() == torch::kFloat32, "w must be bf16 or fp32");
  const int64_t G = w.size(0), N = w.size(1), K = w.size(2), M = x.size(0);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, "x must be [M, K]");
  check_offsets(off, M, G);
  const bool is_bf16 = w.scalar_type() == torch::kBFloat16;
  x = x.contiguous();
  // x in w's dtype (a few rows)
  std::vector<uint16_t> xb(is_bf16 ? M * K : 0);
  std::vector<float> xf(is_bf16 ? 0 : M * K);
  for (int64_t i = 0; i < M * K; ++i) {
    const float v = read_f(x, i);
    if (is_bf16) {
      const at::BFloat16 b(v);
      std::memcpy(&xb[i], &b, 2);
    } else {
      xf[i] = v;
    }
  }
  const Out Y = output(out, M, N);
  const char* W = static_cast<const char*>(w.data_ptr());
  const int64_t elt = w.element_size();
  for_each_task(off, N, [&](int64_t g, int64_t n0, int64_t n1) {
    for (int64_t m = off[g]; m < off[g + 1]; m += MT) {
      const int64_t C = std::min(MT, off[g + 1] - m);
      const uint16_t* xs16 = is_bf16 ? xb.data() + m * K : nullptr;
      const float* xs32 = is_bf16 ? nullptr : xf.data() + m * K;
      for (int64_t n = n0; n < n1; ++n) {
        const char* wr = W + (g * N + n) * K * elt;
        float o[MT];
#ifdef MLA_AVX512
#define MLA_CALL(C_)                                            \
  if (is_bf16)                                                  \
    row_bf16<C_>((const uint16_t*)wr, xs16, K, K, o);           \
  else                                                          \
    row_f32<C_>((const float*)wr, xs32, K, K, o);
        MLA_DISPATCH_C(C, MLA_CALL)
#undef MLA_CALL
#else
        for (int64_t c = 0; c < C; ++c) {
          float s = 0.f;
          for (int64_t k = 0; k < K; ++k)
            s += is_bf16 ? bf16_to_float(((const uint16_t*)wr)[k]) * bf16_to_float(xs16[c * K + k])
                         : ((const float*)wr)[k] * xs32[c * K + k];
          o[c] = s;
        }
#endif
        for (int64_t c = 0; c < C; ++c) Y.set((m + c) * N + n, o[c]);
      }
    }
  });
}

// out [M, N] = x @ W_g.T per group for weight-only quantized W (kernels/weights.py layouts; 2-D: one group):
//   int8: qweight int8 [G, N, K], scales float32 [G, N]
//   int4: qweight uint8 [G, N, Kp / 2], scales float32 [G, N, Kp / 128]
// x [M, K] any float dtype, quantized here per block of 128 (quantize_rows).
void gemv_quant(torch::Tensor x, std::vector<int64_t> off, torch::Tensor qweight, torch::Tensor scales, int64_t K,
                bool int4, torch::Tensor out) {
  if (qweight.dim() == 2) qweight = qweight.unsqueeze(0), scales = scales.unsqueeze(0);
  TORCH_CHECK(qweight.dim() == 3 && qweight.is_contiguous() && scales.is_contiguous(),
              "qweight must be contiguous [groups, N, ...]");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, "x must be [M, K]");
  x = x.contiguous();
  const int64_t G = qweight.size(0), N = qweight.size(1), M = x.size(0), KB = (K + QB - 1) / QB;
  std::vector<int8_t> xqv(M * KB * QB);
  std::vector<float> sxv(M * KB), scv(M * KB);
  quantize_into(x, int4, xqv.data(), sxv.data(), scv.data());
  if (int4) {
    TORCH_CHECK(qweight.scalar_type() == torch::kUInt8 && qweight.size(2) == KB * QB / 2, "int4 qweight [G, N, Kp/2]");
    TORCH_CHECK(scales.dim() == 3 && scales.size(2) == KB, "int4 scales [G, N, Kp/128]");
  } else {
    TORCH_CHECK(qweight.scalar_type() == torch::kInt8 && qweight.size(2) == K, "int8 qweight [G, N, K]");
    TORCH_CHECK(scales.dim() == 2 && scales.size(1) == N, "int8 scales [G, N]");
  }
  check_offsets(off, M, G);
  const Out Y = output(out, M, N);
  const int8_t* XQ = xqv.data();
  const float* SX = sxv.data();
  const float* SC = scv.data();
  const float* WS = scales.data_ptr<float>();
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
        float o[MT];
#ifdef MLA_AVX512
#define MLA_CALL(C_)                                                            \
  if (int4)                                                                     \
    row_q4<C_>(wr, ws, xs, ldx, SX + m * KB, SC + m * KB, KB, o);             \
  else                                                                          \
    row_q8<C_>(wr, xs, ldx, SX + m * KB, KB, K, o);
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
          o[c] = int4 ? s : s + corr[m + c];  // the int8 sums carry + corr, as the AVX-512 path's do
        }
#endif
        for (int64_t c = 0; c < C; ++c) Y.set((m + c) * N + n, int4 ? o[c] : ws[0] * (o[c] - corr[m + c]));
      }
    }
  });
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

// ---- absorbed MLA attention over the paged latent cache (decode) -------------------------------------------------

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
#endif

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

  void read(int64_t b, int64_t pos, float* out) const {
    const int64_t blk = tables[b * max_blocks + pos / block_size];
    const uint8_t* row = cache + (blk * block_size + pos % block_size) * row_bytes;
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

}  // namespace

// o_lat [T, H, R] float32 = softmax(scale * (q_lat . c_kv + q_pe . k_pe)) . c_kv per head, each query token over its
// sequence's cached tokens up to its own position (kernels/reference.py mla_decode). kind: KeyReader's.
// A sequence's keys are cut into splits when there are fewer sequences than threads; each split keeps its own
// running max, sum and output (online softmax over blocks of KEYS keys), merged at the end.
torch::Tensor mla_decode(torch::Tensor q_lat, torch::Tensor q_pe, torch::Tensor cache, torch::Tensor block_tables,
                         torch::Tensor cu_seqlens_q, torch::Tensor seq_lens, double scale, int64_t kind) {
  TORCH_CHECK(q_lat.dim() == 3 && q_pe.dim() == 3 && cache.dim() == 3 && cache.is_contiguous(), "mla_decode shapes");
  const int64_t T = q_lat.size(0), H = q_lat.size(1), R = q_lat.size(2), DR = q_pe.size(2), W = R + DR;
  const int64_t B = block_tables.size(0), HP = (H + 15) / 16 * 16;
  auto qf = torch::cat({q_lat.to(torch::kFloat32), q_pe.to(torch::kFloat32)}, -1).contiguous();  // [T, H, W]
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
  const float* Q = qf.data_ptr<float>();
  const float qscale = float(scale) * 1.4426950408889634f;  // scores in the log2 domain
  at::parallel_for(0, int64_t(tasks.size()), 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> qT(W * HP), keys(KEYS * W), S(KEYS * HP), m(HP), l(HP), alpha(HP);
    for (int64_t ti = i0; ti < i1; ++ti) {
      const Task& tk = tasks[ti];
      const int64_t q0 = CU[tk.b], nq = CU[tk.b + 1] - q0, start = LEN[tk.b] - nq;
      for (int64_t i = 0; i < nq; ++i) {
        // q transposed: qT[d][h], so one vector of heads multiplies each key value
        std::fill(qT.begin(), qT.end(), 0.f);
        for (int64_t h = 0; h < H; ++h)
          for (int64_t d = 0; d < W; ++d) qT[d * HP + h] = Q[((q0 + i) * H + h) * W + d] * qscale;
        float* acc = ACC + (tk.row + i) * H * R;
        std::fill(acc, acc + H * R, 0.f);
        std::fill(m.begin(), m.end(), -INFINITY);
        std::fill(l.begin(), l.end(), 0.f);
        const int64_t kend = std::min(tk.k1, start + i + 1);  // causal: keys up to the query's position
        for (int64_t kb = tk.k0; kb < kend; kb += KEYS) {
          const int64_t nk = std::min(KEYS, kend - kb);
          for (int64_t j = 0; j < nk; ++j) kr.read(tk.b, kb + j, keys.data() + j * W);
#ifdef MLA_AVX512
          for (int64_t hc = 0; hc < HP; hc += 16) {
            __m512 mx = _mm512_loadu_ps(m.data() + hc);
            for (int64_t j = 0; j < nk; ++j) {
              const float* kj = keys.data() + j * W;
              __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
              int64_t d = 0;
              for (; d + 2 <= W; d += 2) {
                s0 = _mm512_fmadd_ps(_mm512_loadu_ps(qT.data() + d * HP + hc), _mm512_set1_ps(kj[d]), s0);
                s1 = _mm512_fmadd_ps(_mm512_loadu_ps(qT.data() + (d + 1) * HP + hc), _mm512_set1_ps(kj[d + 1]), s1);
              }
              if (d < W) s0 = _mm512_fmadd_ps(_mm512_loadu_ps(qT.data() + d * HP + hc), _mm512_set1_ps(kj[d]), s0);
              const __m512 sv = _mm512_add_ps(s0, s1);
              _mm512_storeu_ps(S.data() + j * HP + hc, sv);
              mx = _mm512_max_ps(mx, sv);
            }
            const __m512 old = _mm512_loadu_ps(m.data() + hc);
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
          // acc[h] = acc[h] * alpha[h] + sum_j p[j][h] * c_kv_j, 16 latent values at a time for 8 keys
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
  auto out = torch::full({T, H, R}, NAN, torch::kFloat32);
  float* O = out.data_ptr<float>();
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
  return out;
}

// Per-head products for the absorbed projections, x [T, H, A] (few tokens):
//   transpose_w false: y[t, h] = x[t, h] @ w[h]     with w [H, A, B]   (q_nope through W_UK: [H, nope, R])
//   transpose_w true:  y[t, h] = x[t, h] @ w[h].T   with w [H, B, A]   (o_lat through W_UV: [H, v, R])
// w bfloat16 or float32, contiguous; y float32 [T, H, B].
torch::Tensor head_matmul(torch::Tensor x, torch::Tensor w, bool transpose_w) {
  TORCH_CHECK(x.dim() == 3 && w.dim() == 3 && w.is_contiguous() && x.size(1) == w.size(0), "head_matmul shapes");
  TORCH_CHECK(w.scalar_type() == torch::kBFloat16 || w.scalar_type() == torch::kFloat32, "w must be bf16 or fp32");
  const int64_t T = x.size(0), H = x.size(1), A = x.size(2);
  const int64_t B = transpose_w ? w.size(1) : w.size(2);
  TORCH_CHECK((transpose_w ? w.size(2) : w.size(1)) == A, "head_matmul: inner sizes differ");
  const bool is_bf16 = w.scalar_type() == torch::kBFloat16;
  auto xf = x.to(torch::kFloat32).transpose(0, 1).contiguous();  // [H, T, A]
  auto y = torch::full({T, H, B}, NAN, torch::kFloat32);
  const float* X = xf.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  const char* Wp = static_cast<const char*>(w.data_ptr());
  auto wval = [&](int64_t i) -> float {
    return is_bf16 ? bf16_to_float(reinterpret_cast<const uint16_t*>(Wp)[i]) : reinterpret_cast<const float*>(Wp)[i];
  };
  at::parallel_for(0, H, 1, [&](int64_t h0, int64_t h1) {
    std::vector<float> wrow(std::max(A, B));
    for (int64_t h = h0; h < h1; ++h) {
      const int64_t base = h * A * B;
      if (transpose_w) {  // rows of w[h] (length A) dotted with x
        for (int64_t b = 0; b < B; ++b) {
          for (int64_t a = 0; a < A; ++a) wrow[a] = wval(base + b * A + a);
          for (int64_t t = 0; t < T; ++t) {
            const float* xr = X + (h * T + t) * A;
            float s = 0.f;
#ifdef MLA_AVX512
            __m512 acc = _mm512_setzero_ps();
            for (int64_t a = 0; a < A; a += 16) {
              const __mmask16 mk = tail_mask16(A - a);
              acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, wrow.data() + a), _mm512_maskz_loadu_ps(mk, xr + a), acc);
            }
            s = hsum(acc);
#else
            for (int64_t a = 0; a < A; ++a) s += wrow[a] * xr[a];
#endif
            Y[(t * H + h) * B + b] = s;
          }
        }
      } else {  // y[t, h] = sum_a x[t, h, a] * w[h, a, :]: rows of w[h] scaled and added
        for (int64_t t = 0; t < T; ++t) std::fill(Y + (t * H + h) * B, Y + (t * H + h) * B + B, 0.f);
        for (int64_t a = 0; a < A; ++a) {
          for (int64_t b = 0; b < B; ++b) wrow[b] = wval(base + a * B + b);
          for (int64_t t = 0; t < T; ++t) {
            float* yr = Y + (t * H + h) * B;
            const float xa = X[(h * T + t) * A + a];
#ifdef MLA_AVX512
            const __m512 xv = _mm512_set1_ps(xa);
            for (int64_t b = 0; b < B; b += 16) {
              const __mmask16 mk = tail_mask16(B - b);
              _mm512_mask_storeu_ps(yr + b, mk, _mm512_fmadd_ps(xv, _mm512_maskz_loadu_ps(mk, wrow.data() + b),
                                                                _mm512_maskz_loadu_ps(mk, yr + b)));
            }
#else
            for (int64_t b = 0; b < B; ++b) yr[b] += xa * wrow[b];
#endif
          }
        }
      }
    }
  });
  return y;
}

// ---- the small steps between the products, one call each instead of several torch ops ----------------------------

namespace {
template <typename T>
inline float to_f(T v) { return float(v); }
template <typename T>
inline T from_f(float v) { return T(v); }

// Dispatch on the float dtype of a tensor: fn(type tag).
template <typename F>
void float_dispatch(at::ScalarType st, F fn) {
  if (st == torch::kFloat32) fn(float());
  else if (st == torch::kBFloat16) fn(at::BFloat16());
  else if (st == torch::kFloat16) fn(at::Half());
  else TORCH_CHECK(false, "float32, bfloat16 or float16 expected");
}
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("quantize_rows", &quantize_rows);
  m.def("gemv", &gemv);
  m.def("gemv_quant", &gemv_quant);
  m.def("dequantize", &dequantize);
  m.def("mla_decode", &mla_decode);
  m.def("head_matmul", &head_matmul);
  m.def("rms_norm", &rms_norm);
  m.def("rope_", &rope_);
  m.def("silu_mul", &silu_mul);
  m.def("has_avx512", &has_avx512);
}
