"""DeepSeek-V3's fp8 checkpoints: e4m3 weights with one float32 factor per block (`weight_scale_inv`), dequantized at
load. The engine on such a checkpoint must equal the engine on the same weights dequantized by hand."""
import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine import LLM
from models.errors import ModelError
from tests import tiny

BLOCK = (16, 24)  # not dividing the tiny model's 64 / 96 / 32 / 40 widths: ragged edge blocks
QUANTIZED = re.compile(r"\.(q_a_proj|q_b_proj|q_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj|gate_proj|up_proj|down_proj)"
                       r"\.weight$")


def to_fp8(w):
    """Block-wise e4m3 with the block's max at 448, as DeepSeek-V3 stores its weights."""
    N, K = w.shape
    s = torch.empty(-(-N // BLOCK[0]), -(-K // BLOCK[1]))
    q = torch.empty(N, K, dtype=torch.float8_e4m3fn)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            blk = w[i * BLOCK[0]:(i + 1) * BLOCK[0], j * BLOCK[1]:(j + 1) * BLOCK[1]]
            s[i, j] = blk.abs().max().clamp(min=1e-12) / 448
            q[i * BLOCK[0]:(i + 1) * BLOCK[0], j * BLOCK[1]:(j + 1) * BLOCK[1]] = (blk / s[i, j]).to(torch.float8_e4m3fn)
    deq = q.float() * s.repeat_interleave(BLOCK[0], 0)[:N].repeat_interleave(BLOCK[1], 1)[:, :K]
    return q, s, deq


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(fp8 checkpoint, the same weights dequantized in float32), from one tiny V3 checkpoint."""
    src = str(tmp_path_factory.mktemp("v3_src"))
    tiny.make_checkpoint(src, tiny.v3_noaux(), shard_size=None, tokenizer=False)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    fp8, deq = {}, dict(tensors)
    for name, w in tensors.items():
        if QUANTIZED.search(name):
            fp8[name], fp8[name + "_scale_inv"], deq[name] = to_fp8(w)
        else:
            fp8[name] = w
    assert sum(t.dtype == torch.float8_e4m3fn for t in fp8.values()) > 20
    out = {}
    for kind, weights in (("fp8", fp8), ("deq", deq)):
        d = str(tmp_path_factory.mktemp(kind))
        cfg = dict(config, quantization_config={"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                                "weight_block_size": list(BLOCK)}) if kind == "fp8" else config
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(cfg, f)
        # two shards, the scales in the second: a weight and its scale need not share a file
        names = sorted(weights)
        first = [n for n in names if not n.endswith("_scale_inv")][: len(names) // 2]
        shards = {"model-00001-of-00002.safetensors": first,
                  "model-00002-of-00002.safetensors": [n for n in names if n not in first]}
        for file, part in shards.items():
            save_file({n: weights[n].contiguous() for n in part}, os.path.join(d, file), metadata={"format": "pt"})
        with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
            json.dump({"weight_map": {n: file for file, part in shards.items() for n in part}}, f)
        out[kind] = d
    return out


def test_fp8_checkpoint_equals_its_dequantized_weights(pair):
    ids = torch.randint(3, 120, (23,), generator=torch.Generator().manual_seed(0)).tolist()
    got = LLM(pair["fp8"], device="cpu", dtype="float32", progress=False, kv_cache_memory_gib=0.01).prompt_logits(ids)
    want = LLM(pair["deq"], device="cpu", dtype="float32", progress=False, kv_cache_memory_gib=0.01).prompt_logits(ids)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_fp8_weight_without_its_scale_is_an_error(pair, tmp_path):
    d = str(tmp_path / "no_scale")
    os.makedirs(d)
    for f in os.listdir(pair["fp8"]):
        src = os.path.join(pair["fp8"], f)
        if f.endswith(".safetensors"):
            save_file({n: t for n, t in load_file(src).items() if n != "model.layers.0.self_attn.o_proj.weight_scale_inv"},
                      os.path.join(d, f))
        elif f.endswith(".json"):
            with open(src) as a, open(os.path.join(d, f), "w") as b:
                data = json.load(a)
                data.get("weight_map", {}).pop("model.layers.0.self_attn.o_proj.weight_scale_inv", None)
                json.dump(data, b)
    with pytest.raises(ModelError, match=r"fp8 tensor model\.layers\.0\.self_attn\.o_proj\.weight has no"):
        LLM(d, device="cpu", dtype="float32", progress=False, kv_cache_memory_gib=0.01)


@pytest.mark.parametrize("q,match", [({"quant_method": "awq"}, "quant_method='awq' is not supported"),
                                     ({"quant_method": "fp8", "fmt": "e5m2", "weight_block_size": [128, 128]},
                                      "fmt e4m3"),
                                     ({"quant_method": "fp8", "weight_block_size": 128}, "weight_block_size")])
def test_unsupported_quantization_config_is_refused_by_name(pair, tmp_path, q, match):
    d = str(tmp_path / "bad")
    os.makedirs(d)
    with open(os.path.join(pair["fp8"], "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(dict(cfg, quantization_config=q), f)
    with pytest.raises(ModelError, match="quantization_config") as e:
        LLM(d, device="cpu", progress=False)
    assert re.search(match, str(e.value))
