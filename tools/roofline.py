"""The roofline of a bench test: the least time the device could take for it. pp is bound by matrix throughput
(the model FLOPs of the prompt), tg by memory (the bytes a decode step must read)."""
import math

import torch

from kernels import WeightFormat
from kernels.weights import INT4_GROUP
from models.config import ModelConfig
from models.deepseek import DeepseekModel


def device_peaks(device: torch.device, dtype) -> dict:
    """The two limits of this device, measured now: matrix throughput (one square GEMM in the dtype the prompt's
    GEMMs run in: the model dtype, into which quantized weights are dequantized, or int8 for the int8 x int8 prompt
    GEMM) and the read bandwidth (a sum over a large array: a decode step only reads)."""
    from .kernel_bench import Timer, peak_matmul, read_bandwidth
    cuda = device.type == "cuda"
    timer = Timer(device, min_reps=5, target_s=0.5)
    return dict(tflops=peak_matmul(8192 if cuda else 2048, dtype, device, timer)["tflops"],
                gbps=read_bandwidth(device, timer, (2 << 30) if cuda else (1 << 30))["gbps"])


def layer_params(cfg: ModelConfig, i: int) -> tuple[int, int, int]:
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
        dense, per_expert, other = layer_params(cfg, i)
        total += 2 * n * (dense + other + k * per_expert) + 2 * keys * H * (cfg.qk_head_dim + cfg.v_head_dim)
    return total + 2 * cfg.vocab_size * cfg.hidden_size


def decode_bytes(cfg: ModelConfig, batch: int, ctx: float, dtype, weight_dtype: str | None,
                 cache_bytes_per_token: float, float_dtype=None) -> float:
    """Bytes one decode step reads at least: every weight once as it is stored (of the routed experts, those the
    batch picks: E (1 - (1 - k / E)^batch) per layer for a uniform router), the LM head, and each sequence's cached
    latent. float_dtype: what float weights are stored in (None: dtype); kv_b_proj is, the router (small) counted
    with it. An int4 weight is its nibbles and its float32 scale per group of INT4_GROUP; an int8 weight's one scale
    per row is left out (under 0.1% of its bytes)."""
    o_elt = torch.empty(0, dtype=float_dtype or dtype).element_size()
    q_elt = {"int8": 1, "int4": 0.5 + 4 / INT4_GROUP}.get(weight_dtype, o_elt)  # the linears and experts
    total = cfg.vocab_size * cfg.hidden_size * q_elt + batch * ctx * cache_bytes_per_token
    for i in range(cfg.num_hidden_layers):
        dense, per_expert, other = layer_params(cfg, i)
        E, k = cfg.n_routed_experts or 1, cfg.num_experts_per_tok
        experts = E * (1 - (1 - k / E) ** batch) if per_expert else 0
        total += (dense + experts * per_expert) * q_elt + other * o_elt
    return total


def roofline_share(llm, peaks: dict, kind: str, n: int, depth: int, batch: int, tps: float) -> float:
    """pp: achieved model FLOP/s over the GEMM peak; tg: bytes read per second over the read bandwidth (the cache
    averaged over the n generated tokens)."""
    cfg = llm.model_config
    if kind == "pp":
        return prompt_flops(cfg, n, depth) / n * tps / (peaks["tflops"] * 1e12)
    cache_bytes = llm.cache.format.bytes_per_token * cfg.num_hidden_layers  # per token
    c = llm.config
    step = decode_bytes(cfg, batch, depth + n / 2, llm.dtype, c.weight_dtype, cache_bytes,
                        c.weight_format.float_dtype)
    return step * tps / batch / (peaks["gbps"] * 1e9)


def param_count(cfg: ModelConfig) -> float:
    """Parameters of the checkpoint: every tensor it stores once (shapes only, on the meta device)."""
    meta = WeightFormat(torch.float16, torch.device("meta"))
    return sum(math.prod(w.shape) for _, w in DeepseekModel(cfg, meta).weights())


def fmt_params(n: float) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"
