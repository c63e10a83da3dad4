"""The DeepSeek-V2/V3 decoder: embeddings, MLA + (dense MLP | MoE) layers, final norm, LM head."""
import torch
import torch.nn.functional as F

from kernels import DecodeLayerWeights, WeightFormat
from kernels.weights import stored_bytes

from .attention import AttnMetadata, MLAttention
from .config import ModelConfig
from .layers import DenseMLP
from .moe import MoE
from .parallel import Parallel
from .rope import RotaryEmbedding


class DecoderLayer:
    def __init__(self, cfg: ModelConfig, i: int, rope, fmt: WeightFormat, par: Parallel):
        self.eps = cfg.rms_norm_eps
        self.input_layernorm = fmt.tensor(cfg.hidden_size)
        self.post_attention_layernorm = fmt.tensor(cfg.hidden_size)
        self.self_attn = MLAttention(cfg, rope, fmt, par)
        self.mlp = MoE(cfg, fmt, par) if cfg.is_moe_layer(i) else DenseMLP(cfg, fmt, par)

    def weights(self):
        w = {"input_layernorm.weight": self.input_layernorm, "post_attention_layernorm.weight": self.post_attention_layernorm}
        w.update({f"self_attn.{k}": v for k, v in self.self_attn.weights().items()})
        w.update({f"mlp.{k}": v for k, v in self.mlp.weights().items()})
        return w

    def decode_weights(self) -> DecodeLayerWeights:
        """The layer as a fused decode layer (kernels: ops.decode_layer) takes it."""
        a, mlp, cfg = self.self_attn, self.mlp, self.self_attn.cfg
        moe = isinstance(mlp, MoE)
        shared = mlp.shared if moe else None
        return DecodeLayerWeights(
            input_layernorm=self.input_layernorm, post_attention_layernorm=self.post_attention_layernorm,
            q_proj=a.q_b_proj if cfg.q_lora_rank else a.q_proj, q_a_proj=a.q_a_proj if cfg.q_lora_rank else None,
            q_a_layernorm=a.q_a_layernorm if cfg.q_lora_rank else None, kv_a_proj_with_mqa=a.kv_a_proj_with_mqa,
            kv_a_layernorm=a.kv_a_layernorm, w_uk=a.w_uk, w_uv=a.w_uv, o_proj=a.o_proj, w13=mlp.w13, w2=mlp.w2,
            gate=mlp.gate if moe else None, e_score_correction_bias=mlp.e_score_correction_bias if moe else None,
            router=mlp.router if moe else None, shared_w13=shared.w13 if shared else None,
            shared_w2=shared.w2 if shared else None, num_heads=a.H, qk_nope_head_dim=cfg.qk_nope_head_dim,
            qk_rope_head_dim=cfg.qk_rope_head_dim, kv_lora_rank=cfg.kv_lora_rank, rms_norm_eps=self.eps,
            softmax_scale=a.softmax_scale, rope_interleave=cfg.rope_interleave)

    def __call__(self, x, meta: AttnMetadata, kv_cache, ops):
        x = x + self.self_attn(ops.rms_norm(x, self.input_layernorm, self.eps), meta, kv_cache, ops)
        return x + self.mlp(ops.rms_norm(x, self.post_attention_layernorm, self.eps), ops)


class FusedDecodeLayer:
    """A decoder layer of a decode step as one call into a fused kernel (the C++ DecodeLayer on the CPU); called
    like DecoderLayer, for steps of absorbed attention only, every sequence with few new tokens."""

    def __init__(self, fused, rope: RotaryEmbedding):
        self.fused, self.rope = fused, rope

    def __call__(self, x, meta: AttnMetadata, kv_cache, ops):
        g = meta.absorbed
        return self.fused.forward(x, meta.positions, meta.slot_mapping, self.rope.cos, self.rope.sin, kv_cache,
                                  g.block_tables, g.cu_seqlens_q, g.seq_lens)


