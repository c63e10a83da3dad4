"""The embedded default model (models/default): it loads, its held-out loss with the engine matches transformers
and the figure recorded at training time, and `mla generate` without --model uses it, deterministically."""
import importlib.util
import json
import math
import os
import platform

import pytest
import torch
import torch.nn.functional as F

import cli
from engine import LLM, SamplingParams

DEFAULT = cli.DEFAULT_MODEL


def test_checkpoint_is_small_and_deepseek_shaped():
    files = os.listdir(DEFAULT)
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "TRAINING.md",
            "training.json", "train.py"} <= set(files)
    weights = sum(os.path.getsize(os.path.join(DEFAULT, f)) for f in files if f.endswith(".safetensors"))
    assert weights <= 20 * 2**20
    from models.config import ModelConfig
    cfg = ModelConfig.from_hf(DEFAULT)
    assert cfg.arch == "deepseek_v2" and cfg.num_attention_heads >= 4
    assert cfg.kv_lora_rank >= 2 * cfg.qk_nope_head_dim and cfg.qk_rope_head_dim > 0  # latent well above a head
    assert cfg.n_routed_experts >= 4 and cfg.n_shared_experts >= 1 and cfg.first_k_dense_replace >= 1
    assert not cfg.is_moe_layer(0) and cfg.is_moe_layer(cfg.num_hidden_layers - 1)


@pytest.fixture(scope="module")
def llm():
    return LLM(DEFAULT, device="cpu", dtype="float32", progress=False, kv_cache_memory_gib=0.05)


@pytest.fixture(scope="module")
def heldout():
    """The held-out token stream, rebuilt by the training script from this Python's standard library."""
    spec = importlib.util.spec_from_file_location("train_default", os.path.join(DEFAULT, "train.py"))
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    record = json.load(open(os.path.join(DEFAULT, "training.json")))
    _, docs, _ = train.build_corpus(record.get("heldout_percent", 2.0))
    from transformers import AutoTokenizer
    stream = train.encode_stream(AutoTokenizer.from_pretrained(DEFAULT), docs)
    return stream, record


def test_heldout_loss_matches_transformers_and_the_record(llm, heldout):
    stream, record = heldout
    seq_len = record["seq_len"]
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(DEFAULT, dtype=torch.float32).eval()
    n = stream.numel() - 1
    ours_sum = ref_sum = count = 0.0
    for s in range(0, n, seq_len):
        x = stream[s:min(s + seq_len, n)].long()
        y = stream[s + 1:min(s + seq_len, n) + 1].long()
        ours = llm.prompt_logits(x.tolist())
        with torch.no_grad():
            ref = hf(x[None]).logits[0].float()
        ours_sum += F.cross_entropy(ours, y, reduction="sum").item()
        ref_sum += F.cross_entropy(ref, y, reduction="sum").item()
        count += y.numel()
    ours_loss, ref_loss = ours_sum / count, ref_sum / count
    assert abs(ours_loss - ref_loss) < 1e-4
    assert math.isfinite(ours_loss) and ours_loss < math.log(llm.model_config.vocab_size) - 2  # learned something
    if platform.python_version() == record.get("python"):  # the same stdlib gives the same held-out text
        assert count == record["heldout_tokens"]
        assert abs(ours_loss - record["heldout_loss"]) < 1e-3


def test_greedy_generation_is_deterministic(llm):
    sp = SamplingParams(max_tokens=24, temperature=0)
    a = llm.generate(["The function returns"], sp)[0]
    b = llm.generate(["The function returns"], sp)[0]
    assert a.token_ids == b.token_ids and a.text == b.text and len(a.text.split()) >= 3


def test_cli_without_model_uses_the_default(capsys):
    assert cli.main(["generate", "--prompt", "Return a list of", "-n", "12"]) == 0
    out = capsys.readouterr()
    assert len(out.out.split()) >= 3
    assert "prompt" in out.err and "TG" in out.err
