#!/usr/bin/env python3
"""Train the small default DeepSeek-V2-architecture (MLA + MoE) model of mla-engine.

Everything is offline and reproducible on a CPU:

* corpus: docstrings of the Python standard library that ships with the
  interpreter running this script (found via ``sysconfig``), parsed with ``ast``;
* tokenizer: byte-level BPE trained with ``tokenizers``, wrapped in
  ``transformers.PreTrainedTokenizerFast`` (with a chat template);
* model: ``transformers.DeepseekV2ForCausalLM`` (multi-head latent attention
  with a decoupled RoPE part, one dense layer then DeepSeekMoE layers with
  shared + routed experts), trained with plain PyTorch AdamW.

The script writes config.json, generation_config.json, model.safetensors,
tokenizer.json, tokenizer_config.json, TRAINING.md and training.json into
``--out`` (default: the folder holding this script).

Usage::

    python models/default/train.py                      # default run (550 steps, ~18 min, 1 thread)
    python models/default/train.py --steps 20 --out /tmp/smoke
    python models/default/train.py --minutes 10 --out /tmp/m10   # picks --steps from a timing probe
"""

from __future__ import annotations

import argparse
import ast
import copy
import hashlib
import json
import math
import os
import platform
import random
import re
import shlex
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import tokenizers
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoTokenizer,
    DeepseekV2Config,
    DeepseekV2ForCausalLM,
    PreTrainedTokenizerFast,
)

HERE = Path(__file__).resolve().parent

SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|user|>", "<|assistant|>", "<|system|>"]

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] | trim + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

# Directory names that are never part of the corpus (tests, third-party code, caches).
SKIP_DIRS = {
    "test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
    "__phello__", "config-3.11-x86_64-linux-gnu",
}
SKIP_TOP = {"lib2to3/tests", "idlelib/idle_test", "ctypes/test", "tkinter/test",
            "unittest/test", "distutils/tests", "sqlite3/test", "test"}

SAMPLE_PROMPTS = ["The function returns", "Return a list of"]


# --------------------------------------------------------------------------- corpus
def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def iter_stdlib_files(root: Path):
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        keep = []
        for d in dirnames:
            rel = d if rel_dir == "." else f"{rel_dir}/{d}"
            if d in SKIP_DIRS or d.startswith(("test_", "config-")) or rel in SKIP_TOP:
                continue
            keep.append(d)
        dirnames[:] = sorted(keep)
        for f in filenames:
            if not f.endswith(".py") or f.startswith("test_") or f == "__phello__.py":
                continue
            rel = f if rel_dir == "." else f"{rel_dir}/{f}"
            files.append(rel)
    return sorted(files)


_BLANKS = re.compile(r"\n[ \t]*\n(?:[ \t]*\n)+")


def clean_docstring(doc: str) -> str | None:
    """Light cleaning; returns None for docstrings that are too short or not prose."""
    doc = doc.replace("\r\n", "\n").replace("\t", "    ")
    lines = [ln.rstrip() for ln in doc.split("\n")]
    doc = "\n".join(lines).strip("\n")
    doc = _BLANKS.sub("\n\n", doc).strip()
    if len(doc) < 40:
        return None
    nonblank = [ln.strip() for ln in doc.split("\n") if ln.strip()]
    doctest = sum(1 for ln in nonblank if ln.startswith((">>>", "...")))
    if doctest > 0.5 * len(nonblank):
        return None
    words = re.findall(r"[A-Za-z]{2,}", doc)
    if len(words) < 6:
        return None
    nonspace = sum(1 for c in doc if not c.isspace())
    letters = sum(1 for c in doc if c.isascii() and c.isalpha())
    if letters < 0.6 * nonspace:
        return None
    return doc


def docstrings_of(source: str):
    tree = ast.parse(source)
    nodes = [tree] + [
        n for n in ast.walk(tree)
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
    ]
    # ast.walk is breadth-first; sort by source position for a natural order.
    nodes.sort(key=lambda n: (getattr(n, "lineno", 0), getattr(n, "col_offset", 0)))
    for n in nodes:
        d = ast.get_docstring(n, clean=True)
        if d:
            yield d


