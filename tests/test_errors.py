"""Bad input: one line on stderr naming the culprit, a non-zero exit, no traceback."""
import json
import os
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(capsys, *argv):
    try:
        code = cli.main(["generate", *argv])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    err = [l for l in err if not l.startswith("Loading") and l.strip()]
    return code, err


def expect_error(capsys, argv, *needles):
    code, err = run(capsys, *argv)
    assert code != 0
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    for n in needles:
        assert n in err[0], err[0]
    return err[0]


@pytest.fixture()
def ckpt(checkpoints, tmp_path):
    """A private copy of the sharded V2 checkpoint to damage."""
    d = tmp_path / "ckpt"
    shutil.copytree(checkpoints["v2_qlora"], d)
    return d


def shards(d):
    return sorted(p for p in os.listdir(d) if p.endswith(".safetensors"))


def test_missing_folder(capsys, tmp_path):
    expect_error(capsys, ["--model", str(tmp_path / "nope"), "-p", "x"], "nope", "no such model folder")


def test_no_weights(capsys, ckpt):
    for f in shards(ckpt) + ["model.safetensors.index.json"]:
        os.remove(ckpt / f)
    expect_error(capsys, ["--model", str(ckpt), "-p", "x"], "no weights")


def test_truncated_shard(capsys, ckpt):
    f = ckpt / shards(ckpt)[1]
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    expect_error(capsys, ["--model", str(ckpt), "-p", "x"], shards(ckpt)[1], "not a valid safetensors")


def test_garbage_shard(capsys, ckpt):
    f = ckpt / shards(ckpt)[0]
    f.write_bytes(b"this is not a safetensors file at all" * 10)
    expect_error(capsys, ["--model", str(ckpt), "-p", "x"], shards(ckpt)[0], "not a valid safetensors")


def test_shard_named_in_index_missing(capsys, ckpt):
    name = shards(ckpt)[-1]
    os.remove(ckpt / name)
    expect_error(capsys, ["--model", str(ckpt), "-p", "x"], name, "missing")


def _rewrite_shard(d, fn):
    """Apply fn to the tensors of the shard holding layer 1's kv_b_proj, keeping the index consistent."""
    index_path = d / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name = "model.layers.1.self_attn.kv_b_proj.weight"
    shard = index["weight_map"][name]
    tensors = load_file(d / shard)
    fn(tensors, name)
    save_file(tensors, d / shard, metadata={"format": "pt"})
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard}
    index["weight_map"].update({k: shard for k in tensors})
    index_path.write_text(json.dumps(index))
    return name


def test_missing_tensor(capsys, ckpt):
    name = _rewrite_shard(ckpt, lambda t, n: t.pop(n))
    expect_error(capsys, ["--model", str(ckpt), "-p", "x"], "missing tensors", name)


def test_misshapen_tensor(capsys, ckpt):
    name = _rewrite_shard(ckpt, lambda t, n: t.__setitem__(n, t[n][:-1]))
    expect_error(capsys, ["--model", str(ckpt), "-p", "x"], "misshapen", name)


def test_unexpected_tensor(capsys, ckpt):
    _rewrite_shard(ckpt, lambda t, n: t.__setitem__("model.layers.1.self_attn.surprise.weight", t[n].clone()))
    expect_error(capsys, ["--model", str(ckpt), "-p", "x"], "unexpected", "surprise")


@pytest.mark.parametrize("field,value,needle", [
    ("architectures", ["LlamaForCausalLM"], "architectures"),
    ("topk_method", "random_pick", "topk_method"),
    ("scoring_func", "relu", "scoring_func"),
    ("hidden_act", "gelu", "hidden_act"),
    ("rope_parameters", {"rope_type": "longrope", "rope_theta": 10000.0}, "longrope"),
    ("dtype", "float64", "float64"),
])
def test_unsupported_config_value(capsys, ckpt, field, value, needle):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg[field] = value
    if field == "architectures":
        cfg.pop("model_type", None)
    (ckpt / "config.json").write_text(json.dumps(cfg))
    expect_error(capsys, ["--model", str(ckpt), "-p", "x"], "config.json", needle)


def test_config_not_json(capsys, ckpt):
    (ckpt / "config.json").write_text("{ this is not json")
    expect_error(capsys, ["--model", str(ckpt), "-p", "x"], "config.json", "not valid JSON")


def test_pickle_only_checkpoint_refused(capsys, ckpt):
    for f in shards(ckpt) + ["model.safetensors.index.json"]:
        os.remove(ckpt / f)
    (ckpt / "pytorch_model.bin").write_bytes(b"\x80\x04 pretend pickle")
    line = expect_error(capsys, ["--model", str(ckpt), "-p", "x"], "pytorch_model.bin", "pickle")
    assert "run" in line and "code" in line


def test_prompt_longer_than_context(capsys, checkpoints):
    long_prompt = " ".join(["the"] * 600)  # 600 tokens > max_position_embeddings = 512
    expect_error(capsys, ["--model", checkpoints["v2_qlora"], "-p", long_prompt], "prompt has", "512")


@pytest.mark.parametrize("flags,needle", [
    (["--max-tokens", "-3"], "--max-tokens"),
    (["--temperature", "-1"], "--temperature"),
    (["--attn-mode", "sideways"], "--attn-mode"),
    (["--dtype", "int3"], "--dtype"),
    (["--mla-threshold", "0"], "--mla-threshold"),
])
def test_invalid_flags(capsys, checkpoints, flags, needle):
    expect_error(capsys, ["--model", checkpoints["v2_qlora"], "-p", "x", *flags], needle)


def test_cli_subprocess_no_traceback(tmp_path):
    """End to end through the interpreter: exit code and a single line, as a user sees it."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "cli.py"), "generate", "--model", str(tmp_path / "x"),
                        "-p", "hi"], capture_output=True, text=True)
    assert r.returncode != 0
    assert r.stderr.strip().count("\n") == 0 and "no such model folder" in r.stderr
