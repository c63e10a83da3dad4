"""A prompt's MoE layer on the CPU, int8 x int8: kernels.cpu.moe_prompt (the routed experts in one call, each expert
whole on one thread) against the per-expert loop it replaced (kernels/moe.py moe_experts_reference over
kernels/matmul.py int8_gemm), on DeepSeek-V2-Lite's shapes: 512 tokens, 64 experts, top-6, D 2048, I 1408. LAYERS
distinct layers are cycled so that their weights come from memory, as in a model, not from the last-level cache.
Where the CPU has bf16 instructions (AVX512_BF16, AMX), also the path of a bf16 model (--dtype bfloat16, and the
default with AMX): the per-expert loop over the experts dequantized to bf16 (kernels/matmul.py dequantized_gemm), and
the same loop over bf16 experts. Prints the median ms per layer of each and its GOP/s (2 x the multiply-adds of both
projections).

    python bench/moe_prompt_cpu.py [int4|int8] [LAYERS] [REPS]
"""
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from kernels import cpu
from kernels.cpu import cpu_flags
from kernels.matmul import dequantized_gemm, int8_gemm
from kernels.moe import moe_experts_reference
from kernels.weights import quantize_experts

mode = sys.argv[1] if len(sys.argv) > 1 else "int4"
L = int(sys.argv[2]) if len(sys.argv) > 2 else 6
reps = int(sys.argv[3]) if len(sys.argv) > 3 else 5
T, D, I, E, k = 512, 2048, 1408, 64, 6
torch.manual_seed(0)
x = torch.randn(T, D)
ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
topw = torch.rand(T, k)
print(f"quantizing {L} layers of {E} experts ({mode})...", flush=True)
layers = [(quantize_experts(torch.randn(E, 2 * I, D) / D ** 0.5, mode),
           quantize_experts(torch.randn(E, D, I) / I ** 0.5, mode)) for _ in range(L)]
paths = {"moe_prompt": (lambda w13, w2: cpu.moe_prompt(x, ids, topw, w13, w2), layers),
         "per-expert loop": (lambda w13, w2: moe_experts_reference(x, ids, topw, w13, w2, int8_gemm), layers)}
if {"avx512_bf16", "amx_bf16"} & set(cpu_flags()):
    xb = x.bfloat16()
    bf16_layers = [(torch.randn(E, 2 * I, D, dtype=torch.bfloat16) / D ** 0.5,
                    torch.randn(E, D, I, dtype=torch.bfloat16) / I ** 0.5) for _ in range(L)]
    paths["loop, dequant bf16"] = (lambda w13, w2: moe_experts_reference(xb, ids, topw, w13, w2, dequantized_gemm),
                                   layers)
    paths["loop, bf16 experts"] = (lambda w13, w2: moe_experts_reference(xb, ids, topw, w13, w2, F.linear),
                                   bf16_layers)
ms = {name: [] for name in paths}
for r in range(reps + 1):  # the first round warms up; the paths alternate
    for name, (f, ws) in paths.items():
        t = time.perf_counter()
        for w13, w2 in ws:
            f(w13, w2)
        if r:
            ms[name].append((time.perf_counter() - t) / L * 1e3)
gop = 2 * T * k * 3 * D * I / 1e9
for name, v in ms.items():
    m = statistics.median(v)
    print(f"{name:20s} {m:7.1f} ms per layer  {gop / m * 1e3:6.0f} GOP/s   runs: {[round(a, 1) for a in v]}")
