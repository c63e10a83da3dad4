"""Next-token choice and logprobs from float32 logits: penalties (repetition, presence, frequency), greedy,
temperature, min-p, top-k, top-p, per-request seeds. The order is vLLM's: penalties on the raw logits (so greedy
sees them too), then temperature, min-p, top-k, top-p."""
import torch

from .sampling_params import SamplingParams
from .sequence import Logprob, Sequence


def penalize(logits: torch.Tensor, p: SamplingParams, token_ids: list[int], num_prompt_tokens: int) -> torch.Tensor:
    """One row of logits [V] with the request's penalties applied (a new tensor: the raw row still gives the
    logprobs). The repetition penalty counts prompt and output tokens (as transformers and vLLM do); presence and
    frequency count the output only (OpenAI)."""
    x = logits.clone()
    if p.repetition_penalty != 1 and token_ids:
        seen = torch.tensor(sorted(set(token_ids)), device=x.device)
        v = x[seen]
        x[seen] = torch.where(v > 0, v / p.repetition_penalty, v * p.repetition_penalty)
    output = token_ids[num_prompt_tokens:]
    if (p.presence_penalty or p.frequency_penalty) and output:
        counts = torch.bincount(torch.tensor(output, device=x.device), minlength=x.shape[-1]).to(x.dtype)  # [V]
        x -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(x.dtype)
    return x


def sampling_logits(x: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """One row [V] of (penalized) logits -> the logits to draw from: temperature, then min-p, top-k, top-p
    (dropped tokens at -inf)."""
    x = x / p.temperature
    if p.min_p > 0:
        probs = x.softmax(-1)
        x = x.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
    if p.top_k > 0 and p.top_k < x.shape[-1]:
        x = x.masked_fill(x < x.topk(p.top_k).values[-1], float("-inf"))
    if p.top_p < 1.0:
        sorted_x, order = x.sort(descending=True)
        probs = sorted_x.softmax(-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass
        sorted_x[(probs.cumsum(-1) - probs) > p.top_p] = float("-inf")
        x = torch.full_like(x, float("-inf")).scatter(0, order, sorted_x)
    return x


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator],
           seqs: list[Sequence] | None = None) -> list[int]:
    """logits [B, V] float32 -> one token id per row. seqs (the rows' sequences) are needed for the penalties."""
    tokens = logits.argmax(-1)
    for i, p in enumerate(params):
        x = logits[i]
        if p.penalized:
            if seqs is None:
                raise ValueError("penalties need the sequences' tokens (sample(..., seqs=...))")
            x = penalize(x, p, seqs[i].token_ids, seqs[i].num_prompt_tokens)
        if p.greedy:
            if p.penalized:
                tokens[i] = x.argmax()
            continue
        x = sampling_logits(x, p)
        tokens[i] = torch.multinomial(x.softmax(-1), 1, generator=generators[i])[0]
    return tokens.tolist()


def top_logprobs(logprobs: torch.Tensor, n: int, token: int | None, decode) -> dict[int, Logprob]:
    """The top-n entries of one row of log-probabilities, plus `token` (the sampled or the prompt token)."""
    out = {}
    if n:
        values, ids = logprobs.topk(n)
        for rank, (v, t) in enumerate(zip(values.tolist(), ids.tolist()), 1):
            out[t] = Logprob(v, rank, decode(t))
    if token is not None and token not in out:
        v = logprobs[token]
        out[token] = Logprob(float(v), int((logprobs > v).sum()) + 1, decode(token))
    return out
