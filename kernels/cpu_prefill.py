"""Expanded MLA prefill on the CPU through torch's fused flash-attention kernel (the CPU counterpart of
kernels/triton_prefill.py; kernels/reference.py defines the function). Per sequence the cached context is cut at
the first new token and every KV_CHUNK tokens; each piece is expanded through kv_b_proj and attended with the fused
kernel, which returns the log-sum-exp, and the pieces are merged by it. A piece before the new tokens is seen by
every query (no mask); a piece inside them is causal with its first query aligned to its first key, which is the
fused kernel's own is_causal alignment, so no mask is ever built. Workspace: one piece's K and V, bounded."""
import torch
import torch.nn.functional as F

from .reference import expand, sequences

KV_CHUNK = 4096  # cached tokens expanded at a time: K and V of [H, 4096, nope + rope] each


def _flash(q, k, v, causal, scale):
    """q [H, t, d], k/v [H, n, d] -> out [H, t, d], lse [H, t] (float32)."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q[None], k[None], v[None], 0.0, causal, scale=scale)
    return out[0], lse[0].float()


def mla_prefill(q_nope, q_pe, kv_cache, block_tables, cu_seqlens_q, seq_lens, w_kv_b, softmax_scale):
    w_kv_b = w_kv_b.to(q_nope.dtype)  # stored bf16 under a float32 model: widened once per call
    T, H, dn = q_nope.shape
    R, dr = w_kv_b.shape[1], q_pe.shape[2]
    dv = w_kv_b.shape[0] // H - dn
    d = dn + dr  # the fused kernel wants one head size: V is zero-padded from dv to d
    out = q_nope.new_empty(T, H, dv)
    for q0, q1, lat in sequences(kv_cache, block_tables, cu_seqlens_q, seq_lens, q_nope.dtype):
        L = lat.shape[0]
        start = L - (q1 - q0)
        q = torch.cat((q_nope[q0:q1], q_pe[q0:q1]), dim=-1).transpose(0, 1)  # [H, t, d]
        acc = lse = None
        cuts = sorted({0, start, L} | set(range(0, L, KV_CHUNK)))
        for k0, k1 in zip(cuts, cuts[1:]):
            k_nope, v = (t.transpose(0, 1) for t in expand(lat[k0:k1, :R], w_kv_b, H, dn))  # [H, c, nope | v]
            k = torch.cat((k_nope, lat[k0:k1, R:].expand(H, -1, -1)), dim=-1)  # k_pe shared by the heads
            v = F.pad(v, (0, d - dv))
            i0 = max(0, k0 - start)  # queries before k0 see none of this piece
            o, s = _flash(q[:, i0:], k, v, k0 >= start, softmax_scale)
            o = o[..., :dv].float()
            if acc is None:  # the first piece (k0 = 0) is seen by every query
                acc, lse = o, s
            else:
                m = torch.maximum(lse[:, i0:], s)
                wa, wb = torch.exp(lse[:, i0:] - m), torch.exp(s - m)
                acc[:, i0:] = (acc[:, i0:] * wa[..., None] + o * wb[..., None]) / (wa + wb)[..., None]
                lse[:, i0:] = m + torch.log(wa + wb)
        out[q0:q1] = acc.transpose(0, 1).to(out.dtype)
    return out