class DeepseekModel:
    """Holds the weights in their stored form (WeightFormat: float, or int8 / int4 linears and experts), filled by
    models.loader, and runs one packed forward pass over T tokens. Embeddings and kv_b_proj (W_UK, W_UV) are never
    quantized (stored in WeightFormat.float_dtype); norms and the router stay in the model dtype."""

    def __init__(self, cfg: ModelConfig, fmt: WeightFormat, par: Parallel = Parallel(), ops=None):
        """ops: the run's kernel backend (kernels.make_backend); None for a model that only counts its weights."""
        self.cfg, self.fmt, self.par, self.ops = cfg, fmt, par, ops
        self.dtype, self.device = fmt.dtype, torch.device(fmt.device)
        self.rope = rope = RotaryEmbedding(cfg, fmt.device)
        self.v0, v1 = par.span(cfg.vocab_size, "vocab_size")  # this rank's rows of the embedding and the LM head
        self.embed_tokens = fmt.unquantized(v1 - self.v0, cfg.hidden_size)
        self.layers = [DecoderLayer(cfg, i, rope, fmt, par) for i in range(cfg.num_hidden_layers)]
        self.norm = fmt.tensor(cfg.hidden_size)
        tied_float = cfg.tie_word_embeddings and fmt.quant is None
        self.lm_head = self.embed_tokens if tied_float else fmt.linear(v1 - self.v0, cfg.hidden_size)

    def weights(self) -> list[tuple[str, object]]:
        """(checkpoint tensor name, where it is stored) pairs: a float tensor (or view), a quantized weight's rows,
        a rank's part of either, or None for a tensor another rank holds. A name can appear twice: tied embeddings
        also fill a quantized LM head."""
        V, D, v0, n = self.cfg.vocab_size, self.cfg.hidden_size, self.v0, self.embed_tokens.shape[0]
        rows = lambda t: self.par.part(t, 0, v0, v0 + n, (V, D))  # noqa: E731
        w = [("model.embed_tokens.weight", rows(self.embed_tokens)), ("model.norm.weight", self.norm)]
        if self.lm_head is not self.embed_tokens:
            w.append(("model.embed_tokens.weight" if self.cfg.tie_word_embeddings else "lm_head.weight",
                      rows(self.lm_head)))
        for i, layer in enumerate(self.layers):
            w += [(f"model.layers.{i}.{k}", v) for k, v in layer.weights().items()]
        return w

    def nbytes(self) -> int:
        """Bytes of the stored weights (works on the meta device, where nothing is allocated)."""
        return stored_bytes(w for _, w in self.weights() if w is not None)

    def fused_decode_layers(self) -> list[FusedDecodeLayer] | None:
        """Every layer as a fused decode layer, where the backend has one for this model and cache (one rank)."""
        if self.par.size > 1:
            return None
        fused = [self.ops.decode_layer(layer.decode_weights()) for layer in self.layers]
        return None if None in fused else [FusedDecodeLayer(f, self.rope) for f in fused]

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, meta: AttnMetadata, cache, layers=None) -> torch.Tensor:
        """input_ids [T] -> final hidden states [T, D] (after the last norm). cache: the LatentCache (per-layer
        tensors); layers: what runs each layer (default: the Python layers; the model runner picks)."""
        if self.par.size == 1:
            x = F.embedding(input_ids, self.embed_tokens).to(self.dtype)
        else:  # each rank looks up the ids in its rows of the vocabulary, zeros elsewhere; the sum is the lookup
            local = input_ids - self.v0
            mine = (local >= 0) & (local < self.embed_tokens.shape[0])
            x = self.par.all_reduce(F.embedding(local.clamp(0, self.embed_tokens.shape[0] - 1), self.embed_tokens)
                                    .to(self.dtype) * mine[:, None].to(self.dtype))
        for layer, kv_cache in zip(layers or self.layers, cache.layers):
            x = layer(x, meta, kv_cache, self.ops)
        return self.ops.rms_norm(x, self.norm, self.cfg.rms_norm_eps)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.par.all_gather(self.ops.linear(hidden, self.lm_head)).float()
