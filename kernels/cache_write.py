"""Triton scatter of the new tokens' [c_kv | k_pe] rows into the paged latent cache.

Grid: one program per new token. The 576-wide row is written as two loads/stores (kv_lora_rank values, then the
rope values), each padded to a power of two with a mask, so widths like 512 + 64 need no 1024-wide tile."""
import torch
import triton
import triton.language as tl

from .triton_common import pow2


@triton.jit
def _write_latent_kernel(cache, slot_mapping, c_kv, k_pe,
                         s_cb, s_cs, s_ct, s_pt, block_size, R, DR,
                         BLOCK_R: tl.constexpr, BLOCK_DR: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slot_mapping + t).to(tl.int64)
    if slot >= 0:  # a negative slot marks a padding token: nothing to store
        dst = cache + (slot // block_size) * s_cb + (slot % block_size) * s_cs
        offs_r = tl.arange(0, BLOCK_R)
        offs_d = tl.arange(0, BLOCK_DR)
        c = tl.load(c_kv + t.to(tl.int64) * s_ct + offs_r, mask=offs_r < R)
        p = tl.load(k_pe + t.to(tl.int64) * s_pt + offs_d, mask=offs_d < DR)
        tl.store(dst + offs_r, c.to(cache.dtype.element_ty), mask=offs_r < R)
        tl.store(dst + R + offs_d, p.to(cache.dtype.element_ty), mask=offs_d < DR)


def write_latent(kv_cache, slot_mapping, c_kv, k_pe):
    T, R = c_kv.shape
    DR = k_pe.shape[1]
    if T == 0:
        return
    _write_latent_kernel[(T,)](kv_cache, slot_mapping, c_kv, k_pe,
                               kv_cache.stride(0), kv_cache.stride(1), c_kv.stride(0), k_pe.stride(0),
                               kv_cache.shape[1], R, DR,
                               BLOCK_R=pow2(R, 1), BLOCK_DR=pow2(DR, 1), num_warps=4)