def path_hash(relpath: str) -> str:
    return hashlib.sha256(relpath.encode("utf-8")).hexdigest()


def build_corpus(heldout_percent: float = 2.0):
    """Returns (train_docs, heldout_docs, stats).

    Held-out split is by file: files are ordered by sha256 of their path relative to the
    stdlib folder, and taken in that order into the held-out set until it holds
    ``heldout_percent`` % of the corpus characters. Files themselves are read in sorted order.
    """
    root = stdlib_dir()
    per_file = []
    seen = set()
    n_files = n_raw = 0
    for rel in iter_stdlib_files(root):
        try:
            src = (root / rel).read_text(encoding="utf-8")
            docs = list(docstrings_of(src))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        n_files += 1
        kept = []
        for d in docs:
            n_raw += 1
            c = clean_docstring(d)
            if c is None or c in seen:  # exact duplicates are kept once
                continue
            seen.add(c)
            kept.append(c)
        if kept:
            per_file.append((rel, kept))
    total_chars = sum(len(d) for _, docs in per_file for d in docs)
    heldout_files, acc = set(), 0
    for rel, docs in sorted(per_file, key=lambda it: path_hash(it[0])):
        if acc >= total_chars * heldout_percent / 100.0:
            break
        heldout_files.add(rel)
        acc += sum(map(len, docs))
    train = [d for rel, docs in per_file if rel not in heldout_files for d in docs]
    heldout = [d for rel, docs in per_file if rel in heldout_files for d in docs]
    stats = {"stdlib_dir": str(root), "files": n_files, "raw_docstrings": n_raw,
             "files_with_docs": len(per_file), "heldout_files": sorted(heldout_files)}
    return train, heldout, stats


# --------------------------------------------------------------------------- tokenizer
def train_tokenizer(texts, vocab_size: int, outdir: Path) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    bos = tok.token_to_id("<|bos|>")
    # Plain encodes start with <|bos|> (like the training documents do).
    tok.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B", special_tokens=[("<|bos|>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|user|>", "<|assistant|>", "<|system|>"],
        clean_up_tokenization_spaces=False,
        model_max_length=1024,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(outdir), save_jinja_files=False)  # chat template inside tokenizer_config.json
    # transformers 5 records its internal class name ("TokenizersBackend"); use the name that
    # every transformers version (4.x included) resolves.
    cfg_path = outdir / "tokenizer_config.json"
    tcfg = json.loads(cfg_path.read_text())
    tcfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(tcfg, indent=2, ensure_ascii=False) + "\n")
    return fast


def check_tokenizer(outdir: Path, sample_text: str):
    tk = AutoTokenizer.from_pretrained(str(outdir))
    assert tk.chat_template == CHAT_TEMPLATE
    ids = tk(sample_text, add_special_tokens=False)["input_ids"]
    assert tk.decode(ids) == sample_text, "byte-level round trip failed"
    weird = "naïve café — ∑ 😀\n\tx = {'a': 1}"
    assert tk.decode(tk(weird, add_special_tokens=False)["input_ids"]) == weird
    assert tk("hi")["input_ids"][0] == tk.bos_token_id
    chat = [{"role": "user", "content": "What does len() return?"}]
    text = tk.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text == "<|bos|><|user|>\nWhat does len() return?\n<|assistant|>\n", repr(text)
    enc = tk.apply_chat_template(chat, tokenize=True, add_generation_prompt=True)
    if hasattr(enc, "keys") and "input_ids" in enc:
        enc = enc["input_ids"]
    assert enc[0] == tk.bos_token_id and enc.count(tk.bos_token_id) == 1, enc
    assert tk.convert_ids_to_tokens(enc[1]) == "<|user|>", enc
    return tk, text


def encode_stream(tk, docs) -> torch.Tensor:
    """<|bos|> doc <|eos|> <|bos|> doc <|eos|> ... as one int32 tensor."""
    out = []
    bos, eos = tk.bos_token_id, tk.eos_token_id
    for enc in tk.backend_tokenizer.encode_batch(docs, add_special_tokens=False):
        out.append(bos)
        out.extend(enc.ids)
        out.append(eos)
    return torch.tensor(out, dtype=torch.int32)


