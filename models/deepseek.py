"""The DeepSeek-V2/V3 decoder: embeddings, MLA + (dense MLP | MoE) layers, final norm, LM head."""
import torch
import torch.nn.functional as F

from kernels import WeightFormat, cpu
from kernels.matmul import CPU_FEW_ROWS
from kernels.weights import stored_bytes

from .attention import AttnMetadata, MLAttention
from .config import ModelConfig
from .layers import DenseMLP, linear, rms_norm
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
        cpu_ok = torch.device(fmt.device).type == "cpu" and fmt.backend == "torch" and par.size == 1
        self.cpu = None if cpu_ok else False  # the C++ layer for decode steps: not built yet, or none

    def weights(self):
        w = {"input_layernorm.weight": self.input_layernorm, "post_attention_layernorm.weight": self.post_attention_layernorm}
        w.update({f"self_attn.{k}": v for k, v in self.self_attn.weights().items()})
        w.update({f"mlp.{k}": v for k, v in self.mlp.weights().items()})
        return w

    def cpu_weights(self) -> dict:
        """The layer as kernels.cpu.decode_layer takes it."""
        a, mlp, cfg = self.self_attn, self.mlp, self.self_attn.cfg
        w = dict(ln1=self.input_layernorm, ln2=self.post_attention_layernorm, kv_a_ln=a.kv_a_layernorm, w_uk=a.w_uk,
                 w_uv=a.w_uv, kv_a=a.kv_a_proj_with_mqa, o=a.o_proj, H=a.H, dn=cfg.qk_nope_head_dim,
                 dr=cfg.qk_rope_head_dim, R=cfg.kv_lora_rank, eps=self.eps, scale=a.softmax_scale,
                 interleave=cfg.rope_interleave, w13=mlp.w13, w2=mlp.w2)
        if cfg.q_lora_rank:
            w.update(q_a=a.q_a_proj, q_a_ln=a.q_a_layernorm, q=a.q_b_proj)
        else:
            w["q"] = a.q_proj
        if isinstance(mlp, MoE):
            w.update(gate=mlp.gate, bias=mlp.e_score_correction_bias, router=mlp.router)
            if mlp.shared is not None:
                w.update(s13=mlp.shared.w13, s2=mlp.shared.w2)
        return w

    def __call__(self, x, meta: AttnMetadata, kv_cache, cache_format):
        g = meta.absorbed
        if (self.cpu is not False and meta.expanded is None and g.token_index is None and g.max_q_len is not None
                and g.max_q_len <= cpu.MAX_DECODE_QUERIES and x.shape[0] <= CPU_FEW_ROWS):
            # a CPU decode step: the whole layer in one C++ call (built on the first one: the weights are loaded)
            if self.cpu is None:
                self.cpu = cpu.decode_layer(self.cpu_weights()) or False
            kind, rope = cpu.decode_kind(cache_format), self.self_attn.rope
            if self.cpu and kind is not None:  # a cache format the C++ writes and reads (not fp8, not float16)
                return self.cpu.forward(x, meta.positions, meta.slot_mapping, rope.cos, rope.sin, kv_cache,
                                        g.block_tables, g.cu_seqlens_q, g.seq_lens, kind)
        x = x + self.self_attn(rms_norm(x, self.input_layernorm, self.eps), meta, kv_cache, cache_format)
        return x + self.mlp(rms_norm(x, self.post_attention_layernorm, self.eps))


class DeepseekModel:
    """Holds the weights in their stored form (WeightFormat: float, or int8 / int4 linears and experts), filled by
    models.loader, and runs one packed forward pass over T tokens. Embeddings, norms, the router and kv_b_proj
    (W_UK, W_UV) always stay in the model dtype."""

    def __init__(self, cfg: ModelConfig, fmt: WeightFormat, par: Parallel = Parallel()):
        self.cfg, self.fmt, self.par = cfg, fmt, par
        self.dtype, self.device = fmt.dtype, torch.device(fmt.device)
        self.rope = rope = RotaryEmbedding(cfg, fmt.device)
        self.v0, v1 = par.span(cfg.vocab_size, "vocab_size")  # this rank's rows of the embedding and the LM head
        self.embed_tokens = fmt.tensor(v1 - self.v0, cfg.hidden_size)
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

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, meta: AttnMetadata, cache) -> torch.Tensor:
        """input_ids [T] -> final hidden states [T, D] (after the last norm). cache: the LatentCache (its per-layer
        tensors and its format)."""
        if self.par.size == 1:
            x = F.embedding(input_ids, self.embed_tokens)
        else:  # each rank looks up the ids in its rows of the vocabulary, zeros elsewhere; the sum is the lookup
            local = input_ids - self.v0
            mine = (local >= 0) & (local < self.embed_tokens.shape[0])
            x = self.par.all_reduce(F.embedding(local.clamp(0, self.embed_tokens.shape[0] - 1), self.embed_tokens)
                                    * mine[:, None].to(self.dtype))
        for layer, kv_cache in zip(self.layers, cache.layers):
            x = layer(x, meta, kv_cache, cache.format)
        return rms_norm(x, self.norm, self.cfg.rms_norm_eps)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.par.all_gather(linear(hidden, self.lm_head)).float()
