"""mla bench: throughput in llama-bench's style (pp = prompt processing, tg = token generation), optionally side by
side with transformers on the same weights and against the device's roofline; the rows it prints as md, json or
csv; and the serving benchmark (many requests through continuous batching)."""
import json
from dataclasses import replace
import math
import statistics
import sys
import time

import torch
from tqdm import tqdm

from engine.config import EngineConfig
from engine.llm import LLM
from engine.sampling_params import SamplingParams

from . import roofline


def _tokens(n: int, vocab: int, seed: int) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class EngineRunner:
    """Times pp / tg on our engine."""
    name = "mla-engine"

    def __init__(self, llm: LLM):
        self.llm = llm

    def pp(self, n: int, depth: int, seed: int) -> float:
        llm = self.llm
        seq = llm.add_request(_tokens(depth + n, llm.model_config.vocab_size, seed), SamplingParams(max_tokens=1, temperature=0))
        budget = llm.scheduler.max_num_batched_tokens
        while seq.num_cached_tokens < depth:  # the depth is prefilled before the clock starts
            llm.scheduler.max_num_batched_tokens = min(budget, depth - seq.num_cached_tokens)
            llm.step()
        llm.scheduler.max_num_batched_tokens = budget
        _sync(llm.device)
        t = time.perf_counter()
        while not seq.finished:
            llm.step()
        _sync(llm.device)
        return n / (time.perf_counter() - t)

    def tg(self, n: int, depth: int, batch: int, seed: int, on_start=None) -> float:
        """on_start: called when the clock starts (after the prefill and the first token)."""
        llm = self.llm
        sp = SamplingParams(max_tokens=n + 1, temperature=0, ignore_eos=True)
        seqs = [llm.add_request(_tokens(max(depth, 1), llm.model_config.vocab_size, seed + i), sp) for i in range(batch)]
        while any(s.in_prefill or len(s.output_token_ids) == 0 for s in seqs):  # prefill + first token untimed
            llm.step()
        _sync(llm.device)
        if on_start:
            on_start()
        t = time.perf_counter()
        while not llm.scheduler.idle:
            llm.step()
        _sync(llm.device)
        return n * batch / (time.perf_counter() - t)


