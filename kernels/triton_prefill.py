"""Expanded MLA (prefill): latent expansion into a bounded workspace, then varlen flash attention over a tile list.

1. Pre-pass (torch, one host sync for the sizes). Query rows are cut into query tiles of BLOCK_M rows of one
   sequence. Each query tile needs the KV tiles (BLOCK_N rows inside one cache block) at positions up to its last
   query; tiles past that are fully masked and never listed. A listed tile is flagged when it needs a mask (it
   reaches past the tile's first query, or is shorter than BLOCK_N). The cache blocks those tiles read are
   deduplicated: sequences that share prefix blocks expand them once, and each query tile then walks only the
   tiles of its own sequence inside the workspace; the other sequences' tiles sitting between them cost nothing.
2. Rounds. The distinct blocks, in order of first use, are cut into rounds of at most `workspace_tokens` tokens.
   Each round gathers its blocks' latent rows, expands them with one GEMM through kv_b_proj into
   K_nope of every head, then V of every head ([tokens, H * nope + H * v], kv_b_proj's split layout:
   kernels/reference.py); k_pe stays the gathered latent's 64-wide row, shared by all heads.
   Memory bound: the workspace never holds more than WORKSPACE_ELEMENTS expanded values (plus the gathered
   latent of the same tokens), whatever the prompt length.
3. Attention kernel, one launch per round. Grid (work item, head): a work item is one query tile's list of KV
   tiles in this round, ordered heaviest first so the longest lists start first (longest-processing-time order
   spreads the work over the SMs). q.k = q_nope.k_nope + q_pe.k_pe as two tl.dot; online softmax with exp2.
   With one round the kernel writes the output; with several it merges its result into float32 out/lse
   accumulators by log-sum-exp, and the output is cast at the end."""
import torch
import triton
import triton.language as tl

from .cache_format import dequantize
from .triton_common import dot_precision, pow2, target

LOG2E = 1.4426950408889634
WORKSPACE_ELEMENTS = 1 << 26  # expanded values per round: 128 MiB in bf16 (8k tokens of V2-Lite, 2k of V3)


