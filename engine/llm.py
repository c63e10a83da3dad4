"""The public API: LLM(...).generate(...), in the convention vLLM users know, and the engine step."""
import os
from dataclasses import dataclass

import torch

from models.errors import ModelError
from models.parallel import Parallel

from .config import EngineConfig
from .generation_config import sampling_defaults
from .model_runner import build_rank
from .output import OutputProcessor
from .sampler import sample
from .sampling_params import SamplingParams
from .scheduler import Scheduler
from .sequence import RequestOutput, Sequence


def load_tokenizer(path: str):
    """The checkpoint's own tokenizer (tokenizer.json or sentencepiece tokenizer.model), or None if it has none."""
    if not any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except Exception as e:
        why = " ".join(str(e).split()) or type(e).__name__  # the whole message, on one line
        raise ModelError(f"{path}: cannot load the tokenizer ({why})") from None
    # the context limit is the engine's to enforce (max_model_len); transformers' own warns about longer texts
    tokenizer.model_max_length = int(1e30)
    return tokenizer


@dataclass(frozen=True)
class EngineStats:
    """What the engine is doing, for metrics (read between steps, by the thread that runs them)."""
    num_running: int
    num_waiting: int
    kv_cache_usage: float  # share of the cache blocks in use (0..1)
    num_preemptions: int
    prefix_queried_tokens: int  # prompt tokens looked up in the prefix cache
    prefix_hit_tokens: int  # ... and found there


class RequestStream:
    """A running request (LLM.stream): iterating it yields the new text after each step that sampled it ("" while
    the prompt is prefilled); .seq, .text and .output read its state at any time. Leaving the loop before the
    request is done aborts it (its cache is kept if it asked for that)."""

    def __init__(self, llm: "LLM", seq: Sequence):
        self.llm, self.seq = llm, seq

    def __iter__(self):
        try:
            while not self.seq.finished:
                for s, delta in self.llm.step():
                    if s is self.seq:
                        yield delta
        finally:
            if not self.seq.finished:
                self.llm.abort(self.seq)

    @property
    def text(self) -> str:
        return self.seq.text

    @property
    def output(self) -> RequestOutput:
        return self.seq.output()


