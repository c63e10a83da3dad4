"""mla tune: the absorbed/expanded crossover on this device, from one layer's attention timed both ways."""
import statistics
import sys
import time

import torch
from tqdm import tqdm

from engine.llm import LLM
from models.attention import SeqGroup


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tune(llm: LLM, depths: list[int], q_lens: list[int], reps: int = 3, progress: bool = True) -> list[dict]:
    """Time one layer's attention for q new tokens over a cached prefix of `depth`, absorbed against expanded
    (MLAttention.absorbed / .expanded, the model's own two forms). The rest of the layer is the same on both paths,
    so only attention is timed: the difference is what the threshold decides."""
    attn, cfg, dev = llm.model.layers[0].self_attn, llm.model_config, llm.device
    H, bs, ops = cfg.num_attention_heads, llm.blocks.block_size, llm.model.ops
    g = torch.Generator(device=dev).manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g, device=dev, dtype=llm.dtype)
    rows = []
    bar = tqdm(total=len(depths) * len(q_lens), desc="tune", disable=not progress, file=sys.stderr, leave=False)
    for depth in depths:
        for q in q_lens:
            L = depth + q
            if -(-L // bs) > llm.cache.num_blocks:
                raise ValueError(f"depth {depth} + {q} tokens do not fit in the KV cache; raise --kv-cache-gib")
            kv_cache = llm.cache.layers[0]
            ops.write_latent(kv_cache, torch.arange(L, device=dev), rand(L, cfg.kv_lora_rank),
                             rand(L, cfg.qk_rope_head_dim))
            group = SeqGroup(token_index=None,
                             block_tables=torch.arange(-(-L // bs), dtype=torch.int32, device=dev)[None],
                             cu_seqlens_q=torch.tensor([0, q], dtype=torch.int32, device=dev),
                             seq_lens=torch.tensor([L], dtype=torch.int32, device=dev), max_q_len=q)
            q_nope, q_pe = rand(q, H, cfg.qk_nope_head_dim), rand(q, H, cfg.qk_rope_head_dim)
            row = {"depth": depth, "q": q}
            for name in ("absorbed", "expanded"):
                form = getattr(attn, name)

                def once():
                    _sync(dev)
                    t = time.perf_counter()
                    form(q_nope, q_pe, kv_cache, group, ops)
                    _sync(dev)
                    return time.perf_counter() - t
                row[name] = statistics.median([once() for _ in range(reps + 1)][1:])
            rows.append(row)
            bar.update()
    bar.close()
    return rows


def crossover(rows: list[dict]) -> int:
    """Smallest q from which expanded is at least as fast as absorbed at every measured depth."""
    qs = sorted({r["q"] for r in rows})
    for q in qs:
        if all(r["expanded"] <= r["absorbed"] for r in rows if r["q"] >= q):
            return q
    return qs[-1] * 2


def markdown(rows: list[dict]) -> str:
    lines = ["| depth | q tokens | absorbed ms | expanded ms | expanded / absorbed |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['depth']} | {r['q']} | {r['absorbed'] * 1e3:.2f} | {r['expanded'] * 1e3:.2f} | "
                     f"{r['expanded'] / r['absorbed']:.2f} |")
    return "\n".join(lines)
