#ifndef HTX
#define HTX 4
#endif
#include <immintrin.h>
#include <cstdint>
#include <cstring>
#include <cstdio>
#include <vector>
#include <algorithm>
#include <x86intrin.h>
#define MLA_DPBUSD(c, b, a) asm("vpdpbusd %2, %1, %0" : "+v"(c) : "v"(b), "v"(a))
inline __mmask16 tail_mask16(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }
inline __m512i bcast32(const void* p) { int32_t v; std::memcpy(&v, p, 4); return _mm512_set1_epi32(v); }

#ifndef VARIANT
#define VARIANT 0
#endif
template <int HT>
__attribute__((noinline)) void values_pass(const uint8_t* ct, const uint32_t* P, int64_t NQ, int64_t HP, int64_t h0,
                                           int64_t R, int64_t c, const float* w, const float* alpha, bool first,
                                           float* acc) {
  __m512i a[HT][4];
#pragma GCC unroll 16
  for (int u = 0; u < HT; ++u)
#pragma GCC unroll 4
    for (int z = 0; z < 4; ++z) a[u][z] = _mm512_setzero_si512();

#if VARIANT == 2
  {
    alignas(64) int32_t out[16][16];
    const uint8_t* cp = ct;
    const uint32_t* pp = P + h0;
    const int64_t s1 = NQ * 64, s3 = 3 * NQ * 64, ps = HP * 4;
    int64_t n = NQ;
    asm volatile(
        "vpxord %%zmm0, %%zmm0, %%zmm0\n\t"
        "vpxord %%zmm1, %%zmm1, %%zmm1\n\t"
        "vpxord %%zmm2, %%zmm2, %%zmm2\n\t"
        "vpxord %%zmm3, %%zmm3, %%zmm3\n\t"
        "vpxord %%zmm4, %%zmm4, %%zmm4\n\t"
        "vpxord %%zmm5, %%zmm5, %%zmm5\n\t"
        "vpxord %%zmm6, %%zmm6, %%zmm6\n\t"
        "vpxord %%zmm7, %%zmm7, %%zmm7\n\t"
        "vpxord %%zmm8, %%zmm8, %%zmm8\n\t"
        "vpxord %%zmm9, %%zmm9, %%zmm9\n\t"
        "vpxord %%zmm10, %%zmm10, %%zmm10\n\t"
        "vpxord %%zmm11, %%zmm11, %%zmm11\n\t"
        "vpxord %%zmm12, %%zmm12, %%zmm12\n\t"
        "vpxord %%zmm13, %%zmm13, %%zmm13\n\t"
        "vpxord %%zmm14, %%zmm14, %%zmm14\n\t"
        "vpxord %%zmm15, %%zmm15, %%zmm15\n\t"
        "1:\n\t"
        "vmovdqu64 (%[cp]), %%zmm16\n\t"
        "vmovdqu64 (%[cp],%[s1],1), %%zmm17\n\t"
        "vmovdqu64 (%[cp],%[s1],2), %%zmm18\n\t"
        "vmovdqu64 (%[cp],%[s3],1), %%zmm19\n\t"
        "vpbroadcastd 0(%[pp]), %%zmm20\n\t"
        "vpdpbusd %%zmm16, %%zmm20, %%zmm0\n\t"
        "vpdpbusd %%zmm17, %%zmm20, %%zmm1\n\t"
        "vpdpbusd %%zmm18, %%zmm20, %%zmm2\n\t"
        "vpdpbusd %%zmm19, %%zmm20, %%zmm3\n\t"
        "vpbroadcastd 4(%[pp]), %%zmm20\n\t"
        "vpdpbusd %%zmm16, %%zmm20, %%zmm4\n\t"
        "vpdpbusd %%zmm17, %%zmm20, %%zmm5\n\t"
        "vpdpbusd %%zmm18, %%zmm20, %%zmm6\n\t"
        "vpdpbusd %%zmm19, %%zmm20, %%zmm7\n\t"
        "vpbroadcastd 8(%[pp]), %%zmm20\n\t"
        "vpdpbusd %%zmm16, %%zmm20, %%zmm8\n\t"
        "vpdpbusd %%zmm17, %%zmm20, %%zmm9\n\t"
        "vpdpbusd %%zmm18, %%zmm20, %%zmm10\n\t"
        "vpdpbusd %%zmm19, %%zmm20, %%zmm11\n\t"
        "vpbroadcastd 12(%[pp]), %%zmm20\n\t"
        "vpdpbusd %%zmm16, %%zmm20, %%zmm12\n\t"
        "vpdpbusd %%zmm17, %%zmm20, %%zmm13\n\t"
        "vpdpbusd %%zmm18, %%zmm20, %%zmm14\n\t"
        "vpdpbusd %%zmm19, %%zmm20, %%zmm15\n\t"
        "add $64, %[cp]\n\t"
        "add %[ps], %[pp]\n\t"
        "dec %[n]\n\t"
        "jnz 1b\n\t"
        "vmovdqa64 %%zmm0, 0(%[out])\n\t"
        "vmovdqa64 %%zmm1, 64(%[out])\n\t"
        "vmovdqa64 %%zmm2, 128(%[out])\n\t"
        "vmovdqa64 %%zmm3, 192(%[out])\n\t"
        "vmovdqa64 %%zmm4, 256(%[out])\n\t"
        "vmovdqa64 %%zmm5, 320(%[out])\n\t"
        "vmovdqa64 %%zmm6, 384(%[out])\n\t"
        "vmovdqa64 %%zmm7, 448(%[out])\n\t"
        "vmovdqa64 %%zmm8, 512(%[out])\n\t"
        "vmovdqa64 %%zmm9, 576(%[out])\n\t"
        "vmovdqa64 %%zmm10, 640(%[out])\n\t"
        "vmovdqa64 %%zmm11, 704(%[out])\n\t"
        "vmovdqa64 %%zmm12, 768(%[out])\n\t"
        "vmovdqa64 %%zmm13, 832(%[out])\n\t"
        "vmovdqa64 %%zmm14, 896(%[out])\n\t"
        "vmovdqa64 %%zmm15, 960(%[out])\n\t"
        : [cp] "+r"(cp), [pp] "+r"(pp), [n] "+r"(n)
        : [s1] "r"(s1), [s3] "r"(s3), [ps] "r"(ps), [out] "r"(out)
        : "memory", "cc", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "xmm16", "xmm17", "xmm18", "xmm19", "xmm20");
    for (int u = 0; u < HT; ++u) for (int z = 0; z < 4; ++z) a[u][z] = _mm512_load_si512(out[4 * u + z]);
  }
#else
  for (int64_t q = 0; q < NQ; ++q) {
    __m512i k4[4];
#pragma GCC unroll 4
    for (int z = 0; z < 4; ++z) k4[z] = _mm512_loadu_si512(ct + (z * NQ + q) * 64);
#pragma GCC unroll 16
    for (int u = 0; u < HT; ++u) {
      const __m512i p = bcast32(P + q * HP + h0 + u);
#pragma GCC unroll 4
      for (int z = 0; z < 4; ++z) {
#if VARIANT == 1
        a[u][z] = _mm512_dpbusd_epi32(a[u][z], p, k4[z]);
#else
        MLA_DPBUSD(a[u][z], p, k4[z]);
#endif
      }
    }
  }
#endif
#pragma GCC unroll 16
  for (int u = 0; u < HT; ++u) {
    const __m512 wu = _mm512_set1_ps(w[h0 + u]), au = _mm512_set1_ps(alpha[h0 + u]);
#pragma GCC unroll 4
    for (int z = 0; z < 4; ++z) {
      const __mmask16 mk = tail_mask16(std::max<int64_t>(0, R - c - 16 * z));
      float* o = acc + (h0 + u) * R + c + 16 * z;
      __m512 old = _mm512_maskz_loadu_ps(mk, o);
      if (first) old = _mm512_mul_ps(old, au);
      _mm512_mask_storeu_ps(o, mk, _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[u][z]), wu, old));
    }
  }
}
int main() {
  const int64_t NQ = 16, HP = 16, R = 512;
  std::vector<uint8_t> CT(R / 16 * NQ * 64, 3);
  std::vector<uint32_t> PH(NQ * HP, 0x01020304u);
  std::vector<float> w(16, 1e-6f), al(16, 1.f), acc(16 * R, 0.f);
  const int iters = 20000;
  uint64_t best = ~0ull;
  for (int rep = 0; rep < 5; ++rep) {
    uint64_t c0 = __rdtsc();
    for (int it = 0; it < iters; ++it)
      for (int64_t c = 0; c < R; c += 64)
        for (int64_t h0 = 0; h0 < 16; h0 += HTX)
          values_pass<HTX>(CT.data() + c / 16 * NQ * 64, PH.data(), NQ, HP, h0, R, c, w.data(), al.data(), it & 1, acc.data());
    best = std::min<uint64_t>(best, __rdtsc() - c0);
  }
  const double calls = iters * 32.0;
  printf("variant %d: %.1f tsc/call, %.2f dpbusd/tsc (ideal 256 dpbusd per call) acc %g\n", VARIANT, best / calls, 256 * calls / best, acc[5]);
}
