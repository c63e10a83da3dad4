"""mla bench / tune / perplexity: parsing, bad input, and a small end-to-end run of each."""
import json
import math

import pytest

import cli


def main(capsys, *argv):
    try:
        code = cli.main(list(argv))
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr()


def expect_error(capsys, argv, *needles):
    code, out = main(capsys, *argv)
    err = [l for l in out.err.strip().splitlines() if l.strip() and not l.startswith(("Loading", "bench", "perplexity"))]
    assert code != 0 and len(err) == 1, out.err
    for n in needles:
        assert n in err[0], err[0]


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    from tests.tiny import v2_qlora
    _, cfg = v2_qlora()
    cfg = dict(cfg, architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2")
    path = tmp_path_factory.mktemp("cfg") / "tiny.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def test_bench_json_with_transformers_baseline(capsys, tiny_config):
    code, out = main(capsys, "bench", "--config", tiny_config, "--layers", "2", "-p", "16,9", "-n", "3", "-d", "0,5",
                     "-b", "1,2", "-r", "2", "--baseline", "transformers", "--output", "json")
    assert code == 0, out.err
    rows = json.loads(out.out)
    assert [r["test"] for r in rows] == ["pp16", "pp16 @ d5", "pp9", "pp9 @ d5", "tg3", "tg3 x2", "tg3 @ d5",
                                         "tg3 @ d5 x2"]
    for r in rows:
        assert r["tps"] > 0 and r["tps_std"] >= 0
        if r["test"].endswith("x2"):
            assert math.isnan(r["baseline_tps"])  # transformers runs batch 1 only
        else:
            assert r["baseline_tps"] > 0 and r["ratio"] == pytest.approx(r["tps"] / r["baseline_tps"])


def test_bench_markdown_and_csv(capsys, tiny_config):
    code, out = main(capsys, "bench", "--config", tiny_config, "-p", "8", "-n", "2", "-r", "1")
    assert code == 0
    lines = out.out.strip().splitlines()
    assert lines[0].startswith("| model | params | device") and len(lines) == 4
    code, out = main(capsys, "bench", "--config", tiny_config, "-p", "8", "-n", "0", "-r", "1", "--output", "csv")
    assert out.out.splitlines()[0].startswith("model,params,device")


@pytest.mark.parametrize("prefill_gemm", ["dequantize", "int8"])
def test_bench_names_the_prompt_gemm_that_runs(capsys, tiny_config, prefill_gemm):
    """The weights column says "(int8 GEMM)" when the backend multiplies prompts int8 x int8, and only then."""
    from kernels import cpu
    code, out = main(capsys, "bench", "--config", tiny_config, "--layers", "2", "-p", "20", "-n", "0", "-r", "1",
                     "--dtype", "float32", "--weight-dtype", "int4", "--prefill-gemm", prefill_gemm, "--output", "json")
    assert code == 0, out.err
    int8_runs = prefill_gemm == "int8" and cpu.ext() is not None
    assert json.loads(out.out)[0]["weights"] == "int4" + (" (int8 GEMM)" if int8_runs else "")


def test_tune_reports_and_saves_the_crossover(capsys, tiny_config, checkpoints, tmp_path, monkeypatch):
    import engine.llm
    import engine.tune
    monkeypatch.setattr(engine.tune, "TUNED_FILE", str(tmp_path / "tuned.json"))
    code, out = main(capsys, "tune", "--config", tiny_config, "-q", "1,4,32", "-d", "0,20", "-r", "1")
    assert code == 0, out.err
    assert out.out.count("\n| ") >= 6 and "crossover: expanded from" in out.out
    saved = json.loads((tmp_path / "tuned.json").read_text())["cpu"]
    assert f"expanded from {saved} query tokens" in out.out
    llm = engine.llm.LLM(checkpoints["v2_qlora"], device="cpu", progress=False, kv_cache_memory_gib=0.01)
    assert llm.runner.mla_threshold == saved  # auto picks the measured value up
    assert engine.llm.LLM(checkpoints["v2_qlora"], device="cpu", progress=False, kv_cache_memory_gib=0.01,
                          mla_threshold=7).runner.mla_threshold == 7


@pytest.mark.parametrize("argv,needle", [
    (["bench", "-p", "abc"], "-p"),
    (["bench", "-p", "-5"], "-p"),
    (["bench", "-b", "0"], "--batch"),
    (["bench", "--output", "xml"], "--output"),
    (["bench", "--baseline", "llama"], "--baseline"),
])
def test_bench_bad_flags(capsys, argv, needle):
    expect_error(capsys, argv, needle)


def test_bench_config_that_is_not_deepseek(capsys, tmp_path):
    p = tmp_path / "llama.json"
    p.write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 8}))
    expect_error(capsys, ["bench", "--config", str(p)], "llama.json", "unsupported architecture")
    p.write_text("not json")
    expect_error(capsys, ["bench", "--config", str(p)], "llama.json", "not valid JSON")
    expect_error(capsys, ["bench", "--config", str(tmp_path / "none.json")], "none.json")


