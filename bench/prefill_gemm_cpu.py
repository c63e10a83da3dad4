"""The int8 x int8 prompt product's int4 operand (kernels/matmul.py int8_gemm): one expert-shaped int4 weight turned
into int8 rows by kernels.cpu.requantize_rows, against the same result the slow way (dequantized to float32, then
quantized per row: kernels.cpu.dequantize then quantize_tokens), and the whole product at a few token counts beside
the C++ row kernels (kernels.cpu.gemv, what FEW_ROWS tokens or fewer take). Medians of tools/kernel_bench.py's Timer.

    python bench/prefill_gemm_cpu.py [N] [K] [M,...]      (NT=1 for one thread; default: V2-Lite's w2, 2048 x 1408)
"""
import os
import sys

import torch

from kernels import cpu
from kernels.matmul import int8_gemm
from kernels.weights import quantize_weight
from tools.kernel_bench import Timer

torch.manual_seed(0)
torch.set_num_threads(int(os.environ.get("NT", os.cpu_count())))
N = int(sys.argv[1]) if len(sys.argv) > 1 else 2048
K = int(sys.argv[2]) if len(sys.argv) > 2 else 1408
Ms = [int(m) for m in sys.argv[3].split(",")] if len(sys.argv) > 3 else [16, 48, 128, 512]
timer = Timer(torch.device("cpu"), min_reps=9, target_s=0.5)

qw = quantize_weight(torch.randn(N, K) * 0.02, "int4")
q8, s8, wf = torch.empty(N, K, dtype=torch.int8), torch.empty(N), torch.empty(N, K)
table = timer(lambda: cpu.requantize_rows(qw, q8, s8))
two_pass = timer(lambda: (cpu.dequantize(qw, wf), cpu.quantize_tokens(wf)))
assert torch.equal(cpu.quantize_tokens(wf)[0], q8)  # the same bits both ways
print(f"int4 [{N}, {K}] -> int8 rows: requantize_rows {N * K / table / 1e9:.1f} Gvalues/s, dequantize + quantize "
      f"{N * K / two_pass / 1e9:.1f} Gvalues/s ({two_pass / table:.1f}x)")
for M in Ms:
    x = torch.randn(M, K)
    print(f"  {M:4d} tokens: int8_gemm {timer(lambda: int8_gemm(x, qw)) * 1e3:.3f} ms, row kernels (gemv) "
          f"{timer(lambda: cpu.gemv(x, qw)) * 1e3:.3f} ms")
