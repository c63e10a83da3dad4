"""Plain-torch references of every attention kernel. They define the functions the Triton kernels compute,
serve the CPU (torch backend), and are what the kernel tests compare against.

Shared conventions (T query tokens packed over B sequences):
  kv_cache      [num_blocks, block_size, kv_lora_rank + rope_dim]: per token [c_kv | k_pe]
  block_tables  [B, max_blocks] int32, cache block ids of each sequence in position order
  cu_seqlens_q  [B + 1] int32, query rows of sequence b are cu_seqlens_q[b]:cu_seqlens_q[b + 1]
  seq_lens      [B] int32, tokens of sequence b in the cache after this step (its cached prefix + its queries)
  w_kv_b        [H * (nope + v), kv_lora_rank]: kv_b_proj stored split, the W_UK rows of every head (head-major),
                then the W_UV rows: one GEMM expands the latent, and W_UK / W_UV are contiguous views for the
                absorbed path (models/attention.py)
The queries of a sequence are its last q_len tokens: query i sits at position seq_len - q_len + i and
attends to cache positions 0 .. that position (causal among the new tokens).
"""
import torch

# Bounds on the temporaries of one attention call, so that a long prompt never builds an L x L score matrix.
SCORE_ELEMENTS = 1 << 24  # absorbed: query rows x heads x keys per chunk
KV_CHUNK = 1024  # expanded: cached tokens expanded through kv_b_proj at a time
Q_CHUNK = 1024  # expanded: query tokens scored at a time against one KV chunk


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in float32 and cast back before the weight, exactly as DeepSeek's RMSNorm does.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rope(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool):
    """x [T, ..., rope_dim] rotated by the angles of positions [T] (cos / sin [P, rope_dim / 2] float32)."""
    shape = (positions.shape[0],) + (1,) * (x.dim() - 2) + (-1,)
    cos, sin = cos[positions].view(shape), sin[positions].view(shape)
    xf = x.float()
    if interleave:  # DeepSeek layout: pairs (x0, x1), (x2, x3), ... share one frequency
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    else:  # rotate-half layout
        x1, x2 = xf.chunk(2, dim=-1)
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)


def silu_mul(h: torch.Tensor) -> torch.Tensor:
    """h [M, 2I] (gate | up) -> silu(gate) * up [M, I]."""
    gate, up = h.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")  # the router's choice (route)
SCORING_FUNCS = ("softmax", "sigmoid")


def route(x, gate, bias, top_k: int, scoring: str, method: str, n_group: int, topk_group: int, norm: bool,
          scale: float):
    """DeepSeek's router: top-k expert ids [T, k] and their weights [T, k] float32 for x [T, D], gate [E, D]
    (float32 products). scoring: "softmax" | "sigmoid"; method: greedy, group_limited_greedy (V2: groups ranked by
    their best expert) or noaux_tc (V3: bias [E] added for the choice only, groups ranked by their best two); the
    weights are the chosen scores, normalised to sum 1 when norm, times scale."""
    logits = torch.nn.functional.linear(x.float(), gate.float())  # [T, E]
    scores = logits.softmax(-1) if scoring == "softmax" else logits.sigmoid()
    choice = scores + bias if method == "noaux_tc" else scores
    if method != "greedy" and n_group > 1:
        grouped = choice.view(x.shape[0], n_group, -1)
        group_score = grouped.amax(-1) if method == "group_limited_greedy" else grouped.topk(2, -1)[0].sum(-1)
        keep = torch.zeros_like(group_score, dtype=torch.bool)
        keep.scatter_(1, group_score.topk(topk_group, -1)[1], True)
        choice = choice.masked_fill(~keep.unsqueeze(-1).expand_as(grouped).reshape_as(choice), float("-inf"))
    ids = choice.topk(top_k, -1)[1]
    weights = scores.gather(1, ids)
    if norm:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return ids, weights * scale


def write_latent(kv_cache, slot_mapping, c_kv, k_pe):
    """Scatter new tokens' [c_kv | k_pe] into the paged cache: token t goes to flat slot slot_mapping[t]."""
    flat = kv_cache.view(-1, kv_cache.shape[-1])
    flat[slot_mapping] = torch.cat((c_kv, k_pe), dim=-1).to(kv_cache.dtype)


def gather_latent(kv_cache, block_table, seq_len: int):
    """The first seq_len cached rows of one sequence, [seq_len, width], in position order."""
    block_size = kv_cache.shape[1]
    n = (seq_len + block_size - 1) // block_size
    blocks = block_table[:n].long()
    if n == 0 or bool((blocks[1:] - blocks[:-1] == 1).all()):  # consecutive blocks: a view, no copy
        start = int(blocks[0]) if n else 0
        return kv_cache.view(-1, kv_cache.shape[-1])[start * block_size:start * block_size + seq_len]
    return kv_cache[blocks].view(-1, kv_cache.shape[-1])[:seq_len]


def sequences(kv_cache, block_tables, cu_seqlens_q, seq_lens, dtype):
    """For each sequence that has queries: its query rows q0:q1 and its cached latent [L, width] in dtype."""
    cu, lens = cu_seqlens_q.tolist(), seq_lens.tolist()
    for b, L in enumerate(lens):
        if cu[b + 1] > cu[b]:
            yield cu[b], cu[b + 1], gather_latent(kv_cache, block_tables[b], L).to(dtype)


