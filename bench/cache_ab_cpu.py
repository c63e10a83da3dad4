"""Decode ms per step at a depth over two latent-cache formats, alternated in one process (this machine's speed moves
by 10-25% from one minute to the next, so separate runs cannot compare them). Prefix caching keeps the deep prompt
cached: each round recomputes only its last block, then times 32 decode steps; the first round fills the caches.

    python bench/cache_ab_cpu.py MODEL_DIR [DEPTH=4096] [WEIGHT_DTYPE=int4|int8|bfloat16] [FORMATS=auto,int8] [ROUNDS=4]
"""
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from engine import LLM, SamplingParams  # noqa: E402

model, depth = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 4096
weight_dtype = sys.argv[3] if len(sys.argv) > 3 else "int4"
formats = sys.argv[4].split(",") if len(sys.argv) > 4 else ["auto", "int8"]
rounds = int(sys.argv[5]) if len(sys.argv) > 5 else 4
llms = {c: LLM(model, device="cpu", weight_dtype=weight_dtype, kv_cache_dtype=c, progress=False,
               kv_cache_memory_gib=1) for c in formats}
prompt = [5 + i % 90 for i in range(depth)]
sp = SamplingParams(max_tokens=33, temperature=0, ignore_eos=True)  # the first token is the prompt's
ms = {c: [] for c in formats}
for r in range(rounds + 1):
    for c, llm in llms.items():
        seq = llm.add_request(prompt, sp)
        while seq.in_prefill or not seq.output_token_ids:
            llm.step()
        t, n = time.perf_counter(), 0
        while not llm.scheduler.idle:
            llm.step()
            n += 1
        if r:
            ms[c].append((time.perf_counter() - t) / n * 1e3)
    if r:
        print(f"round {r}: " + ", ".join(f"{c} {ms[c][-1]:.1f}" for c in formats) + " ms/step", flush=True)
print(f"depth {depth}, {weight_dtype} weights, median ms/step: " +
      ", ".join(f"{c} {statistics.median(v):.1f}" for c, v in ms.items()))
