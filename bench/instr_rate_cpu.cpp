// The vector instruction rates one core sustains here: vpdpbusd (64 byte multiply-adds, int32 sums) against
// vfmadd231ps (16 float32 multiply-adds), each as 12 independent chains (more than latency x throughput), so that
// the loop runs at the instruction's throughput. What the int8 kernels can gain over float32 is the ratio of the
// two rates times 4; a CPU with one 512-bit FMA unit and a hypervisor's clock both show here. Third: vpdpbusd with
// a broadcast from memory for each instruction, which costs it about half its rate here. Fourth, where the CPU has
// avx512_bf16: vdpbf16ps (32 bf16 multiply-adds, float32 sums), what a bf16 GEMM without AMX could use.
//   g++ -O2 -march=native -o /tmp/instr_rate bench/instr_rate_cpu.cpp && /tmp/instr_rate
#include <immintrin.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>

#define DPBUSD(c, b, a) asm volatile("vpdpbusd %2, %1, %0" : "+v"(c) : "v"(b), "v"(a))
#define FMADD(c, b, a) asm volatile("vfmadd231ps %2, %1, %0" : "+v"(c) : "v"(b), "v"(a))
#define DPBF16(c, b, a) asm volatile("vdpbf16ps %2, %1, %0" : "+v"(c) : "v"(b), "v"(a))

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

static inline __m512i bcast32(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// vpdpbusd with each instruction's unsigned operand a broadcast of 4 bytes from memory (the first int8 attention
// loops' form): 12 chains, 12 broadcasts a step from one of 64 rows of 48 bytes.
double rate_with_broadcasts(const uint8_t* bytes) {
  constexpr long N = 100000000;
  const __m512i y = _mm512_set1_epi8(3);
  __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0, a8 = a0,
          a9 = a0, a10 = a0, a11 = a0;
  const auto t = std::chrono::steady_clock::now();
  for (long n = 0; n < N; ++n) {
    const uint8_t* q = bytes + (n & 63) * 48;
    DPBUSD(a0, bcast32(q), y); DPBUSD(a1, bcast32(q + 4), y); DPBUSD(a2, bcast32(q + 8), y);
    DPBUSD(a3, bcast32(q + 12), y); DPBUSD(a4, bcast32(q + 16), y); DPBUSD(a5, bcast32(q + 20), y);
    DPBUSD(a6, bcast32(q + 24), y); DPBUSD(a7, bcast32(q + 28), y); DPBUSD(a8, bcast32(q + 32), y);
    DPBUSD(a9, bcast32(q + 36), y); DPBUSD(a10, bcast32(q + 40), y); DPBUSD(a11, bcast32(q + 44), y);
  }
  return 12.0 * N / std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

int main() {
  const __m512i x = _mm512_set1_epi8(1), y = _mm512_set1_epi8(2);
  const __m512 u = _mm512_set1_ps(1.f), w = _mm512_setzero_ps();
#define DP_STEP(c) DPBUSD(c, x, y)
#define FMA_STEP(c) FMADD(c, u, w)
  const double dp = RATE(__m512i, _mm512_setzero_si512(), DP_STEP);
  const double fm = RATE(__m512, _mm512_setzero_ps(), FMA_STEP);
  alignas(64) static uint8_t bytes[64 * 48];
  const double db = rate_with_broadcasts(bytes);
  std::printf("vpdpbusd zmm %.2f G/s (%.0f G int8 multiply-adds/s), vfmadd231ps zmm %.2f G/s (%.0f G float32 "
              "multiply-adds/s), vpdpbusd each fed by a broadcast from memory %.2f G/s; one thread\n", dp / 1e9,
              dp * 64 / 1e9, fm / 1e9, fm * 16 / 1e9, db / 1e9);
#ifdef __AVX512BF16__
#define BF_STEP(c) DPBF16(c, u, w)
  const double bf = RATE(__m512, _mm512_setzero_ps(), BF_STEP);
  std::printf("vdpbf16ps zmm %.2f G/s (%.0f G bf16 multiply-adds/s, %.2fx vfmadd231ps's)\n", bf / 1e9, bf * 32 / 1e9,
              bf * 32 / (fm * 16));
#endif
}