def test_bench_model_too_large_for_memory(capsys, tmp_path):
    from tests.tiny import v2_qlora
    _, cfg = v2_qlora()
    cfg.update(architectures=["DeepseekV2ForCausalLM"], vocab_size=4_000_000, hidden_size=4096)  # ~130 GB of embeddings
    p = tmp_path / "huge.json"
    p.write_text(json.dumps(cfg))
    expect_error(capsys, ["bench", "--config", str(p)], "huge.json: needs", "GiB available", "--layers")


def test_perplexity_runs_and_rejects_bad_input(capsys, checkpoints, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("the function returns a list of values and the name of the file is a string. " * 40)
    code, out = main(capsys, "perplexity", "--model", checkpoints["v2_qlora"], "--file", str(text), "--ctx", "32")
    assert code == 0, out.err
    assert out.out.startswith("PPL = ") and "+/-" in out.out
    ppl = float(out.out.split()[2])
    assert 1 < ppl < 128 * 4  # random model, vocabulary 128: near-uniform
    empty = tmp_path / "e.txt"
    empty.write_text("  \n")
    expect_error(capsys, ["perplexity", "--model", checkpoints["v2_qlora"], "--file", str(empty)], "empty")
    expect_error(capsys, ["perplexity", "--model", checkpoints["v2_qlora"], "--file", str(tmp_path / "no.txt")], "no.txt")
    expect_error(capsys, ["perplexity", "--model", checkpoints["v2_qlora"], "--file", str(text), "--ctx", "4096"],
                 "--ctx", "context")
    short = tmp_path / "s.txt"
    short.write_text("the value")
    expect_error(capsys, ["perplexity", "--model", checkpoints["v2_qlora"], "--file", str(short), "--ctx", "64"],
                 "fewer than")


def test_perplexity_matches_transformers(checkpoints, hf_models):
    """The engine's PPL equals the one computed from transformers' logits on the same chunks."""
    import torch
    from engine import LLM
    from tools.perplexity import perplexity
    llm = LLM(checkpoints["v3"], device="cpu", dtype="float32", progress=False, kv_cache_memory_gib=0.05)
    ids = torch.randint(3, 120, (100,), generator=torch.Generator().manual_seed(0)).tolist()
    r = perplexity(llm, ids, ctx=24, progress=False)
    nll = []
    for c in range(4):
        chunk = ids[c * 24:(c + 1) * 24]
        with torch.no_grad():
            lp = torch.log_softmax(hf_models["v3"](torch.tensor([chunk])).logits[0].float(), -1)
        nll += [-lp[i - 1, chunk[i]].item() for i in range(12, 24)]
    assert r["tokens"] == len(nll) == 48
    assert r["ppl"] == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-4)


def test_bench_serve_continuous_batching(capsys, checkpoints):
    code, out = main(capsys, "bench", "--model", checkpoints["v2_qlora"], "--serve", "7", "--prompt-lens", "3,40",
                     "--gen-lens", "2,9", "--output", "json", "--kv-cache-gib", "0.0001")  # room for 3 requests at a time
    assert code == 0, out.err
    r = json.loads(out.out)
    assert r["requests"] == 7 and 7 * 2 <= r["output_tokens"] <= 7 * 9
    assert 0 < r["ttft_p50_s"] <= r["ttft_p99_s"] <= r["e2e_p99_s"] <= r["wall_s"]
    expect_error(capsys, ["bench", "--model", checkpoints["v2_qlora"], "--serve", "2", "--gen-lens", "9,2"],
                 "--gen-lens")