class LLM:
    def __init__(self, model: str | EngineConfig, **kwargs):
        """LLM(path, dtype=..., ...) with EngineConfig's fields as keywords, or LLM(EngineConfig(...))."""
        config = model if isinstance(model, EngineConfig) else EngineConfig(model, **kwargs)
        if not os.path.isdir(config.model) and not (config.load_format == "dummy" and os.path.isfile(config.model)):
            raise ModelError(f"{config.model}: no such model folder")
        self.config = c = config.resolve()
        self.model_config = mc = c.model_config
        self.device, self.dtype = c.torch_device, c.torch_dtype
        self.ranks = None
        if c.tensor_parallel_size > 1:  # this process is rank 0; it starts the others (engine/parallel.py)
            from .parallel import Ranks
            self.ranks = Ranks(c)
        try:
            _, self.cache, self.runner = build_rank(c, self.ranks.par if self.ranks else Parallel(),
                                                    wrap=self.ranks.wrap if self.ranks else None)
            if self.ranks:
                self.ranks.ready()
        except BaseException:
            self.close()
            raise
        self.model, self.blocks = self.runner.model, self.runner.blocks
        self.tokenizer = load_tokenizer(c.model) if os.path.isdir(c.model) else None
        self.sampling_defaults = sampling_defaults(c.model) if os.path.isdir(c.model) else {}
        eos = set(mc.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.output = OutputProcessor(self.tokenizer, eos)
        self.scheduler = Scheduler(self.blocks, c.max_num_seqs, c.max_num_batched_tokens)
        self.generators: dict[int, torch.Generator] = {}
        self._seeds = torch.Generator().manual_seed(c.seed)

    def close(self):
        """Stop the other ranks (tensor parallelism); the engine cannot run after."""
        if self.ranks is not None:
            self.ranks.close()

    def sampling_params(self, **fields) -> SamplingParams:
        """SamplingParams with the checkpoint's defaults (generation_config.json) under the fields given."""
        return SamplingParams(**{**self.sampling_defaults, **fields})

    def stats(self) -> EngineStats:
        s = self.scheduler
        return EngineStats(len(s.running), len(s.waiting), self.blocks.usage, s.num_preemptions,
                           s.prefix_queried_tokens, s.prefix_hit_tokens)

    # ---- requests -------------------------------------------------------------------------------------------
    def encode(self, prompt: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer: pass prompt_token_ids")
        if not isinstance(prompt, str):
            raise ValueError(f"a prompt must be a string, got {type(prompt).__name__}")
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("the prompt is not valid UTF-8 text") from None
        return self.tokenizer(prompt).input_ids

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this checkpoint's tokenizer has no chat template")
        for m in messages:
            self.encode(m["content"])  # the same checks as a plain prompt (type, UTF-8)
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def check_request(self, token_ids, params: SamplingParams):
        """Everything about one request that can be wrong, before any of it is queued."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be SamplingParams, got {type(params).__name__}")
        params.check_vocab(self.model_config.vocab_size)
        if not isinstance(token_ids, (list, tuple)) or not token_ids:
            raise ValueError("a prompt must be a non-empty list of token ids")
        vocab, max_len = self.model_config.vocab_size, self.config.max_model_len
        for t in token_ids:
            if isinstance(t, bool) or not isinstance(t, int):
                raise ValueError(f"prompt token ids must be integers, got {t!r}")
            if not 0 <= t < vocab:
                raise ValueError(f"prompt token id {t} is outside the vocabulary (0..{vocab - 1})")
        if len(token_ids) > max_len - 1:
            raise ValueError(f"prompt has {len(token_ids)} tokens but the model's context is {max_len} "
                             "(max_position_embeddings), leaving no room to generate")

    def add_request(self, token_ids: list[int], params: SamplingParams, prompt: str | None = None,
                    session: Sequence | None = None, keep_cache: bool = False) -> Sequence:
        """Queue a request. With `session` (an earlier request made with keep_cache=True), the new request takes
        over its cache: the longest cached prefix it shares with token_ids is reused, only the rest is prefilled."""
        self.check_request(token_ids, params)
        if params.n > 1:
            raise ValueError(f"add_request runs one sequence, got n={params.n} (params.copies() gives one per completion)")
        if session is not None and not session.keep_cache:
            raise ValueError("session: the earlier request was not made with keep_cache=True")
        seq = Sequence(list(token_ids), params, min(len(token_ids) + params.max_tokens, self.config.max_model_len),
                       prompt, keep_cache=keep_cache)
        self.scheduler.check(seq)
        if session is not None:
            self.abort(session)
            seq.seq_id = session.seq_id  # the block table is keyed by it
            common = 0
            for a, b in zip(session.token_ids[:session.num_cached_tokens], token_ids):
                if a != b:
                    break
                common += 1
            # at least one token runs, to sample from; only blocks this sequence owns alone are written
            seq.num_cached_tokens = self.blocks.keep_prefix(seq.seq_id, min(common, len(token_ids) - 1))
        self.output.start(seq)
        self.scheduler.add(seq)
        seed = params.seed if params.seed is not None else int(torch.randint(2**62, (1,), generator=self._seeds))
        self.generators[seq.seq_id] = torch.Generator(self.device).manual_seed(seed)
        return seq

    def abort(self, seq: Sequence, free: bool = False):
        """Stop a request where it is (Ctrl-C in chat); its cache is kept if it asked for that, unless free."""
        if not seq.finished:
            seq.finish_reason = "abort"
        seq.keep_cache = seq.keep_cache and not free
        self.scheduler.abort(seq)
        self.generators.pop(seq.seq_id, None)

    # ---- one engine step ------------------------------------------------------------------------------------
    def step(self) -> list[tuple[Sequence, str]]:
        """One forward pass over the scheduled tokens; returns (sequence, new text) for each sampled sequence."""
        batch = self.scheduler.schedule()
        try:
            hidden = self.runner.forward(batch)
            due, rows, row = [], [], 0  # the sequences whose next token is due, and their last rows
            for seq, n in batch:
                if seq.in_prefill:
                    self.output.prompt(seq, hidden[row:row + n], self.model.logits)
                row += n
                if seq.num_cached_tokens + n == len(seq):
                    due.append(seq)
                    rows.append(row - 1)
            if due:
                logits = self.model.logits(hidden[rows])  # [B, V] float32
                tokens = sample(logits, [s.params for s in due], [self.generators[s.seq_id] for s in due], due)
        except BaseException:  # the step's requests end here (their blocks freed); the engine stays usable
            for seq, _ in batch:
                self.abort(seq)
            raise
        self.scheduler.computed(batch)
        if not due:
            return []
        events = [(seq, self.output.append(seq, token, logits[i])) for i, (seq, token) in enumerate(zip(due, tokens))]
        for seq, _ in events:
            if seq.finished:
                self.scheduler.finish(seq)
                self.generators.pop(seq.seq_id)
        return events

    # ---- front doors ----------------------------------------------------------------------------------------
    def _requests(self, prompts, sampling_params, prompt_token_ids):
        if (prompts is None) == (prompt_token_ids is None):
            raise ValueError("pass either prompts or prompt_token_ids")
        if prompts is not None:
            prompts = [prompts] if isinstance(prompts, str) else list(prompts)
            ids = [self.encode(p) for p in prompts]
        else:
            if not isinstance(prompt_token_ids, (list, tuple)) or not prompt_token_ids:
                raise ValueError("prompt_token_ids must be a list of token ids or a list of such lists")
            one = not isinstance(prompt_token_ids[0], (list, tuple))
            ids = [prompt_token_ids] if one else list(prompt_token_ids)
            prompts = [None] * len(ids)
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params or SamplingParams()] * len(ids)
        if len(params) != len(ids):
            raise ValueError(f"{len(params)} sampling params for {len(ids)} prompts")
        for i, p in zip(ids, params):  # all of it checked before any of it is queued
            self.check_request(i, p)
        return [(i, copy, prompt) for i, p, prompt in zip(ids, params, prompts) for copy in p.copies()]

    def generate(self, prompts: str | list[str] | None = None,
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 prompt_token_ids: list[int] | list[list[int]] | None = None) -> list[RequestOutput]:
        """Runs all prompts together (different lengths batched, long prompts prefilled in chunks). A prompt whose
        params have n > 1 gives n outputs in a row."""
        requests = self._requests(prompts, sampling_params, prompt_token_ids)
        seqs = []
        try:
            for ids, p, prompt in requests:
                seqs.append(self.add_request(ids, p, prompt))
            while not all(s.finished for s in seqs):
                self.step()
        except BaseException:  # nothing of this call stays queued
            for s in seqs:
                self.abort(s)
            raise
        return [s.output() for s in seqs]

    def prompt_logits(self, prompt_token_ids: list[int]) -> torch.Tensor:
        """Logits [L, V] (float32) at every position of one prompt: row i predicts token i + 1."""
        seq = self.add_request(prompt_token_ids, SamplingParams(max_tokens=1, temperature=0))
        seq.prompt_logits = []
        while not seq.finished:
            self.step()
        return torch.cat(seq.prompt_logits)

    def stream(self, prompt_token_ids: list[int], sampling_params: SamplingParams | None = None,
               prompt: str | None = None, session: Sequence | None = None, keep_cache: bool = False) -> RequestStream:
        """One request, run as it is iterated (RequestStream)."""
        return RequestStream(self, self.add_request(prompt_token_ids, sampling_params or SamplingParams(), prompt,
                                                    session, keep_cache))