@triton.jit
def _mla_prefill_kernel(q_nope, q_pe, kv_ws, pe_ws, out, o_acc, lse_acc, work, entries,
                        s_qt, s_qh, s_pt, s_ph, s_wr, v_off, s_er, s_ot, s_oh, s_at, s_ah, s_lt, s_lh,
                        DN, DR, DV, qk_scale,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DN: tl.constexpr,
                        BLOCK_DR: tl.constexpr, BLOCK_DV: tl.constexpr, MERGE: tl.constexpr, PREC: tl.constexpr):
    w = tl.program_id(0)
    h = tl.program_id(1)
    row0 = tl.load(work + w * 5)
    n_rows = tl.load(work + w * 5 + 1)
    pos0 = tl.load(work + w * 5 + 2)
    e0 = tl.load(work + w * 5 + 3)
    e1 = tl.load(work + w * 5 + 4)
    offs_m = tl.arange(0, BLOCK_M)
    m_ok = offs_m < n_rows
    rows = (row0 + offs_m).to(tl.int64)
    pos = pos0 + offs_m
    offs_dn = tl.arange(0, BLOCK_DN)
    offs_dr = tl.arange(0, BLOCK_DR)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(q_nope + rows[:, None] * s_qt + h * s_qh + offs_dn[None, :],
                mask=m_ok[:, None] & (offs_dn < DN)[None, :], other=0.0)  # [M, nope]
    qp = tl.load(q_pe + rows[:, None] * s_pt + h * s_ph + offs_dr[None, :],
                 mask=m_ok[:, None] & (offs_dr < DR)[None, :], other=0.0)  # [M, rope]
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    for e in range(e0, e1):
        ws0 = tl.load(entries + e * 4)
        kpos0 = tl.load(entries + e * 4 + 1)
        n_valid = tl.load(entries + e * 4 + 2)
        masked = tl.load(entries + e * 4 + 3)
        n_ok = offs_n < n_valid
        wrow = (ws0 + offs_n).to(tl.int64)
        k = tl.load(kv_ws + wrow[:, None] * s_wr + h * DN + offs_dn[None, :],
                    mask=n_ok[:, None] & (offs_dn < DN)[None, :], other=0.0)  # [N, nope]
        kp = tl.load(pe_ws + wrow[:, None] * s_er + offs_dr[None, :],
                     mask=n_ok[:, None] & (offs_dr < DR)[None, :], other=0.0)  # [N, rope], shared by the heads
        v = tl.load(kv_ws + wrow[:, None] * s_wr + v_off + h * DV + offs_dv[None, :],
                    mask=n_ok[:, None] & (offs_dv < DV)[None, :], other=0.0)  # [N, v]
        s = tl.dot(q, tl.trans(k), input_precision=PREC)
        s += tl.dot(qp, tl.trans(kp), input_precision=PREC)
        s = s * qk_scale
        if masked != 0:
            s = tl.where(n_ok[None, :] & (kpos0 + offs_n[None, :] <= pos[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row masked so far: keep exp2 finite
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    dv_ok = (offs_dv < DV)[None, :]
    if MERGE:
        # this round's (o, lse) merged into the accumulators; rows no key of this round reaches have l = 0
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        lse_prev = tl.load(lse_acc + rows * s_lt + h * s_lh, mask=m_ok, other=float("-inf"))
        o_prev = tl.load(o_acc + rows[:, None] * s_at + h * s_ah + offs_dv[None, :], mask=m_ok[:, None] & dv_ok,
                         other=0.0)
        m = tl.maximum(lse, lse_prev)
        m = tl.where(m == float("-inf"), 0.0, m)
        a_prev = tl.exp2(lse_prev - m)
        a_new = tl.exp2(lse - m)  # = l_i * 2^(m_i - m)
        denom = a_prev + a_new
        o = (o_prev * a_prev[:, None] + acc * (a_new / tl.where(l_i > 0, l_i, 1.0))[:, None]) \
            / tl.where(denom > 0, denom, 1.0)[:, None]
        tl.store(o_acc + rows[:, None] * s_at + h * s_ah + offs_dv[None, :], o, mask=m_ok[:, None] & dv_ok)
        tl.store(lse_acc + rows * s_lt + h * s_lh, tl.where(denom > 0, m + tl.log2(tl.where(denom > 0, denom, 1.0)),
                                                              float("-inf")), mask=m_ok)
    else:
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out + rows[:, None] * s_ot + h * s_oh + offs_dv[None, :], o.to(out.dtype.element_ty),
                 mask=m_ok[:, None] & dv_ok)


def _cdiv(a, b):
    return (a + b - 1) // b


def plan(block_tables, cu_seqlens_q, seq_lens, block_size: int, BLOCK_M: int, BLOCK_N: int, round_blocks: int):
    """The pre-pass: query tiles, their KV tile lists, and the rounds of distinct cache blocks.
    Returns ([(blocks of the round [nb] int64, work [W, 5] int32)] one per round, entries [E, 4] int32).
    work rows: (first query row, rows, position of the first row, first entry, end entry);
    entries: (workspace row, key position of that row, valid rows, needs a mask)."""
    dev = block_tables.device
    cu = cu_seqlens_q.long()
    L = seq_lens.long()
    q_len = cu[1:] - cu[:-1]
    B = q_len.shape[0]
    n_qt = _cdiv(q_len, BLOCK_M)  # [B]
    qt_seq = torch.repeat_interleave(torch.arange(B, device=dev), n_qt)  # [NQT]
    NQT = qt_seq.shape[0]
    qt_idx = torch.arange(NQT, device=dev) - (torch.cumsum(n_qt, 0) - n_qt)[qt_seq]
    qt_row0 = cu[qt_seq] + qt_idx * BLOCK_M
    qt_rows = torch.minimum(cu[qt_seq + 1] - qt_row0, torch.full_like(qt_row0, BLOCK_M))
    qt_pos0 = L[qt_seq] - q_len[qt_seq] + qt_idx * BLOCK_M
    qt_last = qt_pos0 + qt_rows - 1  # keys after the tile's last query are masked for every row: not listed
    sub = _cdiv(block_size, BLOCK_N)  # KV tiles per cache block
    n_tiles = (qt_last // block_size) * sub + (qt_last % block_size) // BLOCK_N + 1  # [NQT]
    e_qt = torch.repeat_interleave(torch.arange(NQT, device=dev), n_tiles)  # [E]
    E = e_qt.shape[0]
    e_t = torch.arange(E, device=dev) - (torch.cumsum(n_tiles, 0) - n_tiles)[e_qt]
    j = e_t // sub  # block index within the sequence
    s0 = (e_t % sub) * BLOCK_N  # first row inside the block
    e_seq = qt_seq[e_qt]
    blk = block_tables.long()[e_seq, j]
    kpos0 = j * block_size + s0
    n_valid = torch.minimum(torch.clamp(block_size - s0, max=BLOCK_N), L[e_seq] - kpos0)
    masked = (n_valid < BLOCK_N) | (kpos0 + n_valid - 1 > qt_pos0[e_qt])

    uniq, inv = torch.unique(blk, return_inverse=True)
    first = torch.full((uniq.shape[0],), E, device=dev, dtype=torch.long)
    first.scatter_reduce_(0, inv, torch.arange(E, device=dev), reduce="amin")
    order = torch.argsort(first)  # distinct blocks in order of first use: a sequence's blocks stay together
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.shape[0], device=dev)
    u = rank[inv]
    e_round = u // round_blocks
    ws_row = (u % round_blocks) * block_size + s0

    # entries grouped by (round, query tile); a work item = one query tile's entries inside one round
    key = e_round * NQT + e_qt
    srt = torch.sort(key, stable=True).indices
    key = key[srt]
    ent = torch.stack((ws_row[srt], kpos0[srt], n_valid[srt], masked[srt].long()), 1).to(torch.int32)
    w_key, w_cnt = torch.unique_consecutive(key, return_counts=True)
    w_end = torch.cumsum(w_cnt, 0)
    w_round, w_qt = w_key // NQT, w_key % NQT
    work = torch.stack((qt_row0[w_qt], qt_rows[w_qt], qt_pos0[w_qt], w_end - w_cnt, w_end), 1)
    lpt = torch.argsort(w_round * (E + 1) + (E - w_cnt))  # per round, the longest tile lists first
    work = work[lpt].to(torch.int32)
    per_round = torch.bincount(w_round, minlength=1).tolist()  # the host sync
    n_rounds = len(per_round)
    rounds, w0 = [], 0
    for r in range(n_rounds):
        rounds.append((uniq[order[r * round_blocks:(r + 1) * round_blocks]], work[w0:w0 + per_round[r]]))
        w0 += per_round[r]
    return rounds, ent


def mla_prefill(q_nope, q_pe, kv_cache, block_tables, cu_seqlens_q, seq_lens, w_kv_b, softmax_scale, fmt, out=None,
                workspace_tokens=None):
    """workspace_tokens: tokens expanded per round; None sizes it from WORKSPACE_ELEMENTS (tests force several
    rounds at small sizes)."""
    T, H, DN = q_nope.shape
    DR = q_pe.shape[2]
    DV = w_kv_b.shape[0] // H - DN
    out = q_nope.new_empty(T, H, DV) if out is None else out
    if T == 0:
        return out
    block_size = kv_cache.shape[1]
    gpu = target(q_nope.device).gpu
    BLOCK_M = 64 if gpu else 16
    BLOCK_N = 64 if gpu else 16
    ws_tokens = workspace_tokens or WORKSPACE_ELEMENTS // (H * (DN + DV))
    round_blocks = max(1, ws_tokens // block_size)
    rounds, entries = plan(block_tables, cu_seqlens_q, seq_lens, block_size, BLOCK_M, BLOCK_N, round_blocks)
    merge = len(rounds) > 1
    if merge:
        o_acc = torch.zeros(T, H, DV, dtype=torch.float32, device=out.device)
        lse_acc = torch.full((T, H), float("-inf"), dtype=torch.float32, device=out.device)
    else:
        o_acc = lse_acc = out  # unused
    w_t = w_kv_b.t()
    for blocks, work in rounds:
        lat = kv_cache.index_select(0, blocks).view(-1, kv_cache.shape[-1])  # [nb * block_size, 576 values or bytes]
        c_kv, scales, pe_ws = fmt.views(lat)  # k_pe [tokens, rope]: one row per token for all heads
        if scales is not None:
            c_kv = dequantize(c_kv, scales, w_kv_b.dtype)  # [tokens, R] in the weight dtype, only this round's
        kv_ws = c_kv.to(w_kv_b.dtype) @ w_t  # [tokens, H * nope + H * v]
        if pe_ws.dtype != q_pe.dtype or pe_ws.stride(0) % 16:
            # in a packed row (644 / 656 bytes) k_pe's row stride is no multiple of 16 elements, which Triton
            # specializes on: the unvectorized loads spilled on sm_80 (`mla bench --kernels --compile-for sm_80`)
            pe_ws = pe_ws.to(q_pe.dtype).contiguous()
        _mla_prefill_kernel[(work.shape[0], H)](
            q_nope, q_pe, kv_ws, pe_ws, out, o_acc, lse_acc, work, entries,
            q_nope.stride(0), q_nope.stride(1), q_pe.stride(0), q_pe.stride(1), kv_ws.stride(0), H * DN,
            pe_ws.stride(0), out.stride(0), out.stride(1), o_acc.stride(0), o_acc.stride(1),
            lse_acc.stride(0), lse_acc.stride(1), DN, DR, DV, softmax_scale * LOG2E,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_DN=pow2(DN), BLOCK_DR=pow2(DR), BLOCK_DV=pow2(DV),
            MERGE=merge, PREC=dot_precision(q_nope.dtype), num_warps=4, num_stages=2)
    if merge:
        out.copy_(o_acc)
    return out
