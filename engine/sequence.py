"""One request's state as it moves through the engine, and what generate() returns for it."""
from dataclasses import dataclass, field
from itertools import count

from .sampling_params import SamplingParams


class Logprob(float):
    """A log-probability that is a float and also reads like vLLM's Logprob (.logprob, .rank, .decoded_token)."""

    def __new__(cls, value: float, rank: int, decoded_token: str | None = None):
        obj = super().__new__(cls, value)
        obj.rank, obj.decoded_token = rank, decoded_token
        return obj

    @property
    def logprob(self) -> float:
        return float(self)


@dataclass
class RequestOutput:
    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    logprobs: list[dict[int, Logprob]] | None
    prompt_logprobs: list[dict[int, Logprob] | None] | None
    finish_reason: str | None  # "stop" (EOS, stop token or stop string) | "length" | "abort"


_ids = count()


@dataclass
class Sequence:
    token_ids: list[int]
    params: SamplingParams
    max_len: int  # prompt + new tokens, capped by the model's context
    prompt: str | None = None
    seq_id: int = field(default_factory=lambda: next(_ids))
    num_cached_tokens: int = 0
    finish_reason: str | None = None
    text: str = ""
    sent: int = 0  # characters of text already returned by a step (the rest may be a stop string's start)
    logprobs: list = field(default_factory=list)
    prompt_logprobs: list = field(default_factory=list)
    # incremental detokenisation offsets (engine/output.py)
    prefix_offset: int = 0
    read_offset: int = 0
    num_prefix_cached: int | None = None  # prompt tokens found in the prefix cache when first admitted
    keep_cache: bool = False  # a chat session: the blocks outlive the request, for the next turn
    prompt_logits: list | None = None  # set to [] to keep the logits of every prompt position (LLM.prompt_logits)

    def __post_init__(self):
        self.num_prompt_tokens = len(self.token_ids)
        self.prefix_offset = self.read_offset = self.num_prompt_tokens

    def __len__(self):
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def in_prefill(self) -> bool:
        return self.num_cached_tokens < self.num_prompt_tokens

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def output(self) -> RequestOutput:
        p = self.params
        return RequestOutput(self.seq_id, self.prompt, self.token_ids[:self.num_prompt_tokens], self.output_token_ids,
                             self.text, self.logprobs if p.logprobs is not None else None,
                             self.prompt_logprobs if p.prompt_logprobs is not None else None, self.finish_reason)
