"""Where a CPU decode step goes: the mean step time, torch.profiler's aten ops over 12 steps, and the machine's read
bandwidth (a sum over 1 GiB) in the same minute.  python bench/profile_decode.py MODEL_DIR [none|int8|int4]"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from engine import LLM, SamplingParams  # noqa: E402

weight_dtype = sys.argv[2] if len(sys.argv) > 2 and sys.argv[2] != "none" else None
llm = LLM(sys.argv[1], device="cpu", dtype="auto", weight_dtype=weight_dtype, progress=False,
          kv_cache_memory_gib=0.5)
sp = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def decode_step_s() -> float:
    seq = llm.add_request(list(range(5, 21)), sp)
    while seq.in_prefill or not seq.output_token_ids:  # the prompt and the first token are not decode steps
        llm.step()
    t, n = time.perf_counter(), 0
    while not llm.scheduler.idle:
        llm.step()
        n += 1
    return (time.perf_counter() - t) / n


decode_step_s()  # warm-up
print("decode step ms:", [round(decode_step_s() * 1e3, 1) for _ in range(3)])
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as p:
    decode_step_s()
print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
x = torch.ones(1 << 28, dtype=torch.float32)
x.sum()
t = time.perf_counter()
for _ in range(5):
    x.sum()
print(f"read bandwidth {x.nbytes * 5 / (time.perf_counter() - t) / 1e9:.1f} GB/s")