# --------------------------------------------------------------------------- model
def make_config(tk, args) -> DeepseekV2Config:
    return DeepseekV2Config(
        vocab_size=len(tk),
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        first_k_dense_replace=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=None,
        kv_lora_rank=128,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=1,
        moe_intermediate_size=256,
        topk_method="greedy",
        n_group=None,
        topk_group=None,
        norm_topk_prob=False,
        routed_scaling_factor=1.0,
        max_position_embeddings=1024,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        hidden_act="silu",
        rms_norm_eps=1e-6,
        initializer_range=0.02,
        attention_bias=False,
        tie_word_embeddings=False,
        bos_token_id=tk.bos_token_id,
        eos_token_id=tk.eos_token_id,
        pad_token_id=tk.pad_token_id,
        use_cache=True,
    )


def lr_at(step: int, total: int, warmup: int, peak: float, floor: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * min(1.0, p)))


def lm_loss(model, x, y):
    logits = model(input_ids=x, use_cache=False).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1).long())


@torch.no_grad()
def evaluate(model, stream: torch.Tensor, seq_len: int, batch: int = 8):
    """Mean next-token cross-entropy over the whole stream (non-overlapping windows)."""
    model.eval()
    n = stream.numel() - 1
    starts = list(range(0, n, seq_len))
    tot, cnt = 0.0, 0
    for i in range(0, len(starts), batch):
        group = starts[i:i + batch]
        full = [s for s in group if s + seq_len <= n]
        rest = [s for s in group if s + seq_len > n]
        if full:
            x = torch.stack([stream[s:s + seq_len] for s in full]).long()
            y = torch.stack([stream[s + 1:s + seq_len + 1] for s in full]).long()
            logits = model(input_ids=x, use_cache=False).logits.float()
            tot += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum").item()
            cnt += y.numel()
        for s in rest:
            x = stream[s:n].long()[None]
            y = stream[s + 1:n + 1].long()[None]
            logits = model(input_ids=x, use_cache=False).logits.float()
            tot += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum").item()
            cnt += y.numel()
    return tot / cnt, cnt


def set_seed(seed: int):
    random.seed(seed)
    torch.manual_seed(seed)


def fmt_int(n: int) -> str:
    return f"{n:,}"