def test_bench_serve_chats_resend_their_history_and_hit_the_prefix_cache(capsys, checkpoints):
    """--turns 3: each turn's prompt is the last one's, a reply and a new message; with prefix caching the last
    prompt's full blocks are found (its last partial block and the reply are not: the reply in the history is not
    the one the model generated), without it nothing is."""
    from models.config import ModelConfig
    from tools.bench_serve import make_chats
    flags = ["bench", "--model", checkpoints["v2_qlora"], "--serve", "3", "--turns", "3", "--prompt-lens", "70,100",
             "--user-lens", "3,9", "--gen-lens", "2,5", "--concurrency", "2", "--output", "json"]
    runs = []
    for extra in ([], ["--no-prefix-caching"]):
        code, out = main(capsys, *flags, *extra)
        assert code == 0, out.err
        runs.append(json.loads(out.out))
    on, off = runs
    chats = make_chats(3, 3, (70, 100), (3, 9), (2, 5), ModelConfig.from_hf(checkpoints["v2_qlora"]).vocab_size)
    assert [len(c) for c in chats] == [3, 3, 3]
    for c in chats:  # each turn extends the last one's prompt by a reply of the asked length and a message
        for a, b in zip(c, c[1:]):
            assert b.prompt_token_ids[:len(a.prompt_token_ids)] == a.prompt_token_ids
            assert 3 + a.max_tokens <= len(b.prompt_token_ids) - len(a.prompt_token_ids) <= 9 + a.max_tokens
    block = 64
    found = sum(len(a.prompt_token_ids) // block * block for c in chats for a in c[:-1])
    assert on["requests"] == off["requests"] == 9 and on["failed"] == off["failed"] == 0
    assert on["prompt_tokens"] == off["prompt_tokens"] == sum(len(r.prompt_token_ids) for c in chats for r in c)
    assert off["cached_tokens"] == 0 and found <= on["cached_tokens"] <= found + 6 * block
    assert on["preemptions"] == off["preemptions"] == 0


def test_bench_compares_modes_and_cache_formats_in_one_run(capsys, tiny_config):
    code, out = main(capsys, "bench", "--config", tiny_config, "-p", "12", "-n", "2", "-r", "1",
                     "--attn-mode", "absorbed,expanded", "--kv-cache-dtype", "auto,int8", "--baseline", "transformers",
                     "--dtype", "float32", "--output", "json")
    assert code == 0, out.err
    rows = json.loads(out.out)
    assert [(r["mode"], r["cache"], r["test"]) for r in rows] == [
        (m, c, t) for m in ("absorbed", "expanded") for c in ("float32", "int8") for t in ("pp12", "tg2")]
    pp = [r for r in rows if r["test"] == "pp12"]
    assert len({r["baseline_tps"] for r in pp}) == 1  # transformers measured once per test, shared by every row
    assert all(r["ratio"] == pytest.approx(r["tps"] / r["baseline_tps"]) for r in rows)
    expect_error(capsys, ["bench", "--attn-mode", "absorbed,sideways"], "--attn-mode", "sideways")
    expect_error(capsys, ["bench", "--kv-cache-dtype", "int3"], "--kv-cache-dtype", "int3")


@pytest.mark.parametrize("name", ["deepseek-v2-lite.json"])
def test_roofline_counts_agree_with_the_model(name):
    """bench's weight counts add up to the model's own tensors; V2-Lite activates 2.4 B parameters per token
    (DeepSeek's figure: the input embedding table is not counted, a lookup); a decode step at batch 1 reads the
    active weights once."""
    import os

    import torch

    from tools import roofline
    from models.config import ModelConfig
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "configs", name)) as f:
        cfg = ModelConfig.from_dict(json.load(f), name)
    V, D, L, E, k = cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers, cfg.n_routed_experts, cfg.num_experts_per_tok
    layers = [roofline.layer_params(cfg, i) for i in range(L)]
    norms = L * (2 * D + cfg.kv_lora_rank + (cfg.q_lora_rank or 0)) + D
    assert sum(d + E * e + o for d, e, o in layers) + 2 * V * D + norms == roofline.param_count(cfg)
    active = sum(d + k * e + o for d, e, o in layers) + 2 * V * D
    assert active - V * D == pytest.approx(2.4e9, rel=0.05)
    attention = 2 * L * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim)  # one key seen by one query
    assert roofline.prompt_flops(cfg, 1, 0) == pytest.approx(2 * (active - V * D) + attention)
    assert roofline.decode_bytes(cfg, 1, 0, torch.bfloat16, None, 0) == pytest.approx(2 * (active - V * D))
    every_expert = roofline.decode_bytes(cfg, 10**6, 100, torch.bfloat16, None, 1000)
    assert every_expert == pytest.approx(2 * (roofline.param_count(cfg) - V * D - norms) + 10**6 * 100 * 1000)
    int4 = roofline.decode_bytes(cfg, 1, 0, torch.bfloat16, "int4", 0)
    kv_b_router = sum(o for _, _, o in layers)
    assert int4 == pytest.approx((0.5 + 4 / 128) * (active - V * D - kv_b_router) + 2 * kv_b_router)  # + the scales


def test_bench_roofline_column(capsys, tiny_config):
    code, out = main(capsys, "bench", "--config", tiny_config, "-p", "8", "-n", "2", "-r", "1", "--roofline",
                     "--output", "json")
    assert code == 0, out.err
    rows = json.loads(out.out)
    assert "roofline:" in out.err and all(r["roofline"] > 0 for r in rows)
