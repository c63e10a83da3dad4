"""Weight-only quantized GEMM (int8 per channel, int4 per group of 128) with split-K for small M.

Grid: (M tiles x N tiles, split). A program owns a BLOCK_M x BLOCK_N tile of y and one range of K. It loads the
quantized weight tile as integers, converts it to x.dtype in registers (exact: |q| <= 127) and runs tl.dot with
fp32 accumulation; the scales are applied to the fp32 accumulator, not to the weights:
  int8  one scale per output channel: acc * scale[n] once, after the K loop.
  int4  one scale per group of 128: BLOCK_K divides 128, so a K tile sits in one group and adds
        dot(x, q) * scale[n, group]. The BLOCK_K / 2 bytes of a row hold the even k in the low nibbles and the odd
        k in the high ones, so x is read as its even and its odd columns and the tile costs two dots, no shuffles.
Split-K (decode): when the M x N tiles cannot fill the GPU, K is cut into `split` ranges of a whole number of
128-value units (kernels.weights.choose_split_k); each program writes its fp32 partial tile to a workspace
[split, M, N], summed over split in torch (deterministic, no atomics). With split 1 the same kernel, specialised
by the SPLIT constexpr, writes y in x.dtype directly.
"""
import torch
import triton
import triton.language as tl

from .weights import INT4_GROUP, QuantWeight, choose_split_k
from .triton_common import dot_precision, target

CPU_SMS = 132  # SM count used for the split rule where there is no CUDA device (the interpreter)


@triton.jit
def _quant_linear_kernel(x, qw, scales, out, ws, M, N, K, K_STORED, K_PER_SPLIT,
                         s_xm, s_qn, s_sn, s_om, s_ws, s_wm,
                         INT4: tl.constexpr, GROUP: tl.constexpr, SPLIT: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)
    sp = tl.program_id(1)
    n_tiles = tl.cdiv(N, BLOCK_N)
    pid_m = pid // n_tiles
    pid_n = pid % n_tiles
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    x_row = x + offs_m[:, None].to(tl.int64) * s_xm  # [M, 1]
    q_col = qw + offs_n[None, :].to(tl.int64) * s_qn  # [1, N]
    k_start = sp * K_PER_SPLIT
    k_end = tl.minimum(K_STORED, k_start + K_PER_SPLIT)  # K_STORED: K for int8, K padded to 128 for int4
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    if INT4:
        HALF: tl.constexpr = BLOCK_K // 2
        offs_h = tl.arange(0, HALF)
        for k0 in range(k_start, k_end, BLOCK_K):
            b = tl.load(q_col + (k0 // 2 + offs_h)[:, None], mask=n_ok[None, :], other=0x88)  # [K/2, N] uint8
            lo = ((b & 0xF).to(tl.int8) - 8).to(x.dtype.element_ty)  # k = k0 + 2i
            hi = ((b >> 4).to(tl.int8) - 8).to(x.dtype.element_ty)  # k = k0 + 2i + 1
            ke = k0 + 2 * offs_h
            xe = tl.load(x_row + ke[None, :], mask=m_ok[:, None] & (ke < K)[None, :], other=0.0)  # [M, K/2]
            xo = tl.load(x_row + ke[None, :] + 1, mask=m_ok[:, None] & (ke + 1 < K)[None, :], other=0.0)
            part = tl.dot(xe, lo, input_precision=PREC)
            part = tl.dot(xo, hi, part, input_precision=PREC)
            sc = tl.load(scales + offs_n * s_sn + k0 // GROUP, mask=n_ok, other=0.0)  # [N] scale of this group
            acc += part * sc[None, :]
    else:
        offs_k = tl.arange(0, BLOCK_K)
        for k0 in range(k_start, k_end, BLOCK_K):
            k = k0 + offs_k
            k_ok = k < K
            a = tl.load(x_row + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # [M, K]
            w = tl.load(q_col + k[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0)  # [K, N] int8
            acc = tl.dot(a, w.to(x.dtype.element_ty), acc, input_precision=PREC)
        sc = tl.load(scales + offs_n, mask=n_ok, other=0.0)  # per output channel
        acc = acc * sc[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    if SPLIT:
        tl.store(ws + sp.to(tl.int64) * s_ws + offs_m[:, None].to(tl.int64) * s_wm + offs_n[None, :], acc, mask=mask)
    else:
        tl.store(out + offs_m[:, None].to(tl.int64) * s_om + offs_n[None, :], acc.to(out.dtype.element_ty), mask=mask)


def tile_config(M: int, device: torch.device):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); BLOCK_K divides 128 (one int4 group per K tile)."""
    if M <= 16:  # decode: memory-bound, the smallest dot tile in M, long K tiles for wide coalesced weight loads
        return 16, 64, 128, 4, 4
    if M <= 64:
        return 32, 64, 128, 4, 4
    return 64, 128, 64, 8 if target(device).gpu else 4, 3


def split_sms(device: torch.device) -> int:
    """The SM count choose_split_k sizes the split for: the target GPU's, or CPU_SMS under the interpreter."""
    t = target(device)
    return t.num_sms if t.gpu else CPU_SMS


def quant_linear(x: torch.Tensor, qw: QuantWeight, split_k: int | None = None, out: torch.Tensor | None = None,
                 workspace: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W.T (arguments checked by kernels.matmul.quant_linear). split_k None picks by
    choose_split_k; tests force 1 or more. out [M, N] (x.dtype) and workspace [>= split, M, N] (fp32) may be given
    preallocated."""
    M, K = x.shape
    N = qw.shape[0]
    int4 = qw.mode == "int4"
    k_stored = qw.qweight.shape[1] * 2 if int4 else K
    bm, bn, bk, warps, stages = tile_config(M, x.device)
    split = split_k if split_k is not None else choose_split_k(M, N, K, bm, bn, split_sms(x.device))
    split = max(1, split)
    units = triton.cdiv(k_stored, INT4_GROUP)
    k_per_split = triton.cdiv(units, split) * INT4_GROUP  # a multiple of BLOCK_K and of the int4 group
    if out is None:
        out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    assert out.shape == (M, N) and out.dtype == x.dtype and out.stride(1) == 1
    if M == 0 or N == 0:
        return out
    if split > 1:
        if workspace is None:
            workspace = torch.empty(split, M, N, dtype=torch.float32, device=x.device)
        assert workspace.shape[0] >= split and workspace.shape[1:] == (M, N) and workspace.dtype == torch.float32
        assert workspace.stride(2) == 1
        ws = workspace
    else:
        ws = out  # unused: the SPLIT=False specialisation never touches it
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn), split)
    _quant_linear_kernel[grid](
        x, qw.qweight, qw.scales, out, ws, M, N, K, k_stored, k_per_split,
        x.stride(0), qw.qweight.stride(0), qw.scales.stride(0), out.stride(0),
        ws.stride(0) if split > 1 else 0, ws.stride(1) if split > 1 else 0,
        INT4=int4, GROUP=qw.group_size if int4 else INT4_GROUP, SPLIT=split > 1,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, PREC=dot_precision(x.dtype), num_warps=warps, num_stages=stages)
    if split > 1:
        out.copy_(workspace[:split].sum(0))  # [M, N]
    return out
