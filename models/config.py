"""config.json (as DeepSeek publishes it, or as transformers 5 saves it) -> one frozen ModelConfig."""
import json
import math
import os
from dataclasses import dataclass

from .errors import ModelError

ARCHITECTURES = {"DeepseekV2ForCausalLM": "deepseek_v2", "DeepseekV3ForCausalLM": "deepseek_v3"}
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
SCORING_FUNCS = ("softmax", "sigmoid")
DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class ModelConfig:
    arch: str  # "deepseek_v2" | "deepseek_v3"
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    intermediate_size: int
    moe_intermediate_size: int
    n_routed_experts: int | None
    n_shared_experts: int | None
    num_experts_per_tok: int | None
    first_k_dense_replace: int
    moe_layer_freq: int
    topk_method: str
    scoring_func: str
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    routed_scaling_factor: float
    rms_norm_eps: float
    tie_word_embeddings: bool
    max_position_embeddings: int
    rope_theta: float
    rope_interleave: bool
    # YaRN; rope_factor == 1.0 means plain RoPE
    rope_factor: float
    rope_original_max_position: int
    rope_beta_fast: float
    rope_beta_slow: float
    rope_mscale: float
    rope_mscale_all_dim: float
    torch_dtype: str
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    fp8_block: tuple[int, int] | None = None  # DeepSeek-V3's fp8 checkpoints: weight blocks dequantized at load

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_cache_width(self) -> int:
        """Values cached per token per layer: the latent c_kv and the shared RoPE key k_pe."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        scale = self.qk_head_dim ** -0.5
        if self.rope_factor > 1.0 and self.rope_mscale_all_dim:
            m = yarn_mscale(self.rope_factor, self.rope_mscale_all_dim)
            scale *= m * m
        return scale

    def is_moe_layer(self, i: int) -> bool:
        return bool(self.n_routed_experts) and i >= self.first_k_dense_replace and i % self.moe_layer_freq == 0

    @classmethod
    def from_hf(cls, path: str) -> "ModelConfig":
        file = os.path.join(path, "config.json") if os.path.isdir(path) else path
        if not os.path.exists(file):
            raise ModelError(f"{file}: no config.json")
        try:
            with open(file) as f:
                raw = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelError(f"{file}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise ModelError(f"{file}: expected a JSON object")
        return cls.from_dict(raw, file)

    @classmethod
    def from_dict(cls, raw: dict, file: str = "config.json") -> "ModelConfig":
        def bad(field, why):
            return ModelError(f"{file}: {field}={raw.get(field)!r}: {why}")

        def need(field):
            if raw.get(field) is None:
                raise ModelError(f"{file}: required field {field} is missing")
            return raw[field]

        archs = raw.get("architectures") or []
        arch = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
        if arch is None:
            arch = {"deepseek_v2": "deepseek_v2", "deepseek_v3": "deepseek_v3"}.get(raw.get("model_type"))
        if arch is None:
            raise ModelError(f"{file}: architectures={archs!r}: unsupported architecture "
                             f"(supported: {', '.join(ARCHITECTURES)})")
        fp8_block = None
        if raw.get("quantization_config"):  # DeepSeek-V3's own: fp8 e4m3 weights, one fp32 scale per block
            q = raw["quantization_config"]
            if not isinstance(q, dict) or q.get("quant_method") != "fp8":
                method = q.get("quant_method") if isinstance(q, dict) else q
                raise bad("quantization_config", f"quant_method={method!r} is not supported (fp8 block-quantized "
                          "checkpoints are; or use a bf16 checkpoint)")
            block = q.get("weight_block_size")
            if q.get("fmt", "e4m3") != "e4m3" or not (isinstance(block, list) and len(block) == 2
                                                      and all(isinstance(b, int) and b > 0 for b in block)):
                raise bad("quantization_config", f"fp8 needs fmt e4m3 and weight_block_size [rows, cols], got "
                          f"fmt={q.get('fmt')!r}, weight_block_size={block!r}")
            fp8_block = tuple(block)
        if raw.get("attention_bias"):
            raise bad("attention_bias", "attention biases are not supported")
        if raw.get("mlp_bias"):
            raise bad("mlp_bias", "MLP biases are not supported")
        if raw.get("hidden_act", "silu") != "silu":
            raise bad("hidden_act", "only silu is supported")
        if raw.get("num_key_value_heads", raw.get("num_attention_heads")) != raw.get("num_attention_heads"):
            raise bad("num_key_value_heads", "MLA needs num_key_value_heads == num_attention_heads")
        for field in ("pretraining_tp",):
            if raw.get(field, 1) != 1:
                raise bad(field, "only 1 is supported")

        # RoPE: DeepSeek writes rope_scaling + rope_theta; transformers 5 writes rope_parameters.
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise bad("rope_scaling", "expected an object")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        field = "rope_parameters" if "rope_parameters" in raw else "rope_scaling"
        if rope_type not in ("default", "yarn"):
            raise ModelError(f"{file}: {field}.type={rope_type!r}: unsupported (supported: default, yarn)")
        theta = float(rope.get("rope_theta", raw.get("rope_theta", 10000.0)))
        max_pos = int(need("max_position_embeddings"))
        if rope_type == "yarn":
            if rope.get("factor") is None or rope.get("original_max_position_embeddings") is None:
                raise ModelError(f"{file}: {field}: yarn needs factor and original_max_position_embeddings")
            if rope.get("attention_factor") is not None:
                raise ModelError(f"{file}: {field}.attention_factor: not supported (DeepSeek derives it from mscale)")
            yarn = dict(rope_factor=float(rope["factor"]),
                        rope_original_max_position=int(rope["original_max_position_embeddings"]),
                        rope_beta_fast=float(rope.get("beta_fast") or 32), rope_beta_slow=float(rope.get("beta_slow") or 1),
                        rope_mscale=float(rope.get("mscale") or 0), rope_mscale_all_dim=float(rope.get("mscale_all_dim") or 0))
        else:
            yarn = dict(rope_factor=1.0, rope_original_max_position=max_pos, rope_beta_fast=32.0, rope_beta_slow=1.0,
                        rope_mscale=0.0, rope_mscale_all_dim=0.0)

        n_routed = raw.get("n_routed_experts")
        topk_method = raw.get("topk_method", "noaux_tc" if arch == "deepseek_v3" else "greedy")
        if topk_method not in TOPK_METHODS:
            raise bad("topk_method", f"unsupported (supported: {', '.join(TOPK_METHODS)})")
        scoring = raw.get("scoring_func", "sigmoid" if arch == "deepseek_v3" else "softmax")
        if scoring not in SCORING_FUNCS:
            raise bad("scoring_func", f"unsupported (supported: {', '.join(SCORING_FUNCS)})")
        n_group = raw.get("n_group") or 1
        topk_group = raw.get("topk_group") or 1
        if n_routed:
            if n_routed % n_group:
                raise bad("n_group", f"must divide n_routed_experts={n_routed}")
            if topk_group > n_group:
                raise bad("topk_group", f"must be at most n_group={n_group}")
            if not 0 < need("num_experts_per_tok") <= n_routed:
                raise bad("num_experts_per_tok", f"must be in 1..n_routed_experts={n_routed}")

        dtype = raw.get("dtype") or raw.get("torch_dtype") or "bfloat16"
        if dtype not in DTYPES:
            raise ModelError(f"{file}: torch_dtype={dtype!r}: unsupported (supported: {', '.join(DTYPES)})")
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        rope_interleave = raw.get("rope_interleave", True)  # DeepSeek checkpoints store RoPE dims as pairs
        q_lora_rank = raw.get("q_lora_rank")

        cfg = cls(
            arch=arch,
            vocab_size=int(need("vocab_size")),
            hidden_size=int(need("hidden_size")),
            num_hidden_layers=int(need("num_hidden_layers")),
            num_attention_heads=int(need("num_attention_heads")),
            q_lora_rank=int(q_lora_rank) if q_lora_rank else None,
            kv_lora_rank=int(need("kv_lora_rank")),
            qk_nope_head_dim=int(need("qk_nope_head_dim")),
            qk_rope_head_dim=int(need("qk_rope_head_dim")),
            v_head_dim=int(need("v_head_dim")),
            intermediate_size=int(need("intermediate_size")),
            moe_intermediate_size=int(raw.get("moe_intermediate_size") or 0),
            n_routed_experts=int(n_routed) if n_routed else None,
            n_shared_experts=int(raw.get("n_shared_experts") or 0),
            num_experts_per_tok=int(raw.get("num_experts_per_tok") or 0),
            first_k_dense_replace=int(raw.get("first_k_dense_replace", 0)),
            moe_layer_freq=int(raw.get("moe_layer_freq", 1)),
            topk_method=topk_method,
            scoring_func=scoring,
            n_group=int(n_group),
            topk_group=int(topk_group),
            norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
            routed_scaling_factor=float(raw.get("routed_scaling_factor", 1.0)),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            max_position_embeddings=max_pos,
            rope_theta=theta,
            rope_interleave=bool(rope_interleave),
            torch_dtype=dtype,
            fp8_block=fp8_block,
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
            **yarn,
        )
        if cfg.qk_rope_head_dim % 2:
            raise bad("qk_rope_head_dim", "must be even")
        if cfg.moe_layer_freq < 1:
            raise bad("moe_layer_freq", "must be at least 1")
        return cfg


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0
