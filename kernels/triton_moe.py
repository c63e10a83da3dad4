"""Grouped-GEMM MoE: all routed experts of a layer in one launch per projection.

Pre-pass (torch, on the device, no host sync): the T * k (token, expert) pairs, pair p = t * k + j, are sorted by
expert and each expert's run is padded to a multiple of BLOCK_M, so that every M block of the sorted list belongs
to one expert:
    sorted_ids   [max_padded] int32   pair index at each sorted position; P = T * k marks padding
    block_expert [max_blocks] int32   expert of each M block; E for blocks past the padded total (they exit)
The grid is sized by the bound max_padded = P + min(E, P) * (BLOCK_M - 1), so it never needs the real count.

Kernel 1 (gate/up + SwiGLU): grid (M blocks, cdiv(I, BLOCK_N)). A program gathers BLOCK_M rows of x (by token =
pair // k), loads the matching w13 tiles of its expert for the gate rows n and the up rows I + n, keeps two fp32
accumulators and writes h = silu(g) * u in x.dtype to h[pair, n] ([P, I]).
Kernel 2 (down): grid (M blocks, cdiv(D, BLOCK_N)). A program reads its rows of h, multiplies by w2 of its expert,
scales each row by its router weight in fp32 and writes part[pair, :] ([P, D] fp32). The k rows of each token are
then summed in torch (part.view(T, k, D).sum(1)): deterministic, no atomics, and no bf16 atomics needed. The
workspaces cost k * (4 D + 2 I) bytes per token in bf16, so long prompts run in chunks of tokens that keep them
under WORKSPACE_BYTES.
Weight-only quantized experts (stacked kernels.QuantWeight, int8 per row or int4 per group of 128) run through the same
kernels: each weight tile is loaded as integers and dequantized in registers (_weight_tile).
"""
import torch
import triton
import triton.language as tl

from .triton_common import dot_precision, pow2, target
from .weights import INT4_GROUP


