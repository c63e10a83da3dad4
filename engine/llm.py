"""The public API: LLM(...).generate(...), in the convention vLLM users know."""
import json
import os
from collections.abc import Iterator

import torch

from kvcache import CACHE_DTYPES, PACKED_CACHE_DTYPES, BlockManager, LatentCache, packed_bytes_per_token
from models.config import ModelConfig
from models.errors import ModelError
from models.loader import load_model

from . import detokenize
from .model_runner import ModelRunner
from .sampler import sample, top_logprobs
from .sampling_params import SamplingParams
from .scheduler import Scheduler
from .sequence import RequestOutput, Sequence

ATTN_MODES = ("auto", "absorbed", "expanded")
WEIGHT_DTYPES = ("int8", "int4")  # weight-only quantization at load
CPU_CACHE_GIB = 4.0  # default KV cache budget on the CPU; on CUDA, 85% of what is free after the weights
BACKENDS = ("auto", "triton", "torch")
DTYPES = {"auto": None, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Query tokens per sequence from which the expanded path serves a forward pass, per device kind, unless `mla tune`
# measured this device (TUNED_FILE). cpu: measured by `mla tune` (bench/results/tune-cpu.md); cuda: vLLM's
# FlashMLA crossover until measured on a GPU.
MLA_THRESHOLD = {"cpu": 256, "cuda": 128}
TUNED_FILE = os.environ.get("MLA_ENGINE_TUNED", os.path.join(os.path.expanduser("~"), ".cache", "mla-engine",
                                                              "mla_threshold.json"))


def device_kind(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def tuned_threshold(device: torch.device) -> int | None:
    try:
        with open(TUNED_FILE) as f:
            value = json.load(f).get(device_kind(device))
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and value >= 1 else None


def save_tuned_threshold(device: torch.device, threshold: int) -> str:
    try:
        with open(TUNED_FILE) as f:
            table = json.load(f)
    except (OSError, ValueError):
        table = {}
    table = table if isinstance(table, dict) else {}
    table[device_kind(device)] = threshold
    os.makedirs(os.path.dirname(TUNED_FILE) or ".", exist_ok=True)
    with open(TUNED_FILE, "w") as f:
        json.dump(table, f, indent=1)
    return TUNED_FILE


def _choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name}={value!r}: must be one of {', '.join(allowed)}")
    return value


def load_tokenizer(path: str):
    """The checkpoint's own tokenizer (tokenizer.json or sentencepiece tokenizer.model), or None if it has none."""
    if not any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except Exception as e:
        raise ModelError(f"{path}: cannot load the tokenizer ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


class LLM:
    def __init__(self, model: str, device: str | None = None, dtype: str = "auto", attn_mode: str = "auto",
                 kv_cache_dtype: str = "auto", backend: str = "auto", mla_threshold: int | None = None, *,
                 weight_dtype: str | None = None, kv_cache_memory_gib: float | None = None, max_num_seqs: int = 64,
                 max_num_batched_tokens: int = 4096, block_size: int = 64, max_model_len: int | None = None,
                 enforce_eager: bool = False, seed: int = 0, progress: bool = True):
        self.attn_mode = _choice("attn_mode", attn_mode, ATTN_MODES)
        _choice("backend", backend, BACKENDS)
        _choice("dtype", dtype, tuple(DTYPES))
        _choice("kv_cache_dtype", kv_cache_dtype, ("auto",) + tuple(CACHE_DTYPES) + tuple(PACKED_CACHE_DTYPES))
        if weight_dtype is not None:
            _choice("weight_dtype", weight_dtype, WEIGHT_DTYPES)
        if mla_threshold is not None and mla_threshold < 1:
            raise ValueError(f"mla_threshold={mla_threshold}: must be at least 1")
        for name, v in (("max_num_seqs", max_num_seqs), ("max_num_batched_tokens", max_num_batched_tokens),
                        ("block_size", block_size)):
            if v < 1:
                raise ValueError(f"{name}={v}: must be at least 1")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={device!r}: CUDA is not available on this machine")
        self.backend = ("triton" if self.device.type == "cuda" else "torch") if backend == "auto" else backend
        if self.backend == "triton" and self.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("backend='triton' on the CPU needs TRITON_INTERPRET=1")

        if not os.path.isdir(model):
            raise ModelError(f"{model}: no such model folder")
        cfg = ModelConfig.from_hf(model)
        self.dtype = DTYPES[dtype] or (getattr(torch, cfg.torch_dtype) if self.device.type == "cuda" else torch.float32)
        self.model = load_model(model, dtype=self.dtype, device=self.device, backend=self.backend, progress=progress,
                                cfg=cfg)
        if weight_dtype is not None:
            self.model.quantize_weights(weight_dtype)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()  # hand the float weights' memory back before the cache is sized
        self.config = cfg
        self.tokenizer = load_tokenizer(model)
        self.max_model_len = min(cfg.max_position_embeddings, max_model_len or cfg.max_position_embeddings)
        self.eos_token_ids = set(cfg.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(self.tokenizer.eos_token_id)

        cache_dtype = self.dtype if kv_cache_dtype == "auto" else CACHE_DTYPES.get(kv_cache_dtype, torch.uint8)
        width = cfg.kv_cache_width if cache_dtype != torch.uint8 else packed_bytes_per_token(
            kv_cache_dtype, cfg.kv_lora_rank, cfg.qk_rope_head_dim, self.dtype)  # packed: bytes per token
        if kv_cache_memory_gib is None:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                kv_cache_memory_gib = 0.85 * free / 2**30
            else:
                kv_cache_memory_gib = CPU_CACHE_GIB
        if kv_cache_memory_gib <= 0:
            raise ValueError(f"kv_cache_memory_gib={kv_cache_memory_gib}: must be positive")
        self.cache = LatentCache.from_budget(int(kv_cache_memory_gib * 2**30), max_num_seqs * self.max_model_len,
                                             cfg.num_hidden_layers, block_size, width, cache_dtype, self.device)
        self.blocks = BlockManager(self.cache.num_blocks, block_size)
        self.scheduler = Scheduler(self.blocks, max_num_seqs, max_num_batched_tokens)
        threshold = mla_threshold or tuned_threshold(self.device) or MLA_THRESHOLD.get(self.device.type, 128)
        # decode steps replay CUDA graphs (engine/cuda_graphs.py) unless enforce_eager
        self.runner = ModelRunner(self.model, self.cache, self.blocks, self.attn_mode, threshold, self.max_model_len,
                                  max_num_seqs, cuda_graphs=not enforce_eager)
        self.generators: dict[int, torch.Generator] = {}
        self._seeds = torch.Generator().manual_seed(seed)

    # ---- requests -------------------------------------------------------------------------------------------
    def encode(self, prompt: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer: pass prompt_token_ids")
        return self.tokenizer(prompt).input_ids

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this checkpoint's tokenizer has no chat template")
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def add_request(self, token_ids: list[int], params: SamplingParams, prompt: str | None = None,
                    session: Sequence | None = None, keep_cache: bool = False) -> Sequence:
        """Queue a request. With `session` (an earlier request made with keep_cache=True), the new request takes
        over its cache: the longest cached prefix it shares with token_ids is reused, only the rest is prefilled."""
        if not token_ids:
            raise ValueError("empty prompt")
        if len(token_ids) > self.max_model_len - 1:
            raise ValueError(f"prompt has {len(token_ids)} tokens but the model's context is {self.max_model_len} "
                             "(max_position_embeddings), leaving no room to generate")
        bad = [t for t in token_ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary (0..{self.config.vocab_size - 1})")
        seq = Sequence(list(token_ids), params, min(len(token_ids) + params.max_tokens, self.max_model_len), prompt,
                       keep_cache=keep_cache)
        if session is not None:
            if not session.keep_cache:
                raise ValueError("session: the earlier request was not made with keep_cache=True")
            self.abort(session)
            seq.seq_id = session.seq_id  # the block table is keyed by it
            common = 0
            for a, b in zip(session.token_ids[:session.num_cached_tokens], token_ids):
                if a != b:
                    break
                common += 1
            seq.num_cached_tokens = min(common, len(token_ids) - 1)  # at least one token runs, to sample from
        detokenize.start(seq)
        self.scheduler.add(seq)
        seed = params.seed if params.seed is not None else int(torch.randint(2**62, (1,), generator=self._seeds))
        self.generators[seq.seq_id] = torch.Generator(self.device).manual_seed(seed)
        return seq

    def abort(self, seq: Sequence, free: bool = False):
        """Stop a request where it is (Ctrl-C in chat); its cache is kept if it asked for that, unless free."""
        if not seq.finished:
            seq.finish_reason = "abort"
        seq.keep_cache = seq.keep_cache and not free
        self.scheduler.finish(seq)
        self.generators.pop(seq.seq_id, None)

    # ---- one engine step ------------------------------------------------------------------------------------
    def step(self) -> list[tuple[Sequence, str]]:
        """One forward pass over the scheduled tokens; returns (sequence, new text) for each sampled sequence."""
        batch = self.scheduler.schedule()
        hidden = self.runner.forward(batch)
        row, sample_rows, sampled = 0, [], []
        for seq, n in batch:
            if seq.in_prefill and seq.params.prompt_logprobs is not None:
                self._prompt_logprobs(seq, hidden[row:row + n])
            if seq.in_prefill and seq.prompt_logits is not None:
                seq.prompt_logits.append(self.model.logits(hidden[row:row + n]))
            seq.num_cached_tokens += n
            row += n
            if seq.num_cached_tokens == len(seq):  # the whole sequence is cached: time for its next token
                sample_rows.append(row - 1)
                sampled.append(seq)
        if not sampled:
            return []
        logits = self.model.logits(hidden[sample_rows])  # [B, V] float32
        tokens = sample(logits, [s.params for s in sampled], [self.generators[s.seq_id] for s in sampled])
        want_logprobs = [i for i, s in enumerate(sampled) if s.params.logprobs is not None]
        logprobs = torch.log_softmax(logits[want_logprobs], -1) if want_logprobs else None
        events = []
        for i, (seq, token) in enumerate(zip(sampled, tokens)):
            if logprobs is not None and i in want_logprobs:
                lp = logprobs[want_logprobs.index(i)]
                seq.logprobs.append(top_logprobs(lp, seq.params.logprobs, token, self._decode_one))
            seq.token_ids.append(token)
            events.append((seq, self._check_finish(seq, token)))
        return events

    def _prompt_logprobs(self, seq: Sequence, hidden: torch.Tensor):
        """Row j of a prompt chunk predicts token start + j + 1; entry 0 (the first token) has no prediction."""
        start = seq.num_cached_tokens
        if start == 0:
            seq.prompt_logprobs.append(None)
        rows = min(hidden.shape[0], seq.num_prompt_tokens - 1 - start)
        if rows <= 0:
            return
        logprobs = torch.log_softmax(self.model.logits(hidden[:rows]), -1)
        n = seq.params.prompt_logprobs
        for j in range(rows):
            seq.prompt_logprobs.append(top_logprobs(logprobs[j], n, seq.token_ids[start + j + 1], self._decode_one))

    def _decode_one(self, token: int) -> str | None:
        return self.tokenizer.decode([token]) if self.tokenizer is not None else None

    def _check_finish(self, seq: Sequence, token: int) -> str:
        p = seq.params
        if (token in self.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids:
            seq.finish_reason = "stop"
        elif len(seq) >= seq.max_len:
            seq.finish_reason = "length"
        delta = detokenize.next_text(self.tokenizer, seq, final=seq.finished)
        old = len(seq.text)
        seq.text += delta
        for stop in p.stop:
            i = seq.text.find(stop, max(0, old - len(stop) + 1))
            if i >= 0:
                seq.text, seq.finish_reason = seq.text[:i], "stop"
                delta = seq.text[old:]
                break
        if seq.finished:
            self.abort(seq)
        return delta

    # ---- front doors ----------------------------------------------------------------------------------------
    def _requests(self, prompts, sampling_params, prompt_token_ids):
        if (prompts is None) == (prompt_token_ids is None):
            raise ValueError("pass either prompts or prompt_token_ids")
        if prompts is not None:
            prompts = [prompts] if isinstance(prompts, str) else list(prompts)
            ids = [self.encode(p) for p in prompts]
        else:
            ids = [prompt_token_ids] if prompt_token_ids and isinstance(prompt_token_ids[0], int) else list(prompt_token_ids)
            prompts = [None] * len(ids)
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params or SamplingParams()] * len(ids)
        if len(params) != len(ids):
            raise ValueError(f"{len(params)} sampling params for {len(ids)} prompts")
        return list(zip(ids, params, prompts))

    def generate(self, prompts: str | list[str] | None = None,
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 prompt_token_ids: list[int] | list[list[int]] | None = None) -> list[RequestOutput]:
        """Runs all prompts together (different lengths batched, long prompts prefilled in chunks)."""
        requests = self._requests(prompts, sampling_params, prompt_token_ids)
        seqs = [self.add_request(ids, p, prompt) for ids, p, prompt in requests]
        while not self.scheduler.idle:
            self.step()
        return [s.output() for s in seqs]

    def prompt_logits(self, prompt_token_ids: list[int]) -> torch.Tensor:
        """Logits [L, V] (float32) at every position of one prompt: row i predicts token i + 1."""
        seq = self.add_request(prompt_token_ids, SamplingParams(max_tokens=1, temperature=0))
        seq.prompt_logits = []
        while not seq.finished:
            self.step()
        return torch.cat(seq.prompt_logits)

    def stream(self, prompt_token_ids: list[int], sampling_params: SamplingParams | None = None,
               prompt: str | None = None, session: Sequence | None = None, keep_cache: bool = False) -> Iterator[str]:
        """Yields the new text after every step of one request (possibly ""), prefill included. The request is
        self.current while it runs and its output is self.last_output after."""
        seq = self.current = self.add_request(prompt_token_ids, sampling_params or SamplingParams(), prompt, session,
                                              keep_cache)
        while not seq.finished:
            for s, delta in self.step():
                if s is seq:
                    yield delta
        self.last_output = seq.output()
