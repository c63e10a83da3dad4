"""Incremental detokenisation: new text per token, holding back incomplete UTF-8 sequences."""
from .sequence import Sequence

PROMPT_CONTEXT = 5  # prompt tokens decoded along, so a first token's leading space is kept (sentencepiece)


def start(seq: Sequence):
    seq.prefix_offset = max(seq.num_prompt_tokens - PROMPT_CONTEXT, 0)
    seq.read_offset = seq.num_prompt_tokens


def next_text(tokenizer, seq: Sequence, final: bool = False) -> str:
    if tokenizer is None:
        return ""
    skip = seq.params.skip_special_tokens
    ids = seq.token_ids
    prefix = tokenizer.decode(ids[seq.prefix_offset:seq.read_offset], skip_special_tokens=skip)
    text = tokenizer.decode(ids[seq.prefix_offset:], skip_special_tokens=skip)
    if len(text) > len(prefix) and (final or not text.endswith("\ufffd")):
        seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)
        return text[len(prefix):]
    return ""