# --------------------------------------------------------------------------- main
def main():
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # read when tokenizers first runs, not at its import
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=HERE, help="output folder (default: this script's folder)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (default 550, or from --minutes)")
    ap.add_argument("--minutes", type=float, default=None,
                    help="pick --steps so that training takes about this long (timing probe)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=16, help="sequences per step")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--warmup", type=float, default=0.04, help="warmup steps as a fraction of --steps")
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--heldout-percent", type=float, default=2.0)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--eval-every", type=int, default=50,
                    help="log the held-out loss every N steps (0: only at the end); not counted in train wall time")
    ap.add_argument("--save-dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                    help="auto: bfloat16 when float32 weights would exceed 20 MB")
    args = ap.parse_args()

    t_start = time.time()
    torch.set_num_threads(args.threads)
    set_seed(args.seed)
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = lambda *a: print(*a, flush=True)  # noqa: E731
    log(f"python {platform.python_version()} torch {torch.__version__} transformers {transformers.__version__} "
        f"tokenizers {tokenizers.__version__} threads {torch.get_num_threads()}")

    # ---- corpus
    train_docs, heldout_docs, cstats = build_corpus(args.heldout_percent)
    log(f"corpus: {cstats['files']} files, {cstats['raw_docstrings']} docstrings -> "
        f"{len(train_docs)} train / {len(heldout_docs)} held-out documents, "
        f"{sum(map(len, train_docs)):,} / {sum(map(len, heldout_docs)):,} characters")

    # ---- tokenizer
    tk = train_tokenizer(train_docs, args.vocab, out)
    tk, chat_example = check_tokenizer(out, train_docs[0])
    train_stream = encode_stream(tk, train_docs)
    heldout_stream = encode_stream(tk, heldout_docs)
    log(f"tokenizer: vocab {len(tk)}; train tokens {train_stream.numel():,}, held-out tokens {heldout_stream.numel():,} "
        f"({sum(map(len, train_docs)) / train_stream.numel():.2f} chars/token)")

    # ---- model
    config = make_config(tk, args)
    set_seed(args.seed)
    model = DeepseekV2ForCausalLM(config).float()
    n_params = sum(p.numel() for p in model.parameters())
    n_embed = model.model.embed_tokens.weight.numel() + model.lm_head.weight.numel()
    expert_params = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    per_expert = expert_params // (config.n_routed_experts * (config.num_hidden_layers - config.first_k_dense_replace))
    n_active = n_params - expert_params + per_expert * config.num_experts_per_tok * (
        config.num_hidden_layers - config.first_k_dense_replace)
    log(f"model: {n_params:,} parameters ({n_embed:,} in embeddings + lm_head, ~{n_active:,} active per token)")
    save_dtype = args.save_dtype
    if save_dtype == "auto":
        save_dtype = "float32" if n_params * 4 <= 20 * 1000 * 1000 else "bfloat16"

    S, B = args.seq_len, args.batch
    n_chunks = (train_stream.numel() - 1) // S

    # ---- step count
    steps = args.steps
    probe = None
    if steps is None and args.minutes is not None:
        m2 = copy.deepcopy(model).train()
        x = train_stream[: B * S].view(B, S).long()
        y = train_stream[1: B * S + 1].view(B, S).long()
        times = []
        for i in range(4):
            t0 = time.time()
            lm_loss(m2, x, y).backward()
            times.append(time.time() - t0)
        del m2
        per_step = sum(times[1:]) / 3 * 1.03  # + optimizer / bookkeeping
        steps = max(10, int(args.minutes * 60 / per_step))
        probe = per_step
        log(f"timing probe: {per_step:.3f} s/step -> {steps} steps for {args.minutes} min")
        set_seed(args.seed)
    if steps is None:
        steps = 550
    warmup = max(1, int(args.warmup * steps))

    # ---- training
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (decay if p.dim() >= 2 and "embed_tokens" not in n else no_decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    gen = torch.Generator().manual_seed(args.seed)
    perm = torch.randperm(n_chunks, generator=gen)
    pos = 0
    epoch = 0
    model.train()
    t_train = time.time()
    ema = None
    recent = []
    curve = []
    eval_time = 0.0
    log(f"training: {steps} steps x {B} x {S} tokens, lr {args.lr} warmup {warmup}, "
        f"{n_chunks} chunks/epoch, save dtype {save_dtype}")
    for step in range(steps):
        if args.eval_every and step > 0 and step % args.eval_every == 0:
            t0 = time.time()
            hl, _ = evaluate(model, heldout_stream, S)
            model.train()
            curve.append({"step": step, "heldout_loss": round(hl, 4), "train_loss_ema": round(ema, 4)})
            eval_time += time.time() - t0
            log(f"eval step {step}: held-out loss {hl:.4f} (ppl {math.exp(hl):.1f}), train ema {ema:.4f}")
        if pos + B > n_chunks:
            perm = torch.randperm(n_chunks, generator=gen)
            pos = 0
            epoch += 1
        idx = perm[pos:pos + B]
        pos += B
        starts = idx * S
        x = torch.stack([train_stream[s:s + S] for s in starts.tolist()]).long()
        y = torch.stack([train_stream[s + 1:s + S + 1] for s in starts.tolist()]).long()
        lr = lr_at(step, steps, warmup, args.lr, args.lr * args.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr
        loss = lm_loss(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        lv = loss.item()
        ema = lv if ema is None else 0.95 * ema + 0.05 * lv
        recent.append(lv)
        recent = recent[-50:]
        if step % args.log_every == 0 or step == steps - 1:
            el = time.time() - t_train - eval_time
            tps = (step + 1) * B * S / el
            log(f"step {step + 1:5d}/{steps} loss {lv:.4f} ema {ema:.4f} lr {lr:.2e} gnorm {gnorm:.2f} "
                f"epoch {epoch} {tps:,.0f} tok/s elapsed {el / 60:.1f} min eta {(steps - step - 1) * el / (step + 1) / 60:.1f} min")
    train_wall = time.time() - t_train - eval_time
    train_loss_last = sum(recent) / len(recent)
    tokens_seen = steps * B * S

    # ---- save
    model.eval()
    model.generation_config.bos_token_id = tk.bos_token_id
    model.generation_config.eos_token_id = tk.eos_token_id
    model.generation_config.pad_token_id = tk.pad_token_id
    model.generation_config.do_sample = False
    to_save = model.to(torch.bfloat16) if save_dtype == "bfloat16" else model
    to_save.save_pretrained(str(out), safe_serialization=True)
    del model, to_save, opt
    cfg = json.loads((out / "config.json").read_text())
    assert cfg.get("architectures") == ["DeepseekV2ForCausalLM"], cfg.get("architectures")
    for stale in ("model.safetensors.index.json", "special_tokens_map.json", "chat_template.jinja"):
        pass  # kept if transformers writes them; listed in TRAINING.md
    weight_bytes = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    assert weight_bytes <= 20 * 1000 * 1000, f"checkpoint too large: {weight_bytes} bytes"

    # ---- evaluate the saved model (after the dtype round trip), in float32
    saved = DeepseekV2ForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    saved.eval()
    t0 = time.time()
    heldout_loss, heldout_tokens = evaluate(saved, heldout_stream, S)
    # training loss of the saved model on a fixed slice of training data (same windows as the last steps)
    probe_starts = perm[max(0, pos - 4 * B):pos] * S
    xs = torch.stack([train_stream[s:s + S] for s in probe_starts.tolist()]).long()
    with torch.no_grad():
        ys = torch.stack([train_stream[s + 1:s + S + 1] for s in probe_starts.tolist()]).long()
        saved_train_loss = lm_loss(saved, xs, ys).item()
    log(f"held-out: loss {heldout_loss:.4f} ppl {math.exp(heldout_loss):.2f} over {heldout_tokens:,} tokens "
        f"({time.time() - t0:.0f} s); train loss (mean of last {len(recent)} steps) {train_loss_last:.4f}; "
        f"saved model on last batches {saved_train_loss:.4f}")

    # ---- samples
    samples = {}
    for prompt in SAMPLE_PROMPTS:
        enc = tk(prompt, return_tensors="pt")
        with torch.no_grad():
            gen_ids = saved.generate(**enc, max_new_tokens=40, do_sample=False,
                                     pad_token_id=tk.pad_token_id)
        cont = tk.decode(gen_ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=False)
        samples[prompt] = cont
        log(f"--- sample (greedy, 40 new tokens) ---\n{prompt}{cont}\n---")

    total_wall = time.time() - t_start

    # ---- reports
    if out == HERE:
        rel_out = "models/default"
    elif out.is_relative_to(HERE.parent.parent):
        rel_out = out.relative_to(HERE.parent.parent).as_posix()
    else:
        rel_out = str(out)
    cmd_parts = ["python", "models/default/train.py", "--steps", str(steps), "--threads", str(args.threads),
                 "--seed", str(args.seed), "--batch", str(B), "--seq-len", str(S), "--lr", str(args.lr)]
    if out != HERE:
        cmd_parts += ["--out", rel_out]
    command = " ".join(shlex.quote(p) for p in cmd_parts)
    info = {
        "seed": args.seed,
        "steps": steps,
        "batch_size": B,
        "seq_len": S,
        "tokens_seen": tokens_seen,
        "epochs": round(tokens_seen / train_stream.numel(), 3),
        "lr_peak": args.lr,
        "lr_min": args.lr * args.min_lr_ratio,
        "warmup_steps": warmup,
        "weight_decay": args.weight_decay,
        "grad_clip": 1.0,
        "optimizer": "AdamW(betas=(0.9, 0.95), eps=1e-8)",
        "threads": args.threads,
        "train_loss": round(train_loss_last, 4),
        "train_loss_definition": f"mean training cross-entropy over the last {len(recent)} steps (float32 weights)",
        "train_loss_saved_model": round(saved_train_loss, 4),
        "heldout_loss": round(heldout_loss, 4),
        "heldout_ppl": round(math.exp(heldout_loss), 3),
        "heldout_tokens": heldout_tokens,
        "heldout_documents": len(heldout_docs),
        "train_documents": len(train_docs),
        "train_characters": sum(map(len, train_docs)),
        "heldout_characters": sum(map(len, heldout_docs)),
        "train_tokens": int(train_stream.numel()),
        "heldout_stream_tokens": int(heldout_stream.numel()),
        "corpus_files": cstats["files"],
        "corpus_raw_docstrings": cstats["raw_docstrings"],
        "corpus_source": f"docstrings (ast.get_docstring) of the Python {platform.python_version()} standard library",
        "heldout_rule": f"whole files, ordered by sha256 of the path relative to the stdlib folder, taken until they hold {args.heldout_percent:g}% of the characters",
        "heldout_files": cstats["heldout_files"],
        "vocab_size": len(tk),
        "parameters": n_params,
        "parameters_embeddings_and_lm_head": n_embed,
        "parameters_active_per_token": n_active,
        "saved_dtype": save_dtype,
        "checkpoint_bytes": weight_bytes,
        "train_wall_seconds": round(train_wall, 1),
        "total_wall_seconds": round(total_wall, 1),
        "tokens_per_second": round(tokens_seen / train_wall, 1),
        "timing_probe_seconds_per_step": probe,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "command": command,
        "samples_greedy_40_tokens": samples,
        "heldout_curve_float32_during_training": curve,
        "eval_seconds_during_training": round(eval_time, 1),
    }
    (out / "training.json").write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n")

    c = config
    md = f"""# Default model: tiny DeepSeek-V2 (MLA + MoE) trained on Python docstrings

This folder holds the default checkpoint of mla-engine: a `DeepseekV2ForCausalLM`
(transformers {transformers.__version__}) trained from scratch on the CPU by
[`train.py`](train.py) in {train_wall / 60:.1f} minutes ({args.threads} thread).
It is a toy: it writes English of the Python-documentation kind, not correct answers.

## Data

- Source: docstrings of the Python {platform.python_version()} standard library (`sysconfig.get_paths()["stdlib"]`),
  module, class and function docstrings taken with `ast.get_docstring`; test directories, `site-packages`,
  `idlelib/idle_test`, `lib2to3/tests` etc. skipped; files sorted for determinism.
- Cleaning: dedented, trailing spaces removed, runs of blank lines collapsed; dropped when shorter than 40 characters,
  more than half doctest lines, fewer than 6 words, or less than 60 % ASCII letters; exact duplicates kept once.
- Files parsed: {cstats['files']:,}; docstrings found: {cstats['raw_docstrings']:,}.
- Held-out set: whole files, ordered by `sha256(path relative to the stdlib folder)` and taken in that order until they
  hold {args.heldout_percent:g} % of the corpus characters ({len(cstats['heldout_files'])} files: {', '.join('`' + f + '`' for f in cstats['heldout_files'])}).

| split | documents | characters | tokens |
|---|---:|---:|---:|
| train | {fmt_int(len(train_docs))} | {fmt_int(sum(map(len, train_docs)))} | {fmt_int(train_stream.numel())} |
| held-out | {fmt_int(len(heldout_docs))} | {fmt_int(sum(map(len, heldout_docs)))} | {fmt_int(heldout_stream.numel())} |

Token counts include one `<|bos|>` before and one `<|eos|>` after every document (`<|bos|> doc <|eos|> <|bos|> doc <|eos|> ...`).

## Tokenizer

Byte-level BPE (`tokenizers` {tokenizers.__version__}), vocabulary {len(tk)} including the special tokens
{', '.join('`' + s + '`' for s in SPECIAL_TOKENS)} (ids {', '.join(str(tk.convert_tokens_to_ids(s)) for s in SPECIAL_TOKENS)}),
trained on the training split only. Byte-level pre-tokenizer and decoder, so any text round-trips.
Saved as a `PreTrainedTokenizerFast` (`tokenizer.json`, `tokenizer_config.json`); plain encoding prepends `<|bos|>`.
Chat template (`add_generation_prompt` supported), e.g.:

```
{chat_example}```

## Model

`DeepseekV2ForCausalLM`, {n_params:,} parameters ({n_embed:,} in embeddings + untied lm_head; about {n_active:,} active per token),
saved as a single `model.safetensors` in {save_dtype} ({weight_bytes / 1e6:.1f} MB).

| field | value |
|---|---|
| vocab_size | {c.vocab_size} |
| hidden_size | {c.hidden_size} |
| num_hidden_layers | {c.num_hidden_layers} (first_k_dense_replace {c.first_k_dense_replace}: layer 0 dense MLP, intermediate_size {c.intermediate_size}) |
| attention | MLA: {c.num_attention_heads} heads (num_key_value_heads {c.num_key_value_heads}), q_lora_rank {c.q_lora_rank}, kv_lora_rank {c.kv_lora_rank}, qk_nope_head_dim {c.qk_nope_head_dim}, qk_rope_head_dim {c.qk_rope_head_dim}, v_head_dim {c.v_head_dim} |
| MoE (layers {c.first_k_dense_replace}..{c.num_hidden_layers - 1}) | {c.n_routed_experts} routed experts, top-{c.num_experts_per_tok} ({c.topk_method}, softmax scores, norm_topk_prob {c.norm_topk_prob}, routed_scaling_factor {c.routed_scaling_factor}), {c.n_shared_experts} shared expert, moe_intermediate_size {c.moe_intermediate_size} |
| RoPE | plain, theta {c.rope_parameters['rope_theta']}, no scaling; max_position_embeddings {c.max_position_embeddings} |
| norm / act | RMSNorm eps {c.rms_norm_eps}, SiLU (SwiGLU MLPs) |
| tie_word_embeddings | {c.tie_word_embeddings} |
| bos / eos / pad ids | {c.bos_token_id} / {c.eos_token_id} / {c.pad_token_id} |

## Training

- Plain PyTorch, float32, {args.threads} CPU thread, seed {args.seed}.
- AdamW (betas 0.9/0.95, weight decay {args.weight_decay} on matrices), peak lr {args.lr}, {warmup} warmup steps then cosine decay to {args.lr * args.min_lr_ratio:g}, gradient clipping 1.0.
- {steps} steps x batch {B} x sequence length {S} = {tokens_seen:,} tokens seen ({tokens_seen / train_stream.numel():.2f} epochs of the training stream; windows are non-overlapping chunks of the stream in a seeded random order).
- The MoE router is trained without an auxiliary balance loss (transformers' DeepSeek-V2 has none in training mode).
- Training wall time {train_wall / 60:.1f} min ({tokens_seen / train_wall:,.0f} tokens/s); whole script {total_wall / 60:.1f} min.
- python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, tokenizers {tokenizers.__version__}.

## Results

| metric | value |
|---|---:|
| final training loss (mean of last {len(recent)} steps) | {train_loss_last:.4f} |
| held-out loss (saved {save_dtype} weights evaluated in float32, {heldout_tokens:,} predicted tokens) | {heldout_loss:.4f} |
| held-out perplexity = exp(loss) | {math.exp(heldout_loss):.2f} |

Held-out loss during training (float32 weights, before saving):

| step | held-out loss | train loss (EMA) |
|---:|---:|---:|
""" + "".join(f"| {r['step']} | {r['heldout_loss']:.4f} | {r['train_loss_ema']:.4f} |\n" for r in curve) + f"""| {steps} (saved, {save_dtype}) | {heldout_loss:.4f} | {train_loss_last:.4f} (mean of last {len(recent)} steps) |

Why {steps} steps: the corpus is small ({train_stream.numel():,} tokens), so the run is limited by data, not by time.
A 1100-step run (35 min, about 9.7 epochs) reached its best held-out loss, about 4.09, near step 600-700,
then overfitted: it ended at train loss 1.77 and held-out loss 4.39 (perplexity 80).

Greedy continuations (40 new tokens, saved weights):

"""
    for p, cont in samples.items():
        md += f"```\n{p}{cont}\n```\n\n"
    md += f"""## Reproduce

From the repository root (CPU only; results are deterministic for a given torch/transformers/Python version):

```
{command}
```

Files written: `config.json`, `generation_config.json`, `model.safetensors`, `tokenizer.json`, `tokenizer_config.json`,
`TRAINING.md`, `training.json`.
"""
    (out / "TRAINING.md").write_text(md)
    log(f"wrote {out}: " + ", ".join(f"{f.name} ({f.stat().st_size:,} B)" for f in sorted(out.iterdir()) if f.is_file()))
    log(f"done in {total_wall / 60:.1f} min")


if __name__ == "__main__":
    main()
