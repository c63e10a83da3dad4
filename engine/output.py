"""What a request returns, built as its tokens come: logprobs and prompt logprobs, the text (incremental
detokenisation that holds back incomplete UTF-8), stop strings, and the decision to finish."""
import torch

from .sampler import top_logprobs
from .sequence import Sequence

PROMPT_CONTEXT = 5  # prompt tokens decoded along, so a first token's leading space is kept (sentencepiece)


def _held_back(text: str, stops: list[str]) -> int:
    """The longest end of text that is a proper beginning of a stop string."""
    return max((k for stop in stops for k in range(min(len(stop) - 1, len(text)), 0, -1)
                if text.endswith(stop[:k])), default=0)


class OutputProcessor:
    def __init__(self, tokenizer, eos_token_ids: set[int]):
        self.tokenizer, self.eos_token_ids = tokenizer, eos_token_ids

    def start(self, seq: Sequence):
        seq.prefix_offset = max(seq.num_prompt_tokens - PROMPT_CONTEXT, 0)
        seq.read_offset = seq.num_prompt_tokens

    def prompt(self, seq: Sequence, hidden: torch.Tensor, logits_of):
        """A prompt chunk's rows (before its tokens count as cached): prompt logprobs and kept logits.
        Row j predicts token start + j + 1; entry 0 (the first token) has no prediction. A preempted request runs
        its prompt again: rows already taken are not taken twice."""
        start = seq.num_cached_tokens
        if seq.prompt_logits is not None:
            kept = sum(t.shape[0] for t in seq.prompt_logits)
            if start + hidden.shape[0] > kept:
                seq.prompt_logits.append(logits_of(hidden[max(kept - start, 0):]))
        n = seq.params.prompt_logprobs
        if n is None:
            return
        if not seq.prompt_logprobs:
            seq.prompt_logprobs.append(None)
        first = len(seq.prompt_logprobs) - 1 - start  # the first row not yet taken
        rows = min(hidden.shape[0], seq.num_prompt_tokens - 1 - start)
        if rows <= first:
            return
        first = max(first, 0)
        logprobs = torch.log_softmax(logits_of(hidden[first:rows]), -1)
        for j in range(first, rows):
            seq.prompt_logprobs.append(top_logprobs(logprobs[j - first], n, seq.token_ids[start + j + 1],
                                                    self._decode_one))

    def append(self, seq: Sequence, token: int, logits: torch.Tensor) -> str:
        """Add a sampled token (logits [V] float32: its row); returns the text it adds and sets seq.finish_reason
        when the request is done."""
        p = seq.params
        if p.logprobs is not None:
            seq.logprobs.append(top_logprobs(torch.log_softmax(logits, -1), p.logprobs, token, self._decode_one))
        seq.token_ids.append(token)
        if (token in self.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids:
            seq.finish_reason = "stop"
        elif len(seq) >= seq.max_len:
            seq.finish_reason = "length"
        old = len(seq.text)
        seq.text += self._next_text(seq, final=seq.finished)
        for stop in p.stop:
            i = seq.text.find(stop, max(0, old - len(stop) + 1))
            if i >= 0:
                seq.text, seq.finish_reason = seq.text[:i], "stop"
                break
        # Text that could be the start of a stop string is held back until the next tokens tell.
        end = len(seq.text) if seq.finished else len(seq.text) - _held_back(seq.text, p.stop)
        delta, seq.sent = seq.text[seq.sent:max(end, seq.sent)], max(end, seq.sent)
        return delta

    def _decode_one(self, token: int) -> str | None:
        return self.tokenizer.decode([token]) if self.tokenizer is not None else None

    def _next_text(self, seq: Sequence, final: bool) -> str:
        if self.tokenizer is None:
            return ""
        skip = seq.params.skip_special_tokens
        ids = seq.token_ids
        prefix = self.tokenizer.decode(ids[seq.prefix_offset:seq.read_offset], skip_special_tokens=skip)
        text = self.tokenizer.decode(ids[seq.prefix_offset:], skip_special_tokens=skip)
        if len(text) > len(prefix) and (final or not text.endswith("\ufffd")):
            seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)
            return text[len(prefix):]
        return ""
