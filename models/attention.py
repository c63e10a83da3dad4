"""Multi-head latent attention over the paged latent cache, absorbed (decode) or expanded (prefill)."""
from dataclasses import dataclass

import torch

import kernels

from .config import ModelConfig
from .layers import linear, rms_norm
from .rope import RotaryEmbedding


@dataclass
class SeqGroup:
    """The sequences of one forward pass that take one attention path."""
    token_index: torch.Tensor | None  # [t] rows of the packed queries; None: all rows, in order
    block_tables: torch.Tensor  # [b, max_blocks] int32
    cu_seqlens_q: torch.Tensor  # [b + 1] int32
    seq_lens: torch.Tensor  # [b] int32, cached + new tokens


@dataclass
class AttnMetadata:
    """Everything attention needs about one forward pass, built once by the model runner."""
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64, flat cache slot of each new token
    absorbed: SeqGroup | None
    expanded: SeqGroup | None


class MLAttention:
    def __init__(self, cfg: ModelConfig, rope: RotaryEmbedding, dtype, device, backend: str):
        H, R = cfg.num_attention_heads, cfg.kv_lora_rank
        e = dict(dtype=dtype, device=device)
        self.cfg, self.rope, self.backend = cfg, rope, backend
        self.softmax_scale = cfg.softmax_scale
        if cfg.q_lora_rank:
            self.q_a_proj = torch.empty(cfg.q_lora_rank, cfg.hidden_size, **e)
            self.q_a_layernorm = torch.empty(cfg.q_lora_rank, **e)
            self.q_b_proj = torch.empty(H * cfg.qk_head_dim, cfg.q_lora_rank, **e)
        else:
            self.q_proj = torch.empty(H * cfg.qk_head_dim, cfg.hidden_size, **e)
        self.kv_a_proj_with_mqa = torch.empty(R + cfg.qk_rope_head_dim, cfg.hidden_size, **e)
        self.kv_a_layernorm = torch.empty(R, **e)
        self.kv_b_proj = torch.empty(H * (cfg.qk_nope_head_dim + cfg.v_head_dim), R, **e)
        self.o_proj = torch.empty(cfg.hidden_size, H * cfg.v_head_dim, **e)

    def weights(self) -> dict[str, torch.Tensor]:
        names = ["kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj", "o_proj"]
        names += ["q_a_proj", "q_a_layernorm", "q_b_proj"] if self.cfg.q_lora_rank else ["q_proj"]
        return {f"{n}.weight": getattr(self, n) for n in names}

    def split_kv_b(self):
        """After loading: kv_b_proj viewed as [H, nope + v, R] gives W_UK and W_UV for the absorbed path."""
        cfg = self.cfg
        w = self.kv_b_proj.view(cfg.num_attention_heads, cfg.qk_nope_head_dim + cfg.v_head_dim, cfg.kv_lora_rank)
        self.w_uk = w[:, :cfg.qk_nope_head_dim].contiguous()  # [H, nope, R]
        self.w_uv = w[:, cfg.qk_nope_head_dim:].contiguous()  # [H, v, R]

    def __call__(self, x: torch.Tensor, meta: AttnMetadata, kv_cache: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        T, H = x.shape[0], cfg.num_attention_heads
        if cfg.q_lora_rank:
            q_a = rms_norm(linear(x, self.q_a_proj, self.backend), self.q_a_layernorm, cfg.rms_norm_eps)
            q = linear(q_a, self.q_b_proj, self.backend)
        else:
            q = linear(x, self.q_proj, self.backend)
        q = q.view(T, H, cfg.qk_head_dim)
        q_nope, q_pe = q.split([cfg.qk_nope_head_dim, cfg.qk_rope_head_dim], dim=-1)  # [T, H, 128], [T, H, 64]
        c_kv, k_pe = linear(x, self.kv_a_proj_with_mqa, self.backend).split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], dim=-1)
        c_kv = rms_norm(c_kv, self.kv_a_layernorm, cfg.rms_norm_eps)  # [T, 512]
        q_pe = self.rope(q_pe, meta.positions)
        k_pe = self.rope(k_pe, meta.positions)  # [T, 64]: one RoPE key shared by all heads
        kernels.write_latent(kv_cache, meta.slot_mapping, c_kv, k_pe, backend=self.backend)

        out = x.new_empty(T, H, cfg.v_head_dim)
        for group, absorbed in ((meta.absorbed, True), (meta.expanded, False)):
            if group is None:
                continue
            idx = group.token_index
            qn, qp = (q_nope, q_pe) if idx is None else (q_nope[idx], q_pe[idx])
            args = (kv_cache, group.block_tables, group.cu_seqlens_q, group.seq_lens)
            if absorbed:
                q_lat = torch.einsum("thd,hdr->thr", qn, self.w_uk)  # [t, H, 512]
                o_lat = kernels.mla_decode(q_lat, qp, *args, self.softmax_scale, backend=self.backend)
                o = torch.einsum("thr,hvr->thv", o_lat, self.w_uv)  # [t, H, 128]
            else:
                o = kernels.mla_prefill(qn, qp, *args, self.kv_b_proj, self.softmax_scale, backend=self.backend)
            if idx is None:
                out = o
            else:
                out[idx] = o
        return linear(out.reshape(T, -1), self.o_proj, self.backend)

    def quantize_weights(self, mode: str):
        """Weight-only quantization of the projections; kv_b_proj stays in the model dtype (both paths read it)."""
        names = ["q_a_proj", "q_b_proj"] if self.cfg.q_lora_rank else ["q_proj"]
        for name in names + ["kv_a_proj_with_mqa", "o_proj"]:
            setattr(self, name, kernels.quantize_weight(getattr(self, name), mode))
