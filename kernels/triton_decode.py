"""Absorbed MLA attention (flash-decoding) over the paged latent cache.

Every head attends to the same 576-wide latent row [c_kv | k_pe] of each cached token, so a program loads a KV tile
of BLOCK_N tokens once (through the block table) and scores it against a whole group of rows at once:
rows = BLOCK_Q query tokens of one sequence x BLOCK_H heads form the M dimension of the two tl.dot
(q_lat . c_kv over the 512 latent values, q_pe . k_pe over the 64 rope values: 576 is no power of two, so it is
loaded as 512 + 64). A packed (int8/fp8) tile is dequantized in registers right after its load. The same c_kv
tile is the V of o_lat = softmax . c_kv.

Grid: (sequence x query tile, head group, KV split). With a small batch the programs would not fill the GPU, so
the KV axis of each sequence is cut into num_splits contiguous ranges; each writes its normalised partial output
and log-sum-exp (log2 domain), and a second pass merges the splits. With one split the first pass writes the
output directly. Softmax in float32 with exp2, the scale folded with log2(e)."""
import torch
import triton
import triton.language as tl

from .triton_common import dot_precision, pow2, target

LOG2E = 1.4426950408889634
MIN_TOKENS_PER_SPLIT = 256  # below this a split costs more in merging than it gains in parallelism
MAX_SPLITS = 64


