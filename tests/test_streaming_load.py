"""Streaming load into the final stored form, the memory plan, and random weights made straight into that form."""
import json
import os
import subprocess
import sys

import pytest
import torch

from engine import LLM, EngineConfig, memory
from models.errors import ModelError
from models.random_checkpoint import cut_config, write_random_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V2_LITE = os.path.join(ROOT, "bench", "configs", "deepseek-v2-lite.json")

PEAK = r"""
import json, os, sys, time
import torch
from engine.config import EngineConfig
from models.loader import load_model
def rss(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
c = EngineConfig(sys.argv[1], device="cpu", dtype="bfloat16", weight_dtype=sys.argv[2] if sys.argv[2] != "none" else None,
                 progress=False).resolve()
torch.empty(1)  # the allocator and torch's own structures settle before the baseline
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak RSS (VmHWM) starts again from the current RSS
before = rss("VmRSS:")
model = load_model(c.model, c.weight_format, c.model_config, progress=False)
print(json.dumps({"grew": rss("VmHWM:") - before, "final": model.nbytes()}))
"""


@pytest.fixture(scope="module")
def lite_cut(tmp_path_factory):
    """DeepSeek-V2-Lite's shapes cut to 2 layers and 4 experts, written as bf16 shards of 64 MiB (1.2 GB)."""
    d = str(tmp_path_factory.mktemp("lite2"))
    cut_config(V2_LITE, d, layers=2, experts=4)
    return write_random_checkpoint(d, torch.bfloat16, shard_bytes=64 << 20, progress=False)


@pytest.mark.parametrize("weight_dtype", ["int4", "int8"])
def test_peak_memory_while_loading_is_the_final_form_plus_one_tensor(lite_cut, weight_dtype):
    """The float model (1.2 GB in bf16, 2.4 GB in float32) is never held: the resident memory grows by the stored
    weights, one tensor's read buffer and its float copy (the largest: the 102400 x 2048 embedding, 0.4 GB in bf16,
    kept as it is; its float32 copy is quantized in blocks of rows), and a small constant."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-c", PEAK, lite_cut, weight_dtype], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)
    largest = 102400 * 2048 * 2
    assert 0.9 * m["final"] <= m["grew"] <= m["final"] + largest + (96 << 20), m
    files = sum(os.path.getsize(os.path.join(lite_cut, f)) for f in os.listdir(lite_cut) if f.endswith(".safetensors"))
    assert m["final"] < 0.75 * files  # the stored form is smaller than the bf16 files


def test_weight_bytes_are_what_the_loaded_model_holds(lite_cut):
    """The memory plan counts the weights on the meta device; the loaded model holds exactly that."""
    from models.loader import load_model
    c = EngineConfig(lite_cut, device="cpu", weight_dtype="int4", progress=False).resolve()
    model = load_model(c.model, c.weight_format, c.model_config, progress=False)
    assert memory.weight_bytes(c) == model.nbytes()


def test_a_model_that_does_not_fit_names_what_would(monkeypatch):
    import models.loader
    monkeypatch.setattr(models.loader, "available_memory", lambda device: 12 << 30)
    with pytest.raises(ModelError) as e:
        EngineConfig(V2_LITE, device="cpu", dtype="bfloat16", load_format="dummy").resolve()
    msg = str(e.value)
    assert "needs 30." in msg and "12.0 GiB available" in msg and "--weight-dtype int8 needs 15." in msg
    assert "--weight-dtype int4 needs 9." in msg and "\n" not in msg


def test_the_default_cpu_cache_shrinks_to_what_is_left(monkeypatch, capsys):
    import models.loader
    c = EngineConfig(V2_LITE, device="cpu", dtype="bfloat16", weight_dtype="int4", load_format="dummy")
    need = memory.weight_bytes(c.resolve(plan_memory=False)) + memory.workspace_bytes(c.resolve(plan_memory=False))
    monkeypatch.setattr(models.loader, "available_memory", lambda device: need + (1 << 30))
    r = c.resolve()
    assert 0.5 < r.kv_cache_memory_gib <= 0.9 and "KV cache 0.9" in capsys.readouterr().err


def test_dummy_weights_equal_the_written_random_checkpoint(tmp_path):
    """load_format="dummy" makes the same random weights, tensor by tensor in the stored form, that
    write_random_checkpoint puts in files: the same logits, with nothing written."""
    from tests import tiny
    d = str(tmp_path / "m")
    os.makedirs(d)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(dict(tiny.v2_qlora()[1], architectures=["DeepseekV2ForCausalLM"]), f)
    cfg = os.path.join(d, "config.json")
    dummy = LLM(EngineConfig(cfg, device="cpu", dtype="float32", load_format="dummy", progress=False,
                             kv_cache_memory_gib=0.01))
    write_random_checkpoint(d, torch.float32, progress=False)
    real = LLM(d, device="cpu", dtype="float32", progress=False, kv_cache_memory_gib=0.01)
    ids = [5, 17, 3, 99, 42]
    torch.testing.assert_close(dummy.prompt_logits(ids), real.prompt_logits(ids), atol=0, rtol=0)


def test_loading_shows_bytes_with_a_rate(checkpoints, monkeypatch, capsys):
    """A load that takes longer than PROGRESS_DELAY shows a bar in bytes with its rate (0 here: any load)."""
    import models.loader
    monkeypatch.setattr(models.loader, "PROGRESS_DELAY", 0)
    LLM(checkpoints["v2_qlora"], device="cpu", kv_cache_memory_gib=0.01)
    err = capsys.readouterr().err
    assert "Loading weights" in err and "B/s" in err and "473k" in err  # the bytes of all shards, with a rate
