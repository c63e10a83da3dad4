"""Throughput measurement in llama-bench's style (pp = prompt processing, tg = token generation), optionally
side by side with transformers on the same weights, and the absorbed/expanded crossover (tune)."""
import json
import math
import os
import statistics
import sys
import time

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from models.config import ModelConfig
from models.deepseek import DeepseekModel
from models.errors import ModelError
from models.loader import available_memory

from .llm import LLM
from .sampling_params import SamplingParams


def random_checkpoint(config_file: str, out_dir: str, layers: int | None = None, experts: int | None = None,
                      dtype=torch.float32, seed: int = 0, need_copies: int = 2) -> str:
    """A checkpoint of a published config with random weights (optionally cut to `layers` layers and `experts`
    routed experts), written with the published tensor names so every loader reads it."""
    try:
        with open(config_file) as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise ModelError(f"{config_file}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{config_file}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ModelError(f"{config_file}: expected a JSON object")
    if layers:
        raw["num_hidden_layers"] = layers
    if experts:
        raw["n_routed_experts"] = experts
        raw["num_experts_per_tok"] = min(raw.get("num_experts_per_tok") or experts, experts)
        if raw.get("n_group") and experts % raw["n_group"]:
            raw["n_group"] = raw["topk_group"] = 1
    raw.pop("quantization_config", None)  # random weights are made in the model dtype
    cfg = ModelConfig.from_dict(raw, config_file)
    weights = DeepseekModel(cfg, dtype=dtype, device="meta").weights()  # shapes only, nothing allocated
    nbytes = sum(t.numel() for t in weights.values()) * torch.empty(0, dtype=dtype).element_size()
    if nbytes * need_copies > available_memory(torch.device("cpu")):
        raise ModelError(f"{config_file}: {nbytes / 2**30:.1f} GiB of weights x{need_copies} will not fit in memory "
                         f"({available_memory(torch.device('cpu')) / 2**30:.1f} GiB free); use --layers N")
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, t in weights.items():
        if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
            tensors[name] = torch.ones(t.shape, dtype=dtype)
        elif name.endswith("e_score_correction_bias"):
            tensors[name] = torch.zeros(t.shape, dtype=torch.float32)
        else:
            tensors[name] = (torch.randn(t.shape, generator=g) * 0.02).to(dtype)
    del weights
    os.makedirs(out_dir, exist_ok=True)
    raw["architectures"] = [{"deepseek_v2": "DeepseekV2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"}[cfg.arch]]
    raw["torch_dtype"] = str(dtype).removeprefix("torch.")
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(raw, f, indent=1)
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    return out_dir


def _tokens(n: int, vocab: int, seed: int) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class EngineRunner:
    """Times pp / tg on our engine."""
    name = "mla-engine"

    def __init__(self, llm: LLM):
        self.llm = llm

    def pp(self, n: int, depth: int, seed: int) -> float:
        llm = self.llm
        seq = llm.add_request(_tokens(depth + n, llm.config.vocab_size, seed), SamplingParams(max_tokens=1, temperature=0))
        budget = llm.scheduler.max_num_batched_tokens
        while seq.num_cached_tokens < depth:  # the depth is prefilled before the clock starts
            llm.scheduler.max_num_batched_tokens = min(budget, depth - seq.num_cached_tokens)
            llm.step()
        llm.scheduler.max_num_batched_tokens = budget
        _sync(llm.device)
        t = time.perf_counter()
        while not seq.finished:
            llm.step()
        _sync(llm.device)
        return n / (time.perf_counter() - t)

    def tg(self, n: int, depth: int, batch: int, seed: int) -> float:
        llm = self.llm
        sp = SamplingParams(max_tokens=n + 1, temperature=0, ignore_eos=True)
        seqs = [llm.add_request(_tokens(max(depth, 1), llm.config.vocab_size, seed + i), sp) for i in range(batch)]
        while any(s.in_prefill or len(s.output_token_ids) == 0 for s in seqs):  # prefill + first token untimed
            llm.step()
        _sync(llm.device)
        t = time.perf_counter()
        while not llm.scheduler.idle:
            llm.step()
        _sync(llm.device)
        return n * batch / (time.perf_counter() - t)


class TransformersRunner:
    """The same tests through transformers (eager, its own DynamicCache) on the same weights."""
    name = "transformers"

    def __init__(self, path: str, device, dtype):
        from transformers import AutoModelForCausalLM
        self.device = device
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        self.vocab = self.model.config.vocab_size

    @torch.inference_mode()
    def pp(self, n: int, depth: int, seed: int) -> float:
        ids = torch.tensor([_tokens(depth + n, self.vocab, seed)], device=self.device)
        past = None
        if depth:
            past = self.model(ids[:, :depth], use_cache=True, logits_to_keep=1).past_key_values
        _sync(self.device)
        t = time.perf_counter()
        self.model(ids[:, depth:], past_key_values=past, use_cache=True, logits_to_keep=1)
        _sync(self.device)
        return n / (time.perf_counter() - t)

    @torch.inference_mode()
    def tg(self, n: int, depth: int, batch: int, seed: int) -> float:
        if batch != 1:
            return float("nan")
        ids = torch.tensor([_tokens(max(depth, 1), self.vocab, seed)], device=self.device)
        out = self.model(ids, use_cache=True, logits_to_keep=1)
        past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        _sync(self.device)
        t = time.perf_counter()
        for _ in range(n):
            out = self.model(tok, past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        _sync(self.device)
        return n / (time.perf_counter() - t)


def measure(fn, reps: int) -> tuple[float, float]:
    fn()  # warm-up
    xs = [fn() for _ in range(reps)]
    if any(math.isnan(x) for x in xs):
        return float("nan"), float("nan")
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def tune(llm: LLM, depths: list[int], q_lens: list[int], reps: int = 3, progress: bool = True) -> list[dict]:
    """Time one layer's attention for q new tokens over a cached prefix of `depth`, absorbed (q_nope through W_UK,
    latent attention, W_UV) against expanded (kv_b_proj over the cache, then attention). The rest of the layer is
    the same on both paths, so only attention is timed: the difference is what the threshold decides."""
    import kernels
    attn, cfg, dev = llm.model.layers[0].self_attn, llm.config, llm.device
    H, bs = cfg.num_attention_heads, llm.blocks.block_size
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
            kernels.write_latent(kv_cache, torch.arange(L, device=dev), rand(L, cfg.kv_lora_rank),
                                 rand(L, cfg.qk_rope_head_dim), backend=llm.backend)
            meta = dict(kv_cache=kv_cache, block_tables=torch.arange(-(-L // bs), dtype=torch.int32, device=dev)[None],
                        cu_seqlens_q=torch.tensor([0, q], dtype=torch.int32, device=dev),
                        seq_lens=torch.tensor([L], dtype=torch.int32, device=dev))
            q_nope, q_pe = rand(q, H, cfg.qk_nope_head_dim), rand(q, H, cfg.qk_rope_head_dim)

            def absorbed():
                q_lat = torch.einsum("thd,hdr->thr", q_nope, attn.w_uk)
                o = kernels.mla_decode(q_lat, q_pe, softmax_scale=attn.softmax_scale, backend=llm.backend, **meta)
                return torch.einsum("thr,hvr->thv", o, attn.w_uv)

            def expanded():
                return kernels.mla_prefill(q_nope, q_pe, w_kv_b=attn.kv_b_proj, softmax_scale=attn.softmax_scale,
                                           backend=llm.backend, **meta)
            row = {"depth": depth, "q": q}
            for name, fn in (("absorbed", absorbed), ("expanded", expanded)):
                def once():
                    _sync(dev)
                    t = time.perf_counter()
                    fn()
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


# ---- roofline: the least time the device could take for a test ------------------------------------------------------
def device_peaks(device: torch.device, dtype) -> dict:
    """Matrix throughput (one square GEMM in the model dtype) and copy bandwidth of this device, measured now."""
    from .kernel_bench import Timer, copy_bandwidth, peak_matmul
    cuda = device.type == "cuda"
    timer = Timer(device, min_reps=5, target_s=0.5)
    return dict(tflops=peak_matmul(8192 if cuda else 2048, dtype, device, timer)["tflops"],
                gbps=copy_bandwidth(device, timer, (2 << 30) if cuda else (512 << 20))["gbps"])


def _layer_params(cfg: ModelConfig, i: int) -> tuple[int, int, int]:
    """Layer i's weights as (quantizable ones every token uses, routed weights per expert, kv_b_proj + router)."""
    D, H = cfg.hidden_size, cfg.num_attention_heads
    q = D * cfg.q_lora_rank + cfg.q_lora_rank * H * cfg.qk_head_dim if cfg.q_lora_rank else D * H * cfg.qk_head_dim
    attn = q + D * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + H * cfg.v_head_dim * D
    kv_b = cfg.kv_lora_rank * H * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    if not cfg.is_moe_layer(i):
        return attn + 3 * D * cfg.intermediate_size, 0, kv_b
    per_expert = 3 * D * cfg.moe_intermediate_size
    return attn + cfg.n_shared_experts * per_expert, per_expert, kv_b + D * cfg.n_routed_experts


def prompt_flops(cfg: ModelConfig, n: int, depth: int) -> float:
    """Model FLOPs of prefilling n tokens after depth cached ones: 2 per weight per token through every matrix the
    token meets (its k routed experts only), causal attention in the expanded form (q.k over qk_head_dim and p.v
    over v_head_dim per head per visible key); the LM head for the last token only."""
    H, k = cfg.num_attention_heads, cfg.num_experts_per_tok
    keys = n * depth + n * (n + 1) / 2
    total = 0.0
    for i in range(cfg.num_hidden_layers):
        dense, per_expert, other = _layer_params(cfg, i)
        total += 2 * n * (dense + other + k * per_expert) + 2 * keys * H * (cfg.qk_head_dim + cfg.v_head_dim)
    return total + 2 * cfg.vocab_size * cfg.hidden_size


def decode_bytes(cfg: ModelConfig, batch: int, ctx: float, dtype, weight_dtype: str | None,
                 cache_bytes_per_token: float) -> float:
    """Bytes one decode step reads at least: every weight once (of the routed experts, those the batch picks:
    E (1 - (1 - k / E)^batch) per layer for a uniform router), the LM head, and each sequence's cached latent."""
    elt = torch.empty(0, dtype=dtype).element_size()
    q_elt = {None: elt, "int8": 1, "int4": 0.5}[weight_dtype]  # kv_b_proj and the router stay in the model dtype
    total = cfg.vocab_size * cfg.hidden_size * q_elt + batch * ctx * cache_bytes_per_token
    for i in range(cfg.num_hidden_layers):
        dense, per_expert, other = _layer_params(cfg, i)
        E, k = cfg.n_routed_experts or 1, cfg.num_experts_per_tok
        experts = E * (1 - (1 - k / E) ** batch) if per_expert else 0
        total += (dense + experts * per_expert) * q_elt + other * elt
    return total


def roofline_share(llm: LLM, peaks: dict, kind: str, n: int, depth: int, batch: int, tps: float,
                   weight_dtype: str | None) -> float:
    """pp: achieved model FLOP/s over the GEMM peak; tg: bytes read per second over the copy bandwidth (the cache
    averaged over the n generated tokens)."""
    cfg = llm.config
    if kind == "pp":
        return prompt_flops(cfg, n, depth) / n * tps / (peaks["tflops"] * 1e12)
    cache_bytes = llm.cache.width * llm.cache.layers[0].element_size() * cfg.num_hidden_layers  # per token
    step = decode_bytes(cfg, batch, depth + n / 2, llm.dtype, weight_dtype, cache_bytes)
    return step * tps / batch / (peaks["gbps"] * 1e9)


def param_count(cfg: ModelConfig) -> float:
    return sum(t.numel() for t in DeepseekModel(cfg, dtype=torch.float16, device="meta").weights().values())


def fmt_params(n: float) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def nan_safe(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.2f}"


def serve(llm: LLM, num_requests: int, prompt_lens: tuple[int, int], gen_lens: tuple[int, int], seed: int = 0) -> dict:
    """All requests arrive at once (random prompt and output lengths); the scheduler batches them continuously.
    Returns total throughput and per-request latency percentiles (time to first token, end to end)."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))
    t0 = time.perf_counter()
    seqs = [llm.add_request(_tokens(rand(*prompt_lens), llm.config.vocab_size, seed + i),
                            SamplingParams(max_tokens=rand(*gen_lens), temperature=0, ignore_eos=True))
            for i in range(num_requests)]
    first, done = {}, {}
    while not llm.scheduler.idle:
        for seq, _ in llm.step():
            now = time.perf_counter() - t0
            first.setdefault(seq.seq_id, now)
            if seq.finished:
                done[seq.seq_id] = now
    _sync(llm.device)
    wall = time.perf_counter() - t0
    pct = lambda xs, p: sorted(xs)[min(len(xs) - 1, int(p / 100 * len(xs)))]
    ttft = [first[s.seq_id] for s in seqs]
    e2e = [done[s.seq_id] for s in seqs]
    out_tokens = sum(len(s.output_token_ids) for s in seqs)
    in_tokens = sum(s.num_prompt_tokens for s in seqs)
    return {"requests": num_requests, "wall_s": wall, "prompt_tokens": in_tokens, "output_tokens": out_tokens,
            "total_tps": (in_tokens + out_tokens) / wall, "output_tps": out_tokens / wall,
            **{f"ttft_p{p}_s": pct(ttft, p) for p in (50, 90, 99)}, **{f"e2e_p{p}_s": pct(e2e, p) for p in (50, 90, 99)}}