@triton.jit
def _weight_tile(w_rows, s_rows, k0, k, k_ok, n_ok, GROUP, QUANT: tl.constexpr, dtype: tl.constexpr):
    """The [K, N] tile of the weight rows w_rows ([1, N] pointers) at columns k, in dtype: a float weight as stored;
    int8 / int4 dequantized in registers, integer times its fp32 scale (s_rows: the rows' scales) rounded once to
    dtype, as QuantWeight.dequantize does it. A K tile never straddles two scale groups (BLOCK_K divides 128)."""
    mask = k_ok[:, None] & n_ok
    # one return at the end: with an early return the compiler (not the interpreter) still builds the integer
    # branches for a float weight, and fails on them (found by tools/gpu_check.py)
    if QUANT == 0:
        w = tl.load(w_rows + k[:, None], mask=mask, other=0.0)
    else:
        if QUANT == 1:
            q = tl.load(w_rows + k[:, None], mask=mask, other=0).to(tl.float32)
        else:  # two values per byte: even k in the low nibble, odd k in the high one
            b = tl.load(w_rows + (k // 2)[:, None], mask=mask, other=0x88)
            q = (tl.where((k % 2 == 0)[:, None], b & 0xF, b >> 4).to(tl.int32) - 8).to(tl.float32)
        sc = tl.load(s_rows + k0 // GROUP, mask=n_ok, other=0.0)  # [1, N]
        w = (q * sc).to(dtype)
    return w


@triton.jit
def _moe_gate_up_kernel(x, w13, s13, h, sorted_ids, block_expert, num_pairs, k, D, I, E, GROUP,
                        s_xt, s_we, s_wn, s_se, s_sn, s_ht, QUANT: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(block_expert + pid_m)
    if e < E:  # blocks past the padded total hold no pairs
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(sorted_ids + rows)
        row_ok = pair < num_pairs
        token = (pair // k).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = (offs_n < I)[None, :]
        offs_k = tl.arange(0, BLOCK_K)
        n64 = offs_n[None, :].to(tl.int64)
        e64 = e.to(tl.int64)
        g_rows = w13 + e64 * s_we + n64 * s_wn  # gate rows n
        u_rows = g_rows + I * s_wn  # up rows I + n
        gs_rows = s13 + e64 * s_se + n64 * s_sn
        us_rows = gs_rows + I * s_sn
        x_ptr = x + token[:, None] * s_xt  # [M, 1]
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, D, BLOCK_K):
            kk = k0 + offs_k
            k_ok = kk < D
            a = tl.load(x_ptr + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            wg = _weight_tile(g_rows, gs_rows, k0, kk, k_ok, n_ok, GROUP, QUANT, x.dtype.element_ty)
            wu = _weight_tile(u_rows, us_rows, k0, kk, k_ok, n_ok, GROUP, QUANT, x.dtype.element_ty)
            acc_g = tl.dot(a, wg, acc_g, input_precision=PREC)
            acc_u = tl.dot(a, wu, acc_u, input_precision=PREC)
        out = acc_g * tl.sigmoid(acc_g) * acc_u  # silu(g) * u in fp32, rounded once
        tl.store(h + pair[:, None].to(tl.int64) * s_ht + offs_n[None, :], out.to(h.dtype.element_ty),
                 mask=row_ok[:, None] & n_ok)


@triton.jit
def _moe_down_kernel(h, w2, s2, part, weights, sorted_ids, block_expert, num_pairs, D, I, E, GROUP,
                     s_ht, s_we, s_wn, s_se, s_sn, s_pt, QUANT: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(block_expert + pid_m)
    if e < E:
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(sorted_ids + rows)
        row_ok = pair < num_pairs
        pair64 = pair.to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = (offs_n < D)[None, :]
        offs_k = tl.arange(0, BLOCK_K)
        n64 = offs_n[None, :].to(tl.int64)
        w_rows = w2 + e.to(tl.int64) * s_we + n64 * s_wn
        s_rows = s2 + e.to(tl.int64) * s_se + n64 * s_sn
        a_ptr = h + pair64[:, None] * s_ht  # [M, 1]
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, I, BLOCK_K):
            kk = k0 + offs_k
            k_ok = kk < I
            a = tl.load(a_ptr + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = _weight_tile(w_rows, s_rows, k0, kk, k_ok, n_ok, GROUP, QUANT, h.dtype.element_ty)
            acc = tl.dot(a, w, acc, input_precision=PREC)
        rw = tl.load(weights + pair64, mask=row_ok, other=0.0)  # router weight of each row, fp32
        tl.store(part + pair64[:, None] * s_pt + offs_n[None, :], acc * rw[:, None], mask=row_ok[:, None] & n_ok)



def tile_config(num_pairs: int, E: int, D: int, I: int, device: torch.device):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). Decode (few pairs per expert): BLOCK_M 16, the smallest
    tl.dot tile, since the rows are padded per expert; prefill: 64-row tiles to reuse each weight tile."""
    per_expert = num_pairs / max(1, min(E, num_pairs))
    bm = 16 if per_expert <= 16 else (32 if per_expert <= 48 else 64)
    if not target(device).gpu:  # interpreter: few, small programs
        return bm, min(64, pow2(max(D, I))), 32, 4, 1
    bn = 64 if bm <= 32 else 128
    return bm, bn, 64, 4, 3 if bm <= 32 else 4


def align_by_expert(topk_ids: torch.Tensor, E: int, block_m: int):
    """Sort the pairs by expert and pad each expert's run to a multiple of block_m (see the module docstring).
    Returns sorted_ids [max_padded] int32 and block_expert [max_padded // block_m] int32."""
    flat = topk_ids.flatten()
    P = flat.numel()
    dev = flat.device
    max_padded = P + min(E, P) * (block_m - 1)
    max_padded = triton.cdiv(max_padded, block_m) * block_m
    order = flat.argsort(stable=True)  # [P] pair indices grouped by expert
    # [E]; not torch.bincount, whose CUDA version reads the largest id back to size its output (a host sync per
    # layer, and no CUDA graph could capture it)
    counts = torch.zeros(E, dtype=torch.int64, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    pad_end = padded.cumsum(0)  # [E] end of each expert's padded run
    pad_start = pad_end - padded
    start = counts.cumsum(0) - counts
    e_sorted = flat[order]
    dest = pad_start[e_sorted] + torch.arange(P, device=dev) - start[e_sorted]  # sorted position with padding
    sorted_ids = torch.full((max_padded,), P, dtype=torch.int32, device=dev)
    sorted_ids[dest] = order.to(torch.int32)
    block_start = torch.arange(0, max_padded, block_m, device=dev)
    # the expert whose padded run holds the block's first row (empty experts have start == end and are skipped)
    block_expert = torch.searchsorted(pad_end, block_start, right=True).to(torch.int32)  # E past the total
    return sorted_ids, block_expert


WORKSPACE_BYTES = 256 << 20  # bound on h + part of one launch; longer prompts run in chunks of tokens


def _operand(w):
    """(stored weights, scales, expert stride, row stride, scales' expert and row strides, GROUP, QUANT) of a float
    [E, N, K] tensor (scales: unused) or a stacked QuantWeight (int8: one scale per row, GROUP past any k; int4: groups)."""
    if isinstance(w, torch.Tensor):
        return w, w, w.stride(0), w.stride(1), 0, 0, 1, 0
    q, sc = w.qweight, w.scales
    group = INT4_GROUP if w.mode == "int4" else 1 << 30
    return q, sc, q.stride(0), q.stride(1), sc.stride(0), sc.stride(1), group, 2 if w.mode == "int4" else 1


def moe_experts(x, topk_ids, topk_weights, w13, w2, h=None, part=None):
    """The grouped-GEMM MoE (arguments checked by kernels.moe.moe_experts); w13 / w2 float [E, N, K] or
    stacked QuantWeight. h [T * k, I] (x.dtype) and part [T * k, D] (fp32) are the workspaces; pass preallocated ones to
    reuse them (tests poison them). Without them, a long prompt is cut into chunks of tokens so that the workspaces
    stay under WORKSPACE_BYTES."""
    T, D = x.shape
    k = topk_ids.shape[1]
    I = w2.shape[-1]
    P = T * k
    if P == 0:
        return x.new_zeros(T, D)
    chunk = max(1, WORKSPACE_BYTES // (k * (4 * D + x.element_size() * I)))
    if h is None and part is None and T > chunk:
        return torch.cat([_moe_experts(x[i:i + chunk], topk_ids[i:i + chunk], topk_weights[i:i + chunk], w13, w2)
                          for i in range(0, T, chunk)])
    return _moe_experts(x, topk_ids, topk_weights, w13, w2, h, part)


def _moe_experts(x, topk_ids, topk_weights, w13, w2, h=None, part=None):
    T, D = x.shape
    k = topk_ids.shape[1]
    E, I = len(w13), w2.shape[-1]
    P = T * k
    bm, bn, bk, warps, stages = tile_config(P, E, D, I, x.device)
    assert INT4_GROUP % bk == 0  # a K tile inside one int4 scale group
    sorted_ids, block_expert = align_by_expert(topk_ids, E, bm)
    if h is None:
        h = torch.empty(P, I, dtype=x.dtype, device=x.device)
    if part is None:
        part = torch.empty(P, D, dtype=torch.float32, device=x.device)
    assert h.shape == (P, I) and h.dtype == x.dtype and h.stride(1) == 1
    assert part.shape == (P, D) and part.dtype == torch.float32 and part.stride(1) == 1
    weights = topk_weights.contiguous().view(-1)  # [P] fp32, pair order
    prec = dot_precision(x.dtype)
    n_blocks = block_expert.numel()
    q13, s13, s13_e, s13_n, s13_se, s13_sn, group, quant = _operand(w13)
    q2, s2, s2_e, s2_n, s2_se, s2_sn, _, _ = _operand(w2)
    _moe_gate_up_kernel[(n_blocks, triton.cdiv(I, bn))](
        x, q13, s13, h, sorted_ids, block_expert, P, k, D, I, E, group,
        x.stride(0), s13_e, s13_n, s13_se, s13_sn, h.stride(0), QUANT=quant,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, PREC=prec, num_warps=warps, num_stages=stages)
    _moe_down_kernel[(n_blocks, triton.cdiv(D, bn))](
        h, q2, s2, part, weights, sorted_ids, block_expert, P, D, I, E, group,
        h.stride(0), s2_e, s2_n, s2_se, s2_sn, part.stride(0), QUANT=quant,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, PREC=prec, num_warps=warps, num_stages=stages)
    return part.view(T, k, D).sum(1).to(x.dtype)  # [T, D]
