"""Next-token choice and logprobs from float32 logits: greedy, temperature, top-k, top-p, per-request seeds."""
import torch

from .sampling_params import SamplingParams
from .sequence import Logprob


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> list[int]:
    """logits [B, V] float32 -> one token id per row."""
    tokens = logits.argmax(-1)
    for i, p in enumerate(params):
        if p.greedy:
            continue
        x = logits[i] / p.temperature
        if p.top_k > 0 and p.top_k < x.shape[-1]:
            x = x.masked_fill(x < x.topk(p.top_k).values[-1], float("-inf"))
        if p.top_p < 1.0:
            sorted_x, order = x.sort(descending=True)
            probs = sorted_x.softmax(-1)
            # drop a token when the tokens ranked above it already hold top_p of the mass
            sorted_x[(probs.cumsum(-1) - probs) > p.top_p] = float("-inf")
            x = torch.full_like(x, float("-inf")).scatter(0, order, sorted_x)
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
