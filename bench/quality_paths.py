"""Perplexity of the default model through the prefill path (4096-token steps) and the decode path (one token per
step: the few-row C++ GEMV, which quantizes activations per block of 128 for int8/int4 weights), on its held-out
text. Prints the rows of bench/results/quality-cpu.md's second table.  python bench/quality_paths.py
With `caches`: the float32 model over each latent-cache format instead (the decode path's attention over an int8
cache runs on int8 on a CPU with VNNI, its query quantized per head).  python bench/quality_paths.py caches"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from engine import LLM  # noqa: E402
from models.default.train import build_corpus  # noqa: E402
from tools.perplexity import perplexity  # noqa: E402

_, held, _ = build_corpus()
text = "\n\n".join(held) if isinstance(held[0], str) else "\n\n".join(d["text"] for d in held)
caches = sys.argv[1:] == ["caches"]
configs = [("float32", None, c) for c in ("auto", "int8", "fp8")] if caches else \
    [(dtype, w, "auto") for dtype in ("float32", "bfloat16") for w in (None, "int8", "int4")]
for dtype, w, cache in configs:
    row = [dtype, w or dtype] + ([cache] if caches else [])
    for mbt in (4096, 1):
        llm = LLM(os.path.join(ROOT, "models", "default"), device="cpu", dtype=dtype, weight_dtype=w,
                  kv_cache_dtype=cache, progress=False, kv_cache_memory_gib=0.05, max_num_batched_tokens=mbt)
        ids = llm.encode(text)
        if mbt > 1:
            row.append(f"{perplexity(llm, ids[:8 * 256], 256, progress=False)['ppl']:.4f}")
        r = perplexity(llm, ids if mbt > 1 else ids[:8 * 256], 256, progress=False)  # decode path: 8 chunks
        row.append(f"{r['ppl']:.4f} ± {r['ppl_stderr']:.4f}")
    print("| " + " | ".join(row) + " |", flush=True)
