"""mla plan: what a model needs per rank under tensor parallelism, computed from its config alone (no device, no
weights): the weights each rank stores, the latent cache per token (every rank holds all of it: the latent is per
token, not per head), the tokens and the batch x context that fit in a given memory, and the bytes the ranks exchange
per decode step. The bytes are the memory plan's (engine/memory.py), the engine's own count."""
from dataclasses import replace

from engine import memory
from engine.config import EngineConfig
from models.config import ModelConfig

CONTEXTS = (4096, 32768, 131072)
LINKS = {"NVLink (900 GB/s)": 900e9, "PCIe 5 x16 (64 GB/s)": 64e9}


def plan(config_file: str, tp: int, memory_gib: float, dtype: str = "bfloat16", weight_dtype: str | None = None,
         kv_cache_dtype: str = "auto", max_num_batched_tokens: int = 4096) -> dict:
    cfg = ModelConfig.from_hf(config_file)
    c = EngineConfig(config_file, device="cuda", dtype=dtype, weight_dtype=weight_dtype, kv_cache_dtype=kv_cache_dtype,
                     tensor_parallel_size=tp, max_num_batched_tokens=max_num_batched_tokens, load_format="dummy")
    c = replace(c, model_config=cfg, kv_cache_dtype=dtype if kv_cache_dtype == "auto" else kv_cache_dtype,
                max_model_len=cfg.max_position_embeddings)
    c.check_split(cfg)
    weights, work = memory.weight_bytes(c), memory.workspace_bytes(c)
    per_token = memory.cache_bytes_per_token(c)
    tokens = max(0, int((memory_gib * 2**30 - weights - work) // per_token))
    # per decode step of B sequences: an all-reduce of [B, D] after every attention and every MLP, one after the
    # embedding lookup, and an all-gather of the logits [B, V] (float32 on the wire here: the logits' dtype)
    elt = c.torch_dtype.itemsize
    n_reduce = 2 * cfg.num_hidden_layers + 1
    comm = {}
    for B in (1, 64):
        reduce_bytes = B * cfg.hidden_size * elt
        gather_bytes = B * cfg.vocab_size * elt
        # ring algorithms: an all-reduce sends 2 (N - 1) / N of its bytes from each rank, an all-gather (N - 1) / N
        sent = (n_reduce * 2 * reduce_bytes + gather_bytes) * (tp - 1) / tp
        comm[B] = dict(all_reduces=n_reduce, all_reduce_bytes=reduce_bytes, all_gather_bytes=gather_bytes,
                       sent_per_rank=sent, **{f"time_s {k}": sent / bw for k, bw in LINKS.items()})
    return dict(model=config_file, tp=tp, memory_gib=memory_gib, dtype=dtype, weight_dtype=weight_dtype or dtype,
                kv_cache_dtype=c.kv_cache_dtype, weights_per_rank=weights, workspace=work,
                cache_bytes_per_token=per_token, tokens_per_rank=tokens,
                batch_at_context={ctx: tokens // ctx for ctx in CONTEXTS + (cfg.max_position_embeddings,)
                                  if ctx <= cfg.max_position_embeddings},
                comm=comm, fits=tokens > 0)


def markdown(p: dict) -> str:
    gib = lambda b: f"{b / 2**30:.1f} GiB"  # noqa: E731
    lines = [f"{p['model']}: tensor parallel over {p['tp']} ranks of {p['memory_gib']:g} GiB, {p['dtype']} "
             f"activations, {p['weight_dtype']} weights, {p['kv_cache_dtype']} KV cache", "",
             "| per rank | |", "|---|---|",
             f"| weights | {gib(p['weights_per_rank'])} |", f"| workspace (one {4096}-token step) | {gib(p['workspace'])} |",
             f"| KV cache per token (every rank holds the whole latent) | {p['cache_bytes_per_token'] / 1024:.1f} KiB |",
             f"| tokens of KV cache that fit | {p['tokens_per_rank']:,} |"]
    if not p["fits"]:
        lines.append(f"| | the weights alone do not fit in {p['memory_gib']:g} GiB |")
    lines += ["", "| context | largest batch |", "|---|---|"]
    lines += [f"| {ctx:,} | {b:,} |" for ctx, b in p["batch_at_context"].items()]
    lines += ["", "| decode step | all-reduces | bytes sent per rank | " + " | ".join(LINKS) + " |",
              "|---|---|---|" + "---|" * len(LINKS)]
    for B, c in p["comm"].items():
        times = " | ".join(f"{c[f'time_s {k}'] * 1e6:.1f} us" for k in LINKS)
        lines.append(f"| batch {B} | {c['all_reduces']} x {c['all_reduce_bytes'] / 1024:.1f} KiB + logits "
                     f"{c['all_gather_bytes'] / 1024:.0f} KiB | {c['sent_per_rank'] / 2**20:.2f} MiB | {times} |")
    return "\n".join(lines)
