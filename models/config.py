"""config.json (as DeepSeek publishes it, or as transformers 5 saves it) -> one frozen ModelConfig."""
import json
import math
import os
from dataclasses import dataclass

from kernels.reference import SCORING_FUNCS, TOPK_METHODS

from .errors import ModelError

ARCHITECTURES = {"DeepseekV2ForCausalLM": "deepseek_v2", "DeepseekV3ForCausalLM": "deepseek_v3"}
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
    num_nextn_predict_layers: int = 0  # V3's multi-token-prediction layers: in the checkpoint, not used here

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
        def bad(field, why, value=None):
            value = raw.get(field) if value is None else value
            return ModelError(f"{file}: {field}={value!r}: {why}")

        def num(field, kind=int, lo=None, default=None, required=False, obj=None, name=None):
            """A number field, checked for type and range where it is read (obj: a nested object)."""
            src, name = (raw if obj is None else obj), name or field
            v = src.get(field)
            if v is None:
                if required:
                    raise ModelError(f"{file}: required field {name} is missing")
                return default
            ok = isinstance(v, int) if kind is int else isinstance(v, (int, float))
            if isinstance(v, bool) or not ok or (kind is float and not math.isfinite(v)):
                raise ModelError(f"{file}: {name}={v!r}: must be {'an integer' if kind is int else 'a number'}")
            if lo is not None and v < lo:
                raise ModelError(f"{file}: {name}={v!r}: must be at least {lo}")
            return kind(v)

        def flag(field, default):
            v = raw.get(field, default)
            if v is None:
                return default
            if not isinstance(v, bool):
                raise bad(field, "must be true or false")
            return v

        archs = raw.get("architectures") or []
        if not isinstance(archs, list):
            raise bad("architectures", "must be a list")
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
        heads = num("num_attention_heads", lo=1, required=True)
        if num("num_key_value_heads", lo=1, default=heads) != heads:
            raise bad("num_key_value_heads", "MLA needs num_key_value_heads == num_attention_heads")
        if num("pretraining_tp", lo=1, default=1) != 1:
            raise bad("pretraining_tp", "only 1 is supported")

        # RoPE: DeepSeek writes rope_scaling + rope_theta; transformers 5 writes rope_parameters.
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        field = "rope_parameters" if "rope_parameters" in raw else "rope_scaling"
        if not isinstance(rope, dict):
            raise bad(field, "expected an object")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "yarn"):
            raise ModelError(f"{file}: {field}.type={rope_type!r}: unsupported (supported: default, yarn)")
        theta = num("rope_theta", float, default=None, obj=rope, name=f"{field}.rope_theta")
        theta = theta if theta is not None else num("rope_theta", float, default=10000.0)
        if not theta > 0:
            raise bad("rope_theta", "must be positive", theta)
        max_pos = num("max_position_embeddings", lo=2, required=True)
        if rope_type == "yarn":
            if rope.get("factor") is None or rope.get("original_max_position_embeddings") is None:
                raise ModelError(f"{file}: {field}: yarn needs factor and original_max_position_embeddings")
            if rope.get("attention_factor") is not None:
                raise ModelError(f"{file}: {field}.attention_factor: not supported (DeepSeek derives it from mscale)")
            r = lambda key, lo, default=None, kind=float: num(key, kind, lo=lo, default=default, obj=rope,  # noqa: E731
                                                             name=f"{field}.{key}")
            yarn = dict(rope_factor=r("factor", 1.0), rope_original_max_position=r("original_max_position_embeddings", 1,
                                                                                   kind=int),
                        rope_beta_fast=r("beta_fast", 0.0, 32.0) or 32.0, rope_beta_slow=r("beta_slow", 0.0, 1.0) or 1.0,
                        rope_mscale=r("mscale", 0.0, 0.0), rope_mscale_all_dim=r("mscale_all_dim", 0.0, 0.0))
        else:
            yarn = dict(rope_factor=1.0, rope_original_max_position=max_pos, rope_beta_fast=32.0, rope_beta_slow=1.0,
                        rope_mscale=0.0, rope_mscale_all_dim=0.0)

        n_routed = num("n_routed_experts", lo=0)
        topk_method = raw.get("topk_method", "noaux_tc" if arch == "deepseek_v3" else "greedy")
        if topk_method not in TOPK_METHODS:
            raise bad("topk_method", f"unsupported (supported: {', '.join(TOPK_METHODS)})")
        scoring = raw.get("scoring_func", "sigmoid" if arch == "deepseek_v3" else "softmax")
        if scoring not in SCORING_FUNCS:
            raise bad("scoring_func", f"unsupported (supported: {', '.join(SCORING_FUNCS)})")
        n_group = num("n_group", lo=1, default=1)
        topk_group = num("topk_group", lo=1, default=1)
        per_tok = num("num_experts_per_tok", lo=1, default=0)
        if n_routed:
            if n_routed % n_group:
                raise bad("n_group", f"must divide n_routed_experts={n_routed}")
            if topk_group > n_group:
                raise bad("topk_group", f"must be at most n_group={n_group}")
            if not 0 < per_tok <= n_routed:
                raise bad("num_experts_per_tok", f"must be in 1..n_routed_experts={n_routed}", per_tok)
            num("moe_intermediate_size", lo=1, required=True)

        dtype = raw.get("dtype") or raw.get("torch_dtype") or "bfloat16"
        if dtype not in DTYPES:
            raise ModelError(f"{file}: torch_dtype={dtype!r}: unsupported (supported: {', '.join(DTYPES)})")
        eos = raw.get("eos_token_id")
        eos_list = eos if isinstance(eos, list) else ([] if eos is None else [eos])
        if not all(isinstance(e, int) and not isinstance(e, bool) and e >= 0 for e in eos_list):
            raise bad("eos_token_id", "must be a token id or a list of token ids")
        vocab = num("vocab_size", lo=1, required=True)
        layers = num("num_hidden_layers", lo=1, required=True)
        dense = num("first_k_dense_replace", lo=0, default=0)
        rope_dim = num("qk_rope_head_dim", lo=2, required=True)
        if rope_dim % 2:
            raise bad("qk_rope_head_dim", "must be even")

        return cls(
            arch=arch,
            vocab_size=vocab,
            hidden_size=num("hidden_size", lo=1, required=True),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            q_lora_rank=num("q_lora_rank", lo=0) or None,
            kv_lora_rank=num("kv_lora_rank", lo=1, required=True),
            qk_nope_head_dim=num("qk_nope_head_dim", lo=1, required=True),
            qk_rope_head_dim=rope_dim,
            v_head_dim=num("v_head_dim", lo=1, required=True),
            intermediate_size=num("intermediate_size", lo=1, required=True),
            moe_intermediate_size=num("moe_intermediate_size", lo=0, default=0),
            n_routed_experts=n_routed or None,
            n_shared_experts=num("n_shared_experts", lo=0, default=0),
            num_experts_per_tok=per_tok,
            first_k_dense_replace=dense,
            moe_layer_freq=num("moe_layer_freq", lo=1, default=1),
            topk_method=topk_method,
            scoring_func=scoring,
            n_group=n_group,
            topk_group=topk_group,
            norm_topk_prob=flag("norm_topk_prob", False),
            routed_scaling_factor=num("routed_scaling_factor", float, lo=0.0, default=1.0),
            rms_norm_eps=num("rms_norm_eps", float, lo=0.0, default=1e-6),
            tie_word_embeddings=flag("tie_word_embeddings", False),
            max_position_embeddings=max_pos,
            rope_theta=theta,
            rope_interleave=flag("rope_interleave", True),  # DeepSeek checkpoints store RoPE dims as pairs
            torch_dtype=dtype,
            fp8_block=fp8_block,
            bos_token_id=num("bos_token_id", lo=0),
            eos_token_ids=tuple(eos_list),
            num_nextn_predict_layers=num("num_nextn_predict_layers", lo=0, default=0),
            **yarn,
        )


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0
