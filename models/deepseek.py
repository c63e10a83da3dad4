"""The DeepSeek-V2/V3 decoder: embeddings, MLA + (dense MLP | MoE) layers, final norm, LM head."""
import torch
import torch.nn.functional as F

import kernels

from .attention import AttnMetadata, MLAttention
from .config import ModelConfig
from .layers import linear, rms_norm, silu_mlp
from .moe import MoE
from .rope import RotaryEmbedding


class DenseMLP:
    def __init__(self, cfg: ModelConfig, dtype, device, backend: str = "torch"):
        I = cfg.intermediate_size
        self.backend = backend
        self.w13 = torch.empty(2 * I, cfg.hidden_size, dtype=dtype, device=device)
        self.w2 = torch.empty(cfg.hidden_size, I, dtype=dtype, device=device)

    def weights(self):
        I = self.w2.shape[1]
        return {"gate_proj.weight": self.w13[:I], "up_proj.weight": self.w13[I:], "down_proj.weight": self.w2}

    def quantize_weights(self, mode: str):
        self.w13, self.w2 = kernels.quantize_weight(self.w13, mode), kernels.quantize_weight(self.w2, mode)

    def __call__(self, x):
        return silu_mlp(x, self.w13, self.w2, self.backend)


class DecoderLayer:
    def __init__(self, cfg: ModelConfig, i: int, rope, dtype, device, backend):
        self.eps = cfg.rms_norm_eps
        self.input_layernorm = torch.empty(cfg.hidden_size, dtype=dtype, device=device)
        self.post_attention_layernorm = torch.empty(cfg.hidden_size, dtype=dtype, device=device)
        self.self_attn = MLAttention(cfg, rope, dtype, device, backend)
        self.mlp = (MoE if cfg.is_moe_layer(i) else DenseMLP)(cfg, dtype, device, backend)

    def weights(self):
        w = {"input_layernorm.weight": self.input_layernorm, "post_attention_layernorm.weight": self.post_attention_layernorm}
        w.update({f"self_attn.{k}": v for k, v in self.self_attn.weights().items()})
        w.update({f"mlp.{k}": v for k, v in self.mlp.weights().items()})
        return w

    def __call__(self, x, meta: AttnMetadata, kv_cache):
        x = x + self.self_attn(rms_norm(x, self.input_layernorm, self.eps), meta, kv_cache)
        return x + self.mlp(rms_norm(x, self.post_attention_layernorm, self.eps))


class DeepseekModel:
    """Holds the weights (filled by models.loader) and runs one packed forward pass over T tokens."""

    def __init__(self, cfg: ModelConfig, dtype=torch.float32, device="cpu", backend="torch"):
        self.cfg, self.dtype, self.device, self.backend = cfg, dtype, torch.device(device), backend
        self.rope = rope = RotaryEmbedding(cfg, device)
        self.embed_tokens = torch.empty(cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=device)
        self.layers = [DecoderLayer(cfg, i, rope, dtype, device, backend) for i in range(cfg.num_hidden_layers)]
        self.norm = torch.empty(cfg.hidden_size, dtype=dtype, device=device)
        self.lm_head = self.embed_tokens if cfg.tie_word_embeddings else torch.empty_like(self.embed_tokens)

    def weights(self) -> dict[str, torch.Tensor]:
        """Checkpoint tensor name -> the tensor (or view) that it is loaded into."""
        w = {"model.embed_tokens.weight": self.embed_tokens, "model.norm.weight": self.norm}
        if not self.cfg.tie_word_embeddings:
            w["lm_head.weight"] = self.lm_head
        for i, layer in enumerate(self.layers):
            w.update({f"model.layers.{i}.{k}": v for k, v in layer.weights().items()})
        return w

    def after_load(self):
        for layer in self.layers:
            layer.self_attn.split_kv_b()

    def quantize_weights(self, mode: str):
        """Weight-only int8 / int4 for every linear and expert, and the LM head; embeddings, norms, the router
        and kv_b_proj (W_UK, W_UV) stay in the model dtype."""
        for layer in self.layers:
            layer.self_attn.quantize_weights(mode)
            layer.mlp.quantize_weights(mode)
        self.lm_head = kernels.quantize_weight(self.lm_head, mode)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, meta: AttnMetadata, kv_caches: list[torch.Tensor]) -> torch.Tensor:
        """input_ids [T] -> final hidden states [T, D] (after the last norm)."""
        x = F.embedding(input_ids, self.embed_tokens)
        for layer, kv_cache in zip(self.layers, kv_caches):
            x = layer(x, meta, kv_cache)
        return rms_norm(x, self.norm, self.cfg.rms_norm_eps)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return linear(hidden, self.lm_head, self.backend).float()
