"""One dispatch function per kernel: check the arguments, then run the Triton kernel or the torch reference.

Triton kernels are added behind these functions; until a kernel exists for an operation, every backend runs
the reference. `backend` is "torch" or "triton" (the engine resolves "auto")."""
import torch

from . import reference

BACKENDS = ("torch", "triton")


def _check(cond, msg):
    if not cond:
        raise ValueError(f"kernel argument: {msg}")


def _check_batch(kv_cache, block_tables, cu_seqlens_q, seq_lens, T):
    _check(kv_cache.dim() == 3, f"kv_cache must be [blocks, block_size, width], got {tuple(kv_cache.shape)}")
    _check(block_tables.dim() == 2 and block_tables.dtype == torch.int32, "block_tables must be int32 [B, max_blocks]")
    B = block_tables.shape[0]
    _check(tuple(cu_seqlens_q.shape) == (B + 1,) and cu_seqlens_q.dtype == torch.int32, "cu_seqlens_q must be int32 [B+1]")
    _check(tuple(seq_lens.shape) == (B,) and seq_lens.dtype == torch.int32, "seq_lens must be int32 [B]")


def write_latent(kv_cache, slot_mapping, c_kv, k_pe, backend="torch"):
    _check(c_kv.shape[0] == k_pe.shape[0] == slot_mapping.shape[0], "c_kv, k_pe and slot_mapping disagree on tokens")
    _check(c_kv.shape[1] + k_pe.shape[1] == kv_cache.shape[-1], "c_kv + k_pe width must equal the cache width")
    reference.write_latent(kv_cache, slot_mapping, c_kv, k_pe)


def mla_decode(q_lat, q_pe, kv_cache, block_tables, cu_seqlens_q, seq_lens, softmax_scale, backend="torch"):
    T, H, R = q_lat.shape
    _check(q_pe.shape[:2] == (T, H) and R + q_pe.shape[2] == kv_cache.shape[-1], "q_lat/q_pe shapes do not match the cache")
    _check_batch(kv_cache, block_tables, cu_seqlens_q, seq_lens, T)
    return reference.mla_decode(q_lat, q_pe, kv_cache, block_tables, cu_seqlens_q, seq_lens, softmax_scale)


def mla_prefill(q_nope, q_pe, kv_cache, block_tables, cu_seqlens_q, seq_lens, w_kv_b, softmax_scale, backend="torch"):
    T, H, dn = q_nope.shape
    _check(q_pe.shape[:2] == (T, H), "q_pe must be [T, H, rope_dim]")
    _check(w_kv_b.shape[1] + q_pe.shape[2] == kv_cache.shape[-1], "w_kv_b input width must be kv_lora_rank")
    _check(w_kv_b.shape[0] % H == 0 and w_kv_b.shape[0] // H > dn, "w_kv_b must be [H * (nope + v), kv_lora_rank]")
    _check_batch(kv_cache, block_tables, cu_seqlens_q, seq_lens, T)
    return reference.mla_prefill(q_nope, q_pe, kv_cache, block_tables, cu_seqlens_q, seq_lens, w_kv_b, softmax_scale)
