"""Decode ms per step at one or more depths over two latent-cache formats, alternated in one process (this machine's
speed moves by 10-25% from one minute to the next, so separate runs cannot compare them). Prefix caching keeps the
deep prompts cached: each round recomputes only their last block, then times 32 decode steps; the first round fills
the caches. With two depths it prints each format's depth ratio (the shallower step time over the deeper one).

    python bench/cache_ab_cpu.py MODEL_DIR [DEPTHS=16,4096] [WEIGHT_DTYPE=int4|int8|bfloat16] [FORMATS=auto,int8]
                                 [ROUNDS=4]
"""
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from engine import LLM, SamplingParams  # noqa: E402

model = sys.argv[1]
depths = [int(d) for d in (sys.argv[2] if len(sys.argv) > 2 else "16,4096").split(",")]
weight_dtype = sys.argv[3] if len(sys.argv) > 3 else "int4"
formats = sys.argv[4].split(",") if len(sys.argv) > 4 else ["auto", "int8"]
rounds = int(sys.argv[5]) if len(sys.argv) > 5 else 4
llms = {c: LLM(model, device="cpu", weight_dtype=weight_dtype, kv_cache_dtype=c, progress=False,
               kv_cache_memory_gib=1) for c in formats}
sp = SamplingParams(max_tokens=33, temperature=0, ignore_eos=True)  # the first token is the prompt's
ms = {(c, d): [] for c in formats for d in depths}
for r in range(rounds + 1):
    for (c, d) in ms:
        llm = llms[c]
        seq = llm.add_request([5 + i % 90 for i in range(d)], sp)
        while seq.in_prefill or not seq.output_token_ids:
            llm.step()
        t, n = time.perf_counter(), 0
        while not llm.scheduler.idle:
            llm.step()
            n += 1
        if r:
            ms[c, d].append((time.perf_counter() - t) / n * 1e3)
    if r:
        print(f"round {r}: " + ", ".join(f"{c} d{d} {v[-1]:.1f}" for (c, d), v in ms.items()) + " ms/step", flush=True)
med = {k: statistics.median(v) for k, v in ms.items()}
print(f"{weight_dtype} weights, median ms/step: " + ", ".join(f"{c} d{d} {m:.1f}" for (c, d), m in med.items()))
if len(depths) == 2:
    print("depth ratio (d%d step / d%d step): " % tuple(depths) +
          ", ".join(f"{c} {med[c, depths[0]] / med[c, depths[1]]:.0%}" for c in formats))
