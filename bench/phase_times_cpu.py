"""Where a CPU decode step's wall time goes, phase by phase inside the C++ decoder layer (kernels/cpu_layer.cpp
DecodeLayer), with the bytes each product phase reads per step and the rate it reads them at, beside the read
bandwidth measured in the same run (tools/kernel_bench.py read_bandwidth, the roofline's). The kernels are built once
with -DMLA_PHASE_TIMES (their own build folder; the engine's build has no timers). Each round decodes 32 tokens after
a prompt of DEPTH tokens; the table gives each phase's median over the rounds.

    python bench/phase_times_cpu.py MODEL_DIR [WEIGHT_DTYPE=int4|int8|bfloat16] [DEPTH=16] [ROUNDS=5]
                                    [KV_CACHE_DTYPE=auto|bfloat16|int8|...]
"""
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kernels import cpu  # noqa: E402

cpu.CFLAGS = cpu.CFLAGS + ("-DMLA_PHASE_TIMES",)  # before anything builds the kernels
from engine import LLM  # noqa: E402
from tools.bench import EngineRunner  # noqa: E402
from tools.kernel_bench import Timer, read_bandwidth  # noqa: E402

model = sys.argv[1]
weight_dtype = sys.argv[2] if len(sys.argv) > 2 else "int4"
depth = int(sys.argv[3]) if len(sys.argv) > 3 else 16
rounds = int(sys.argv[4]) if len(sys.argv) > 4 else 5
kv_cache_dtype = sys.argv[5] if len(sys.argv) > 5 else "auto"
STEPS = 32

llm = LLM(model, device="cpu", weight_dtype=weight_dtype, kv_cache_dtype=kv_cache_dtype, progress=False,
          kv_cache_memory_gib=1)
if not hasattr(cpu.ext(), "phase_times"):
    sys.exit("phase_times_cpu: the CPU kernels did not build with -DMLA_PHASE_TIMES")


def nbytes(w) -> int:  # a tensor, a QuantWeight or None
    return 0 if w is None else w.nbytes


# what each product phase reads per step, summed over the layers
cfg = llm.runner.model.cfg
read = {}
for layer in llm.runner.model.layers:
    w = layer.decode_weights()
    moe = w.gate is not None
    per_step = {"q_proj, kv_a_proj": nbytes(w.q_proj) + nbytes(w.q_a_proj) + nbytes(w.kv_a_proj_with_mqa),
                "w_uk": nbytes(w.w_uk), "w_uv": nbytes(w.w_uv), "o_proj": nbytes(w.o_proj),
                "dense mlp": 0 if moe else nbytes(w.w13) + nbytes(w.w2),
                "experts w13": cfg.num_experts_per_tok * nbytes(w.w13) // max(cfg.n_routed_experts, 1)
                + nbytes(w.shared_w13) if moe else 0,
                "experts w2": cfg.num_experts_per_tok * nbytes(w.w2) // max(cfg.n_routed_experts, 1)
                + nbytes(w.shared_w2) if moe else 0}
    for k, v in per_step.items():
        read[k] = read.get(k, 0) + v
cache = llm.runner.cache.layers[0]
row = cache.shape[-1] * cache.element_size()
read["attention"] = cfg.num_hidden_layers * (depth + STEPS // 2) * row  # the mean depth of a round's steps
read["outside the layers"] = nbytes(llm.runner.model.lm_head)

runner = EngineRunner(llm)
per_round, step_ms = [], []
for r in range(rounds + 1):  # the same prompt each round: prefix caching keeps it, only its last block is redone
    ms = 1e3 / runner.tg(STEPS, depth, 1, seed=0, on_start=cpu.ext().phase_times)  # phase_times(): the totals start over
    times = cpu.ext().phase_times()
    if r:  # the first round warms up
        per_round.append({k: v / STEPS for k, v in times})
        step_ms.append(ms)
    print(f"round {r}: {ms:.1f} ms/step", file=sys.stderr, flush=True)

bw = read_bandwidth(torch.device("cpu"), Timer(torch.device("cpu"), min_reps=5, target_s=0.5), 1 << 30)["gbps"]
med = {k: statistics.median(rd.get(k, 0.0) for rd in per_round) for k in per_round[0]}
total = sum(med.values())
print(f"{os.path.basename(os.path.normpath(model))}, {weight_dtype} weights, {kv_cache_dtype} cache, depth {depth}: "
      f"{statistics.median(step_ms):.1f} ms/step (medians of {rounds} rounds of {STEPS} steps), read bandwidth "
      f"{bw:.1f} GB/s\n")
print("| phase | ms/step | share | MB read/step | GB/s | of read bandwidth |\n|---|---|---|---|---|---|")
for k, s in med.items():
    b = read.get(k, 0)
    rate = f"| {b / 1e6:.1f} | {b / s / 1e9:.1f} | {b / s / 1e9 / bw:.0%} |" if b else "| | | |"
    print(f"| {k} | {s * 1e3:.2f} | {s / total:.1%} {rate}")
moved = sum(read.values())
print(f"\nall phases {total * 1e3:.1f} ms/step, {moved / 1e6:.0f} MB read: {moved / total / 1e9:.1f} GB/s, "
      f"{moved / total / 1e9 / bw:.0%} of the read bandwidth")