def expand(c_kv, w_kv_b, H: int, dn: int):
    """The cached latent c_kv [c, R] through kv_b_proj: (k_nope [c, H, nope], v [c, H, v]) as views of one GEMM."""
    kv = c_kv @ w_kv_b.T  # [c, H * nope + H * v]
    return kv[:, :H * dn].view(-1, H, dn), kv[:, H * dn:].view(kv.shape[0], H, -1)


def _causal_mask(q_pos0: int, nq: int, k_pos0: int, nk: int, device):
    """True where key position > query position (masked out)."""
    qp = torch.arange(q_pos0, q_pos0 + nq, device=device)[:, None]
    kp = torch.arange(k_pos0, k_pos0 + nk, device=device)[None, :]
    return kp > qp


def mla_decode(q_lat, q_pe, kv_cache, block_tables, cu_seqlens_q, seq_lens, softmax_scale):
    """Absorbed MLA: all heads attend to the one shared latent row of every cached token.
    q_lat [T, H, kv_lora_rank] (q_nope through W_UK), q_pe [T, H, rope_dim] -> o_lat [T, H, kv_lora_rank]."""
    T, H, R = q_lat.shape
    out = torch.empty_like(q_lat)
    q = torch.cat((q_lat, q_pe), dim=-1)  # [T, H, R + rope_dim]: one dot with the cached [c_kv | k_pe]
    for q0, q1, lat in sequences(kv_cache, block_tables, cu_seqlens_q, seq_lens, q.dtype):  # lat [L, 576]
        L = lat.shape[0]
        start = L - (q1 - q0)
        step = max(1, SCORE_ELEMENTS // max(1, H * L))
        for i in range(q0, q1, step):
            j = min(q1, i + step)
            s = (q[i:j] @ lat.T).float() * softmax_scale  # [t, H, L]
            if start + (i - q0) < L - 1:  # some query of the chunk precedes the last key
                s.masked_fill_(_causal_mask(start + i - q0, j - i, 0, L, s.device)[:, None, :], float("-inf"))
            p = torch.softmax(s, dim=-1).to(lat.dtype)
            out[i:j] = p @ lat[:, :R]
    return out


def mla_prefill(q_nope, q_pe, kv_cache, block_tables, cu_seqlens_q, seq_lens, w_kv_b, softmax_scale):
    """Expanded MLA: decompress the cached latent through kv_b_proj into per-head K_nope and V, chunk by chunk,
    and run causal flash attention (online softmax) with the shared k_pe.
    q_nope [T, H, nope], q_pe [T, H, rope], w_kv_b [H * (nope + v), kv_lora_rank] -> o [T, H, v]."""
    w_kv_b = w_kv_b.to(q_nope.dtype)  # stored bf16 under a float32 model: widened once per call
    T, H, dn = q_nope.shape
    R = w_kv_b.shape[1]
    dv = w_kv_b.shape[0] // H - dn
    out = q_nope.new_empty(T, H, dv)
    for q0, q1, lat in sequences(kv_cache, block_tables, cu_seqlens_q, seq_lens, q_nope.dtype):
        L, t = lat.shape[0], q1 - q0
        start = L - t  # position of the first query
        qn, qp = q_nope[q0:q1].transpose(0, 1), q_pe[q0:q1].transpose(0, 1)  # [H, t, d]
        m = torch.full((H, t, 1), float("-inf"), device=q_nope.device)
        l = torch.zeros(H, t, 1, device=q_nope.device)
        acc = torch.zeros(H, t, dv, device=q_nope.device)
        for k0 in range(0, L, KV_CHUNK):
            k1 = min(L, k0 + KV_CHUNK)
            k_nope, v = (t.transpose(0, 1) for t in expand(lat[k0:k1, :R], w_kv_b, H, dn))  # [H, c, nope | v]
            k_pe = lat[k0:k1, R:]  # [c, rope]: one row shared by all heads
            for i in range(max(0, k0 - start), t, Q_CHUNK):  # queries before k0 see none of this chunk
                j = min(t, i + Q_CHUNK)
                s = (qn[:, i:j] @ k_nope.transpose(1, 2) + qp[:, i:j] @ k_pe.T).float() * softmax_scale
                if start + i < k1 - 1:  # the chunk reaches past some query: mask the future
                    s.masked_fill_(_causal_mask(start + i, j - i, k0, k1 - k0, s.device), float("-inf"))
                m_new = torch.maximum(m[:, i:j], s.amax(-1, keepdim=True))
                p = torch.exp(s - m_new)
                alpha = torch.exp(m[:, i:j] - m_new)
                l[:, i:j] = l[:, i:j] * alpha + p.sum(-1, keepdim=True)
                acc[:, i:j] = acc[:, i:j] * alpha + (p.to(v.dtype) @ v).float()
                m[:, i:j] = m_new
        out[q0:q1] = (acc / l).transpose(0, 1).to(out.dtype)
    return out
