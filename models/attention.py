"""Multi-head latent attention over the paged latent cache, absorbed (decode) or expanded (prefill)."""
from dataclasses import dataclass

import torch

from kernels import WeightFormat

from .config import ModelConfig
from .parallel import Parallel
from .rope import RotaryEmbedding


@dataclass
class SeqGroup:
    """The sequences of one forward pass that take one attention path."""
    token_index: torch.Tensor | None  # [t] rows of the packed queries; None: all rows, in order
    block_tables: torch.Tensor  # [b, max_blocks] int32
    cu_seqlens_q: torch.Tensor  # [b + 1] int32
    seq_lens: torch.Tensor  # [b] int32, cached + new tokens
    max_q_len: int | None = None  # the most query rows of one sequence, known without reading cu_seqlens_q


@dataclass
class AttnMetadata:
    """Everything attention needs about one forward pass, built once by the model runner."""
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64, flat cache slot of each new token
    absorbed: SeqGroup | None
    expanded: SeqGroup | None


class KvbSplit:
    """Where the checkpoint's kv_b_proj ([H * (nope + v), R], each head's W_UK rows then its W_UV rows) is stored:
    into the split layout, W_UK of all heads, then W_UV of all heads."""

    def __init__(self, attn: "MLAttention"):
        self.attn, self.shape = attn, tuple(attn.kv_b_proj.shape)

    @property
    def tensors(self) -> tuple:
        return (self.attn.kv_b_proj,)

    def copy_(self, w: torch.Tensor):
        H, dn = self.attn.w_uk.shape[:2]
        w = w.view(H, -1, self.shape[1])
        self.attn.w_uk.copy_(w[:, :dn])
        self.attn.w_uv.copy_(w[:, dn:])


class MLAttention:
    def __init__(self, cfg: ModelConfig, rope: RotaryEmbedding, fmt: WeightFormat, par: Parallel = Parallel()):
        self.h0, h1 = par.span(cfg.num_attention_heads, "num_attention_heads")  # this rank's heads
        H, R = self.H, _ = h1 - self.h0, cfg.kv_lora_rank
        self.cfg, self.rope, self.par = cfg, rope, par
        self.softmax_scale = cfg.softmax_scale
        if cfg.q_lora_rank:
            self.q_a_proj = fmt.linear(cfg.q_lora_rank, cfg.hidden_size)
            self.q_a_layernorm = fmt.tensor(cfg.q_lora_rank)
            self.q_b_proj = fmt.linear(H * cfg.qk_head_dim, cfg.q_lora_rank)
        else:
            self.q_proj = fmt.linear(H * cfg.qk_head_dim, cfg.hidden_size)
        self.kv_a_proj_with_mqa = fmt.linear(R + cfg.qk_rope_head_dim, cfg.hidden_size)
        self.kv_a_layernorm = fmt.tensor(R)
        # kv_b_proj is never quantized, stored split (kernels/reference.py): every head's W_UK rows, then every
        # head's W_UV rows. The expanded path multiplies the cache by all of it at once; the absorbed path reads W_UK
        # and W_UV as contiguous views (a per-head bmm over them copies nothing).
        self.kv_b_proj = fmt.unquantized(H * (cfg.qk_nope_head_dim + cfg.v_head_dim), R)
        self.w_uk = self.kv_b_proj[:H * cfg.qk_nope_head_dim].view(H, cfg.qk_nope_head_dim, R)
        self.w_uv = self.kv_b_proj[H * cfg.qk_nope_head_dim:].view(H, cfg.v_head_dim, R)
        self.o_proj = fmt.linear(cfg.hidden_size, H * cfg.v_head_dim)

    def weights(self) -> dict:
        cfg, par, h0, H = self.cfg, self.par, self.h0, self.H
        HF = cfg.num_attention_heads
        names = ["kv_a_proj_with_mqa", "kv_a_layernorm"] + (["q_a_proj", "q_a_layernorm"] if cfg.q_lora_rank else [])
        w = {f"{n}.weight": getattr(self, n) for n in names}  # per token, not per head: every rank holds them
        q, qk, kv = ("q_b_proj", cfg.q_lora_rank) if cfg.q_lora_rank else ("q_proj", cfg.hidden_size), cfg.qk_head_dim, \
            cfg.qk_nope_head_dim + cfg.v_head_dim
        w[f"{q[0]}.weight"] = par.part(getattr(self, q[0]), 0, h0 * qk, (h0 + H) * qk, (HF * qk, q[1]))
        w["kv_b_proj.weight"] = par.part(KvbSplit(self), 0, h0 * kv, (h0 + H) * kv, (HF * kv, cfg.kv_lora_rank))
        w["o_proj.weight"] = par.part(self.o_proj, 1, h0 * cfg.v_head_dim, (h0 + H) * cfg.v_head_dim,
                                      (cfg.hidden_size, HF * cfg.v_head_dim))
        return w

    def absorbed(self, q_nope, q_pe, kv_cache, group: SeqGroup, ops) -> torch.Tensor:
        """q_nope through W_UK, attention over the latent rows (all heads share them), back through W_UV:
        q_nope [t, H, nope], q_pe [t, H, rope] -> o [t, H, v]."""
        return ops.absorbed(q_nope, q_pe, self.w_uk, self.w_uv, kv_cache, group.block_tables, group.cu_seqlens_q,
                            group.seq_lens, self.softmax_scale, group.max_q_len)

    def expanded(self, q_nope, q_pe, kv_cache, group: SeqGroup, ops) -> torch.Tensor:
        """The cached latent decompressed through kv_b_proj into per-head K_nope and V, then flash attention."""
        return ops.expanded(q_nope, q_pe, kv_cache, group.block_tables, group.cu_seqlens_q, group.seq_lens,
                            self.kv_b_proj, self.softmax_scale)

    def __call__(self, x: torch.Tensor, meta: AttnMetadata, kv_cache: torch.Tensor, ops) -> torch.Tensor:
        cfg = self.cfg
        T, H = x.shape[0], self.H
        if cfg.q_lora_rank:
            q = ops.linear(ops.rms_norm(ops.linear(x, self.q_a_proj), self.q_a_layernorm, cfg.rms_norm_eps),
                           self.q_b_proj)
        else:
            q = ops.linear(x, self.q_proj)
        q = q.view(T, H, cfg.qk_head_dim)
        q_nope, q_pe = q.split([cfg.qk_nope_head_dim, cfg.qk_rope_head_dim], dim=-1)  # [T, H, 128], [T, H, 64]
        c_kv, k_pe = ops.linear(x, self.kv_a_proj_with_mqa).split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], dim=-1)
        c_kv = ops.rms_norm(c_kv, self.kv_a_layernorm, cfg.rms_norm_eps)  # [T, 512]
        self.rope(q_pe, meta.positions, ops)  # in place: q_pe and k_pe are views of q and of kv_a's output
        self.rope(k_pe.unsqueeze(1), meta.positions, ops)  # [T, 64]: one RoPE key shared by all heads
        ops.write_latent(kv_cache, meta.slot_mapping, c_kv, k_pe)

        out = x.new_empty(T, H, cfg.v_head_dim)
        for group, attend in ((meta.absorbed, self.absorbed), (meta.expanded, self.expanded)):
            if group is None:
                continue
            idx = group.token_index
            qn, qp = (q_nope, q_pe) if idx is None else (q_nope[idx], q_pe[idx])
            o = attend(qn, qp, kv_cache, group, ops)
            if idx is None:
                out = o
            else:
                out[idx] = o
        return self.par.all_reduce(ops.linear(out.reshape(T, -1), self.o_proj))  # each rank: its heads' share
