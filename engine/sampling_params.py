"""What to generate for one request; names and defaults follow vLLM. Every field is checked for type and range when
the object is made (ValueError naming the field), so nothing malformed reaches the engine."""
import math
from dataclasses import dataclass, field, replace

MAX_N = 128  # completions per request: each is a sequence with its own cache
MIN_TEMPERATURE = 1e-5  # below this, dividing the logits by it overflows float32: sampled as greedy


def _int(name, v, lo, hi=None, none_ok=False):
    if v is None and none_ok:
        return
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{name} must be an integer, got {v!r}")
    if v < lo or (hi is not None and v > hi):
        raise ValueError(f"{name} must be in {lo}..{hi if hi is not None else 'inf'}, got {v}")


def _float(name, v, lo, hi, lo_open=False):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    if v < lo or v > hi or (lo_open and v == lo):
        raise ValueError(f"{name} must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}")


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # top-N logprobs per generated token (plus the sampled one)
    prompt_logprobs: int | None = None  # logprobs of the prompt tokens (entry 0 is None), plus top-N
    skip_special_tokens: bool = True
    n: int = 1  # completions per prompt: n sequences, seeds seed, seed + 1, ... when seeded (copies())
    presence_penalty: float = 0.0  # subtracted once from every token already generated (OpenAI)
    frequency_penalty: float = 0.0  # subtracted per occurrence among the generated tokens (OpenAI)
    repetition_penalty: float = 1.0  # divides positive / multiplies negative logits of prompt and output tokens (CTRL)
    min_p: float = 0.0  # drop tokens whose probability is below min_p times the top token's

    def __post_init__(self):
        _int("max_tokens", self.max_tokens, 1)
        _float("temperature", self.temperature, 0.0, 1e6)
        _float("top_p", self.top_p, 0.0, 1.0, lo_open=True)
        _int("top_k", self.top_k, -1)
        _int("seed", self.seed, -2**63, 2**64 - 1, none_ok=True)
        _int("logprobs", self.logprobs, 0, none_ok=True)
        _int("prompt_logprobs", self.prompt_logprobs, 0, none_ok=True)
        _int("n", self.n, 1, MAX_N)
        _float("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _float("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        _float("repetition_penalty", self.repetition_penalty, 0.0, 1e6, lo_open=True)
        _float("min_p", self.min_p, 0.0, 1.0)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is not None and not isinstance(self.stop, (list, tuple)):
            raise ValueError(f"stop must be a string or a list of strings, got {self.stop!r}")
        self.stop = list(self.stop or [])
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError("stop strings must be non-empty strings")
        if not isinstance(self.stop_token_ids, (list, tuple)):
            raise ValueError(f"stop_token_ids must be a list of integers, got {self.stop_token_ids!r}")
        for t in self.stop_token_ids:
            _int("stop_token_ids", t, 0)
        self.stop_token_ids = list(self.stop_token_ids)
        for name in ("ignore_eos", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.temperature < MIN_TEMPERATURE:
            self.temperature = 0.0

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    def copies(self) -> list["SamplingParams"]:
        """The n single sequences of this request; a seeded request gives each its own seed (seed + i), so that
        they differ and the whole request still reproduces."""
        if self.n == 1:
            return [self]
        return [replace(self, n=1, seed=None if self.seed is None else (self.seed + i) % 2**64) for i in range(self.n)]

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def check_vocab(self, vocab_size: int):
        """The fields bounded by the model: logprobs counts up to the vocabulary."""
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and v > vocab_size:
                raise ValueError(f"{name}={v} is more than the vocabulary ({vocab_size} tokens)")