class TransformersRunner:
    """The same tests through transformers (eager, its own DynamicCache) on the same weights."""
    name = "transformers"

    def __init__(self, path: str, device, dtype):
        from transformers import AutoModelForCausalLM
        self.device = device
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        self.vocab = self.model.config.vocab_size

    @torch.inference_mode()
    def pp(self, n: int, depth: int, seed: int) -> float:
        ids = torch.tensor([_tokens(depth + n, self.vocab, seed)], device=self.device)
        past = None
        if depth:
            past = self.model(ids[:, :depth], use_cache=True, logits_to_keep=1).past_key_values
        _sync(self.device)
        t = time.perf_counter()
        self.model(ids[:, depth:], past_key_values=past, use_cache=True, logits_to_keep=1)
        _sync(self.device)
        return n / (time.perf_counter() - t)

    @torch.inference_mode()
    def tg(self, n: int, depth: int, batch: int, seed: int) -> float:
        if batch != 1:
            return float("nan")
        ids = torch.tensor([_tokens(max(depth, 1), self.vocab, seed)], device=self.device)
        out = self.model(ids, use_cache=True, logits_to_keep=1)
        past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        _sync(self.device)
        t = time.perf_counter()
        for _ in range(n):
            out = self.model(tok, past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        _sync(self.device)
        return n / (time.perf_counter() - t)


def measure(fn, reps: int) -> tuple[float, float]:
    fn()  # warm-up
    xs = [fn() for _ in range(reps)]
    if any(math.isnan(x) for x in xs):
        return float("nan"), float("nan")
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def check_tests(llm: LLM, tests: list[tuple]):
    """Refuse, up front, a test whose tokens the engine cannot hold at once: its throughput would count tokens that
    were never produced, or sequences that waited for others."""
    c, capacity = llm.config, llm.cache.num_tokens
    for kind, n, d, b in tests:
        name = f"{kind}{n}" + (f" @ d{d}" if d else "") + (f" x{b}" if b > 1 else "")
        need = d + n + 1 if kind == "pp" else max(d, 1) + n + 1
        if need > c.max_model_len:
            raise ValueError(f"{name} needs {need} tokens of context; the model has {c.max_model_len}")
        if b > c.max_num_seqs:
            raise ValueError(f"{name}: -b {b} is more than the engine's max_num_seqs ({c.max_num_seqs})")
        if b * need > capacity:
            raise ValueError(f"{name} needs {b * need} tokens of KV cache, the cache holds {capacity}; "
                             "raise --kv-cache-gib")


def int8_gemm_runs(llm) -> bool:
    """Whether prompts multiply the quantized weights int8 x int8: what the backend does (prefill_gemm int8 needs the
    C++ kernels, without which the torch references serve)."""
    from kernels.matmul import int8_gemm
    return getattr(llm.model.ops, "quant_gemm", None) is int8_gemm


def run(configs: list[EngineConfig], tests: list[tuple], reps: int, label: str, baseline: bool = False,
        with_roofline: bool = False, progress: bool = True) -> list[dict]:
    """Every test (kind "pp" | "tg", tokens, depth, batch) on an engine per config, one row each; transformers
    (baseline) is measured once per test, on the first config's checkpoint, device and dtype."""
    rows, measured = [], {}
    base = peaks = None
    bar = tqdm(total=len(tests) * len(configs), desc="bench", file=sys.stderr, leave=False, disable=not progress)
    for config in configs:
        llm = LLM(replace(config, enable_prefix_caching=False))  # repetitions send the same prompt: compute it
        c = llm.config
        if baseline and base is None:
            base = TransformersRunner(c.model, llm.device, llm.dtype)
        if with_roofline and peaks is None:
            gemm = torch.int8 if int8_gemm_runs(llm) else llm.dtype
            peaks = roofline.device_peaks(llm.device, gemm)
            print(f"roofline: pp limit {peaks['tflops'] * 1e3:.0f} GFLOP/s ({str(gemm).removeprefix('torch.')} GEMM), "
                  f"tg limit {peaks['gbps']:.1f} GB/s (read)", file=sys.stderr)
        check_tests(llm, tests)
        ours, cfg = EngineRunner(llm), llm.model_config
        info = dict(model=label, params=roofline.fmt_params(roofline.param_count(cfg)),
                    device=torch.cuda.get_device_name(llm.device) if llm.device.type == "cuda" else "cpu",
                    dtype=c.dtype, cache=c.kv_cache_dtype, mode=c.attn_mode,
                    weights=(c.weight_dtype or "-") + (" (int8 GEMM)" if int8_gemm_runs(llm) else ""))
        for kind, n, d, b in tests:
            name = f"{kind}{n}" + (f" @ d{d}" if d else "") + (f" x{b}" if b > 1 else "")
            seed = len(rows)
            run_on = (lambda r: lambda: r.pp(n, d, seed=seed)) if kind == "pp" else (lambda r: lambda: r.tg(n, d, b, seed=seed))
            mean, std = measure(run_on(ours), reps)
            row = dict(info, test=name, tps=mean, tps_std=std)
            if peaks is not None:
                row["roofline"] = roofline.roofline_share(llm, peaks, kind, n, d, b, mean)
            if base is not None:  # transformers does not depend on our mode or cache: measured once per test
                if name not in measured:
                    measured[name] = measure(run_on(base), reps)
                ref = measured[name]
                row.update(baseline_tps=ref[0], baseline_std=ref[1],
                           ratio=mean / ref[0] if ref[0] == ref[0] else float("nan"))
            rows.append(row)
            bar.update()
        del llm, ours
    bar.close()
    return rows


def table(rows: list[dict], output: str = "md") -> str:
    """The rows as a markdown table (with the roofline and baseline columns when measured), json or csv."""
    if output == "json":
        return json.dumps(rows, indent=1)
    if output == "csv":
        keys = list(rows[0]) if rows else []
        return "\n".join([",".join(keys)] + [",".join(str(r[k]) for k in keys) for r in rows])
    head = ["model", "params", "device", "dtype", "weights", "cache", "mode", "test", "t/s"]
    with_roofline = any("roofline" in r for r in rows)
    with_base = any("baseline_tps" in r for r in rows)
    head += ["roofline"] * with_roofline + ["transformers t/s", "ratio"] * with_base
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r[k] for k in head[:8]] + [f"{r['tps']:.2f} ± {r['tps_std']:.2f}"]
        if with_roofline:
            cells.append(f"{100 * r['roofline']:.0f}%")
        if with_base:
            cells += [f"{nan_safe(r['baseline_tps'])} ± {nan_safe(r['baseline_std'])}", nan_safe(r["ratio"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def nan_safe(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.2f}"
