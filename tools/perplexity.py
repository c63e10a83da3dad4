"""llama-perplexity style scoring: chunks of ctx tokens, each scored on its second half."""
import math
import sys

import torch
from tqdm import tqdm


def perplexity(llm, token_ids: list[int], ctx: int, progress: bool = True) -> dict:
    if ctx < 4:
        raise ValueError(f"--ctx {ctx}: must be at least 4")
    if ctx > llm.config.max_model_len - 1:
        raise ValueError(f"--ctx {ctx}: at most {llm.config.max_model_len - 1} (the model's context is "
                         f"{llm.config.max_model_len} tokens, one of which the scoring leaves free)")
    n_chunks = len(token_ids) // ctx
    if n_chunks == 0:
        raise ValueError(f"the text has {len(token_ids)} tokens, fewer than one chunk of --ctx {ctx}")
    nll = []
    first = ctx // 2
    for c in tqdm(range(n_chunks), desc="perplexity", unit="chunk", disable=not progress, file=sys.stderr, leave=False):
        chunk = token_ids[c * ctx:(c + 1) * ctx]
        logprobs = torch.log_softmax(llm.prompt_logits(chunk), -1)  # row i predicts token i + 1
        targets = torch.tensor(chunk[first:], device=logprobs.device)
        nll.append(-logprobs[first - 1:ctx - 1].gather(1, targets[:, None]).squeeze(1).double().cpu())
    nll = torch.cat(nll)
    mean = nll.mean().item()
    stderr = (nll.std().item() / math.sqrt(nll.numel())) if nll.numel() > 1 else 0.0
    ppl = math.exp(mean)
    return {"ppl": ppl, "ppl_stderr": ppl * stderr, "nll": mean, "tokens": nll.numel(), "chunks": n_chunks}
