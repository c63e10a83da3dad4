// The vector instruction rates one core sustains here: vpdpbusd (64 byte multiply-adds, int32 sums) against
// vfmadd231ps (16 float32 multiply-adds), each as 12 independent chains (more than latency x throughput), so that
// the loop runs at the instruction's throughput. What the int8 kernels can gain over float32 is the ratio of the
// two rates times 4; a CPU with one 512-bit FMA unit and a hypervisor's clock both show here.
//   g++ -O2 -march=native -o /tmp/instr_rate bench/instr_rate_cpu.cpp && /tmp/instr_rate
#include <immintrin.h>

#include <chrono>
#include <cstdio>

#define DPBUSD(c, b, a) asm volatile("vpdpbusd %2, %1, %0" : "+v"(c) : "v"(b), "v"(a))
#define FMADD(c, b, a) asm volatile("vfmadd231ps %2, %1, %0" : "+v"(c) : "v"(b), "v"(a))

// 12 independent chains, unrolled so that each lives in a register (an array indexed in a loop stays in memory)
#define RATE(V, ZERO, STEP)                                                                                \
  [&] {                                                                                                      \
    constexpr long N = 200000000;                                                                            \
    V a0 = ZERO, a1 = ZERO, a2 = ZERO, a3 = ZERO, a4 = ZERO, a5 = ZERO, a6 = ZERO, a7 = ZERO, a8 = ZERO,     \
      a9 = ZERO, a10 = ZERO, a11 = ZERO;                                                                     \
    const auto t = std::chrono::steady_clock::now();                                                         \
    for (long n = 0; n < N; ++n) {                                                                           \
      STEP(a0); STEP(a1); STEP(a2); STEP(a3); STEP(a4); STEP(a5);                                            \
      STEP(a6); STEP(a7); STEP(a8); STEP(a9); STEP(a10); STEP(a11);                                          \
    }                                                                                                        \
    return 12.0 * N / std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();           \
  }()

int main() {
  const __m512i x = _mm512_set1_epi8(1), y = _mm512_set1_epi8(2);
  const __m512 u = _mm512_set1_ps(1.f), w = _mm512_setzero_ps();
#define DP_STEP(c) DPBUSD(c, x, y)
#define FMA_STEP(c) FMADD(c, u, w)
  const double dp = RATE(__m512i, _mm512_setzero_si512(), DP_STEP);
  const double fm = RATE(__m512, _mm512_setzero_ps(), FMA_STEP);
  std::printf("vpdpbusd zmm %.2f G/s (%.0f G int8 multiply-adds/s), vfmadd231ps zmm %.2f G/s (%.0f G float32 "
              "multiply-adds/s), one thread\n", dp / 1e9, dp * 64 / 1e9, fm / 1e9, fm * 16 / 1e9);
}