@triton.jit
def _mla_decode_kernel(q_lat, q_pe, lat, rope, scl, block_tables, cu_q, seq_lens, out, o_part, lse_part,
                       s_qt, s_qh, s_pt, s_ph, s_lb, s_ls, s_rb, s_rs, s_sb, s_ss, s_bt, s_ot, s_oh, s_xt, s_xh, s_xs, s_lt, s_lh,
                       H, R, DR, block_size, q_tiles, num_splits, qk_scale,
                       BLOCK_Q: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_DR: tl.constexpr, NUM_SCALES: tl.constexpr, SPLIT: tl.constexpr,
                       PREC: tl.constexpr):
    BLOCK_M: tl.constexpr = BLOCK_Q * BLOCK_H
    pid = tl.program_id(0)
    hg = tl.program_id(1)
    sp = tl.program_id(2)
    b = pid // q_tiles
    qt = pid % q_tiles
    q0 = tl.load(cu_q + b)
    q_len = tl.load(cu_q + b + 1) - q0
    if qt * BLOCK_Q < q_len:
        L = tl.load(seq_lens + b)
        r = tl.arange(0, BLOCK_M)
        qi = qt * BLOCK_Q + r // BLOCK_H  # query index within the sequence
        h = hg * BLOCK_H + r % BLOCK_H
        row_ok = (qi < q_len) & (h < H)
        t = (q0 + qi).to(tl.int64)
        pos = L - q_len + qi  # position of each row's query: it sees keys 0..pos
        min_pos = L - q_len + qt * BLOCK_Q
        kv_len = L - q_len + tl.minimum(q_len, (qt + 1) * BLOCK_Q)  # keys any row of this tile can see
        tiles_per_split = tl.cdiv(tl.cdiv(kv_len, BLOCK_N), num_splits)
        start = sp * tiles_per_split * BLOCK_N
        end = tl.minimum(kv_len, start + tiles_per_split * BLOCK_N)

        offs_r = tl.arange(0, BLOCK_R)
        offs_d = tl.arange(0, BLOCK_DR)
        r_ok = offs_r < R
        d_ok = offs_d < DR
        q = tl.load(q_lat + t[:, None] * s_qt + h[:, None] * s_qh + offs_r[None, :],
                    mask=row_ok[:, None] & r_ok[None, :], other=0.0)  # [M, 512]
        qp = tl.load(q_pe + t[:, None] * s_pt + h[:, None] * s_ph + offs_d[None, :],
                     mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [M, 64]
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_R], tl.float32)
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < end
            blk = tl.load(block_tables + b.to(tl.int64) * s_bt + offs_n // block_size, mask=n_ok, other=0)
            blk = blk.to(tl.int64)
            off = (offs_n % block_size).to(tl.int64)
            ckv = tl.load(lat + (blk * s_lb + off * s_ls)[:, None] + offs_r[None, :],
                          mask=n_ok[:, None] & r_ok[None, :], other=0.0)  # [N, 512]
            kpe = tl.load(rope + (blk * s_rb + off * s_rs)[:, None] + offs_d[None, :],
                          mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # [N, 64]
            if NUM_SCALES == 1:  # int8: one scale per token, dequantized in registers
                sc = tl.load(scl + blk * s_sb + off * s_ss, mask=n_ok, other=0.0)
                ckv = (ckv.to(tl.float32) * sc[:, None]).to(q.dtype)
            elif NUM_SCALES > 1:  # fp8: one scale per group of R / NUM_SCALES values
                # e4m3 decoded from its bits (the latent is passed as uint8): sm_80 has no fp8 conversion
                bits = ckv.to(tl.int32)
                ex = (bits >> 3) & 15
                mt = bits & 7
                mag = tl.where(ex == 0, mt.to(tl.float32) * 0.001953125, ((8 + mt) << ex).to(tl.float32) * 0.0009765625)
                val = tl.where((bits >> 7) == 1, -mag, mag)
                # each column's group from R, not from the padded tile width: where R is no power of two (48), the
                # tile's BLOCK_R / NUM_SCALES columns are not a group
                group = offs_r // (R // NUM_SCALES)
                scale = tl.zeros([BLOCK_N, BLOCK_R], tl.float32)
                for g in tl.static_range(NUM_SCALES):
                    sc = tl.load(scl + blk * s_sb + off * s_ss + g, mask=n_ok, other=0.0)  # [N]
                    scale = tl.where((group == g)[None, :], sc[:, None], scale)
                ckv = (val * scale).to(q.dtype)
            else:
                ckv = ckv.to(q.dtype)
            s = tl.dot(q, tl.trans(ckv), input_precision=PREC)
            s += tl.dot(qp, tl.trans(kpe.to(qp.dtype)), input_precision=PREC)
            s = s * qk_scale
            if (n0 + BLOCK_N > min_pos + 1) | (n0 + BLOCK_N > end):  # the tile reaches past some row's query
                s = tl.where((offs_n[None, :] <= pos[:, None]) & n_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet: keep exp2 finite
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(ckv.dtype), ckv, input_precision=PREC)
            m_i = m_new
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        if SPLIT:
            lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
            tl.store(lse_part + t * s_lt + h * s_lh + sp, lse, mask=row_ok)
            tl.store(o_part + t[:, None] * s_xt + h[:, None] * s_xh + sp * s_xs + offs_r[None, :], o,
                     mask=row_ok[:, None] & r_ok[None, :])
        else:
            tl.store(out + t[:, None] * s_ot + h[:, None] * s_oh + offs_r[None, :], o.to(out.dtype.element_ty),
                     mask=row_ok[:, None] & r_ok[None, :])


@triton.jit
def _merge_splits_kernel(o_part, lse_part, out, s_xt, s_xh, s_xs, s_lt, s_lh, s_ot, s_oh, R, num_splits,
                         BLOCK_R: tl.constexpr):
    # One split at a time (a running max and sum, as in the attention loop): a captured decode step sizes its
    # splits from the block tables' full width, up to MAX_SPLITS, and all of them at once would not fit in registers.
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < R
    o_row = o_part + t * s_xt + h * s_xh + offs_r
    lse_row = lse_part + t * s_lt + h * s_lh
    m = tl.load(lse_row)  # finite: split 0 holds key 0, which every query sees
    acc = tl.load(o_row, mask=r_ok, other=0.0)
    l_sum = tl.full((), 1.0, tl.float32)
    for sp in range(1, num_splits):
        lse = tl.load(lse_row + sp)  # -inf for a split past the sequence's end: weight 0
        m_new = tl.maximum(m, lse)
        alpha = tl.exp2(m - m_new)
        w = tl.exp2(lse - m_new)
        acc = acc * alpha + w * tl.load(o_row + sp * s_xs, mask=r_ok, other=0.0)
        l_sum = l_sum * alpha + w
        m = m_new
    tl.store(out + t * s_ot + h * s_oh + offs_r, (acc / l_sum).to(out.dtype.element_ty), mask=r_ok)


def _choose_splits(programs: int, max_kv: int, device) -> int:
    want = triton.cdiv(target(device).num_sms, max(1, programs))  # enough programs for about one wave
    return max(1, min(want, triton.cdiv(max_kv, MIN_TOKENS_PER_SPLIT), MAX_SPLITS))


def mla_decode(q_lat, q_pe, kv_cache, block_tables, cu_seqlens_q, seq_lens, softmax_scale, fmt, out=None,
               num_splits=None):
    """num_splits: the KV splits per sequence; None chooses them (tests force several at small sizes)."""
    T, H, R = q_lat.shape
    DR = q_pe.shape[2]
    B = block_tables.shape[0]
    out = torch.empty_like(q_lat) if out is None else out
    if T == 0 or B == 0:
        return out
    block_size = kv_cache.shape[1]
    # Every sequence has at least one query, so T == B means one each: no host sync, which a decode step captured
    # as a CUDA graph needs. Otherwise one small sync sizes the grid.
    max_q = 1 if T == B else int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    gpu = target(q_lat.device).gpu
    # a packed tile is dequantized to float32 in registers: with 32 rows (heads) x [32, 512] key values it spilled on
    # sm_80/sm_90 for int8 and fp8, at 4 warps and at 8 (the spills `mla bench --kernels --compile-for` reports)
    BLOCK_H = min(pow2(H, 1), 32 if gpu and not fmt.packed else 16)
    # query tokens of one sequence share the tile too; rows = BLOCK_Q x BLOCK_H, at least 16 for tl.dot
    BLOCK_Q = max(16 // BLOCK_H, 1)
    while BLOCK_Q * BLOCK_H < 32 and BLOCK_Q < max_q:
        BLOCK_Q *= 2
    BLOCK_N = 16 if not gpu or fmt.packed else 32
    # 32 rows x 512 fp32 accumulators alone are 128 registers a thread at 4 warps: V3's 128 heads spilled there
    warps = 8 if gpu and (fmt.packed or BLOCK_Q * BLOCK_H >= 32) else 4
    q_tiles = triton.cdiv(max_q, BLOCK_Q)
    head_groups = triton.cdiv(H, BLOCK_H)
    max_kv = block_tables.shape[1] * block_size  # an upper bound on seq_lens without reading them
    if num_splits is None:
        num_splits = _choose_splits(B * q_tiles * head_groups, max_kv, q_lat.device)
    split = num_splits > 1
    if split:
        o_part = torch.empty(T, H, num_splits, R, dtype=torch.float32, device=q_lat.device)
        lse_part = torch.empty(T, H, num_splits, dtype=torch.float32, device=q_lat.device)
    else:
        o_part = lse_part = out  # unused
    lat, scl, rope = fmt.views(kv_cache)
    if fmt.name == "fp8":
        lat = lat.view(torch.uint8)  # decoded from its bits in the kernel
    scl = kv_cache if scl is None else scl  # a float cache has no scales: any pointer, never read
    _mla_decode_kernel[(B * q_tiles, head_groups, num_splits)](
        q_lat, q_pe, lat, rope, scl, block_tables, cu_seqlens_q, seq_lens, out, o_part, lse_part,
        q_lat.stride(0), q_lat.stride(1), q_pe.stride(0), q_pe.stride(1), lat.stride(0), lat.stride(1),
        rope.stride(0), rope.stride(1), scl.stride(0), scl.stride(1),
        block_tables.stride(0), out.stride(0), out.stride(1),
        o_part.stride(0) if split else 0, o_part.stride(1) if split else 0, o_part.stride(2) if split else 0,
        lse_part.stride(0) if split else 0, lse_part.stride(1) if split else 0,
        H, R, DR, block_size, q_tiles, num_splits, softmax_scale * LOG2E,
        BLOCK_Q=BLOCK_Q, BLOCK_H=BLOCK_H, BLOCK_N=BLOCK_N, BLOCK_R=pow2(R), BLOCK_DR=pow2(DR), NUM_SCALES=fmt.num_scales, SPLIT=split,
        PREC=dot_precision(q_lat.dtype), num_warps=warps, num_stages=2)
    if split:
        _merge_splits_kernel[(T, H)](o_part, lse_part, out, o_part.stride(0), o_part.stride(1), o_part.stride(2),
                                     lse_part.stride(0), lse_part.stride(1), out.stride(0), out.stride(1),
                                     R, num_splits, BLOCK_R=pow2(R), num_warps=4)
    return out
