"""The engine against transformers in float32: logits, logprobs, greedy tokens, both attention paths."""
import pytest
import torch

from engine import LLM, SamplingParams

NAMES = ["v2_lite", "v2_qlora", "v3"]
MODES = ["absorbed", "expanded", "auto"]


def prompt(n, seed=0, vocab=120):
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def hf_greedy(model, ids, n):
    ids = list(ids)
    for _ in range(n):
        ids.append(int(hf_logits(model, ids)[-1].argmax()))
    return ids[-n:]


@pytest.fixture(scope="module")
def engines(checkpoints):
    cache = {}

    def get(name, mode, **kw):
        key = (name, mode, tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = LLM(checkpoints[name], device="cpu", dtype="float32", attn_mode=mode, progress=False,
                             kv_cache_memory_gib=0.05, **kw)
        return cache[key]
    return get


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("mode", MODES)
def test_prompt_logits_match_transformers(engines, hf_models, name, mode):
    ids = prompt(37, seed=1)
    ours = engines(name, mode).prompt_logits(ids)
    ref = hf_logits(hf_models[name], ids)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("name", NAMES)
def test_greedy_continuation_matches_transformers(engines, hf_models, name):
    ids = prompt(21, seed=2)
    want = hf_greedy(hf_models[name], ids, 16)
    for mode in MODES:
        out = engines(name, mode).generate(prompt_token_ids=[ids], sampling_params=SamplingParams(
            max_tokens=16, temperature=0, ignore_eos=True))[0]
        assert out.token_ids == want, mode
        assert out.finish_reason == "length"


@pytest.mark.parametrize("name", NAMES)
def test_logprobs_and_prompt_logprobs_match_transformers(engines, hf_models, name):
    ids = prompt(15, seed=3)
    out = engines(name, "auto").generate(prompt_token_ids=[ids], sampling_params=SamplingParams(
        max_tokens=4, temperature=0, ignore_eos=True, logprobs=3, prompt_logprobs=2))[0]
    full = ids + out.token_ids
    ref = torch.log_softmax(hf_logits(hf_models[name], full), -1)
    # prompt_logprobs, vLLM semantics: entry 0 is None, entry i holds token i's logprob (+ the top 2)
    assert len(out.prompt_logprobs) == len(ids) and out.prompt_logprobs[0] is None
    for i in range(1, len(ids)):
        entry = out.prompt_logprobs[i]
        assert abs(entry[ids[i]] - ref[i - 1, ids[i]].item()) < 1e-4
        top = ref[i - 1].topk(2)
        for v, t in zip(top.values.tolist(), top.indices.tolist()):
            assert abs(entry[t].logprob - v) < 1e-4
    # logprobs: per generated token, its own logprob plus the top 3 (greedy: the sampled token ranks first)
    assert len(out.logprobs) == 4
    for j, (tok, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        row = ref[len(ids) - 1 + j]
        assert entry[tok].rank == 1 and abs(entry[tok] - row[tok].item()) < 1e-4
        assert len(entry) == 3
        assert set(entry) == set(row.topk(3).indices.tolist())


@pytest.mark.parametrize("name", ["v2_lite", "v3"])
def test_prefill_then_decode_equals_one_forward(engines, name):
    """Logits of the last token after prefill + decode steps equal those of one forward over everything."""
    ids = prompt(30, seed=4)
    llm = engines(name, "auto")
    out = llm.generate(prompt_token_ids=[ids], sampling_params=SamplingParams(
        max_tokens=6, temperature=0, ignore_eos=True, logprobs=0))[0]
    full = llm.prompt_logits(ids + out.token_ids)
    lp = torch.log_softmax(full, -1)
    for j, tok in enumerate(out.token_ids):
        assert abs(out.logprobs[j][tok] - lp[len(ids) - 1 + j, tok].item()) < 1e-5
        assert int(full[len(ids) - 1 + j].argmax()) == tok


@pytest.mark.parametrize("mode", MODES)
def test_batch_of_different_lengths_equals_each_alone(engines, mode):
    prompts = [prompt(n, seed=10 + n) for n in (3, 40, 17, 1, 25)]
    sp = SamplingParams(max_tokens=7, temperature=0, ignore_eos=True, logprobs=0)
    llm = engines("v2_qlora", mode)
    together = llm.generate(prompt_token_ids=prompts, sampling_params=sp)
    for p, out in zip(prompts, together):
        alone = llm.generate(prompt_token_ids=[p], sampling_params=sp)[0]
        assert out.token_ids == alone.token_ids
        for a, b in zip(out.logprobs, alone.logprobs):
            assert abs(list(a.values())[0] - list(b.values())[0]) < 1e-5


def test_chunked_prefill_and_mixed_batches_match(engines, hf_models):
    """A prompt longer than the token budget is prefilled in chunks, mixed with other sequences' decodes."""
    llm = engines("v2_lite", "auto", max_num_batched_tokens=16, mla_threshold=5)
    ids = prompt(53, seed=5)
    ours = llm.prompt_logits(ids)
    assert (ours - hf_logits(hf_models["v2_lite"], ids)).abs().max().item() < 1e-4
    prompts = [prompt(n, seed=20 + n) for n in (40, 2, 23)]
    sp = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=sp)
    for p, out in zip(prompts, outs):
        assert out.token_ids == hf_greedy(hf_models["v2_lite"], p, 5)


def test_expanded_path_bounded_chunks_match(engines, hf_models, monkeypatch):
    """Force tiny KV and query chunks so the online-softmax merge across chunks is exercised."""
    import kernels.cpu_prefill as cpu
    import kernels.reference as ref
    monkeypatch.setattr(cpu, "KV_CHUNK", 7)
    monkeypatch.setattr(ref, "KV_CHUNK", 7)
    monkeypatch.setattr(ref, "Q_CHUNK", 5)
    monkeypatch.setattr(ref, "SCORE_ELEMENTS", 16 * 9)
    ids = prompt(45, seed=6)
    want = hf_logits(hf_models["v2_lite"], ids)
    for mode in ("expanded", "absorbed"):
        assert (engines("v2_lite", mode).prompt_logits(ids) - want).abs().max().item() < 1e-4


@pytest.mark.parametrize("prefill_gemm", ["dequantize", "int8"])
@pytest.mark.parametrize("mode,max_diff,max_nll_diff", [("int8", 0.1, 0.01), ("int4", 1.5, 0.1)])
def test_weight_only_quantization_stays_close(engines, checkpoints, mode, max_diff, max_nll_diff, prefill_gemm,
                                              monkeypatch):
    """int8 / int4 weights: prompt logprobs close to the float32 model's, decode (packed CPU kernels) and prefill
    (weights dequantized into the GEMM, or int8 x int8)."""
    from kernels import cpu
    if prefill_gemm == "int8" and cpu.ext() is None:
        pytest.skip("the int8 prompt GEMM's operands are made by the C++ extension, which does not build here")
    ids = prompt(30, seed=7)
    ref = torch.log_softmax(engines("v2_lite", "auto").prompt_logits(ids), -1)
    q = LLM(checkpoints["v2_lite"], device="cpu", dtype="float32", progress=False, kv_cache_memory_gib=0.05,
            weight_dtype=mode, prefill_gemm=prefill_gemm)
    import kernels
    if cpu.ext() is not None:  # the path asked for is the one taken
        from kernels.matmul import dequantized_gemm, int8_gemm
        assert q.model.ops.quant_gemm is {"dequantize": dequantized_gemm, "int8": int8_gemm}[prefill_gemm]
    assert isinstance(q.model.lm_head, kernels.QuantWeight) and isinstance(q.model.layers[1].mlp.w13, kernels.QuantWeight) and q.model.layers[1].mlp.w13.stacked
    calls = []
    if cpu.ext() is not None:  # int8 x int8 prompts run each MoE layer's routed experts in one C++ call
        monkeypatch.setattr(cpu, "moe_prompt", lambda *a, f=cpu.moe_prompt: calls.append(1) or f(*a))
    got = torch.log_softmax(q.prompt_logits(ids), -1)
    assert len(calls) == (sum(isinstance(layer.mlp.w13, kernels.QuantWeight) and layer.mlp.w13.stacked
                              for layer in q.model.layers) if prefill_gemm == "int8" and cpu.ext() else 0)
    assert (got - ref).abs().max().item() < max_diff
    # per-token NLL of the prompt: the quantity perplexity reports
    nll = lambda lp: -lp[:-1].gather(1, torch.tensor(ids[1:])[:, None]).mean().item()
    assert abs(nll(got) - nll(ref)) < max_nll_diff
    out = q.generate(prompt_token_ids=[ids], sampling_params=SamplingParams(max_tokens=5, temperature=0, ignore_eos=True,
                                                                               logprobs=0))[0]
    full = torch.log_softmax(engines("v2_lite", "auto").prompt_logits(ids + out.token_ids), -1)
    for j, tok in enumerate(out.token_ids):  # decode steps (M = 1) through the packed kernels
        assert abs(out.logprobs[j][tok] - full[len(ids) - 1 + j, tok].item()) < max_diff


def test_tied_embeddings_match_transformers(tmp_path):
    """tie_word_embeddings: the checkpoint has no lm_head tensor and the embedding matrix serves as the head."""
    from tests.tiny import hf_model, make_checkpoint, v2_qlora
    path = str(tmp_path / "tied")
    make_checkpoint(path, v2_qlora(tie_word_embeddings=True, num_hidden_layers=2), tokenizer=False)
    import json
    import os
    from safetensors import safe_open
    index = os.path.join(path, "model.safetensors.index.json")
    names = json.load(open(index))["weight_map"] if os.path.exists(index) else safe_open(
        os.path.join(path, "model.safetensors"), "pt").keys()
    assert "lm_head.weight" not in names
    ids = prompt(19, seed=8)
    llm = LLM(path, device="cpu", dtype="float32", progress=False, kv_cache_memory_gib=0.01)
    assert llm.model.lm_head is llm.model.embed_tokens
    want = hf_logits(hf_model(path), ids)
    assert (llm.prompt_logits(ids) - want).abs().max().item() < 1e-4
    # stored in bf16 (the float32 checkpoint rounded), the embedding still serves as the head
    llm = LLM(path, device="cpu", dtype="float32", weight_dtype="bfloat16", progress=False, kv_cache_memory_gib=0.01)
    assert llm.model.lm_head is llm.model.embed_tokens and llm.model.embed_tokens.dtype == torch.bfloat16
    assert (llm.prompt_logits(ids) - want).abs().max().item() < 0.05


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
    from tests.tiny import make_checkpoint, v2_qlora
    path = str(tmp_path_factory.mktemp("v2_qlora_bf16"))
    make_checkpoint(path, v2_qlora(), dtype=torch.bfloat16)
    return path


@pytest.mark.parametrize("kernels", ["cpu", "torch"])
def test_a_bf16_checkpoint_in_float32_keeps_bf16_weights(bf16_checkpoint, kernels, monkeypatch):
    """On the CPU a bf16 checkpoint run in float32 stores its linears and experts in bf16 (weight_dtype resolves to
    bfloat16), and computes what float32 weights compute: against transformers in float32, prompt logits on both
    attention paths (prompt GEMMs over widened blocks), then greedy tokens and logprobs of decode steps (the C++
    GEMV widening each row, or, with kernels="torch", the widened blocks again)."""
    from kernels import backend
    from tests.tiny import hf_model
    if kernels == "torch":
        monkeypatch.setattr(backend, "cpu_kernels_serve", lambda narrow: False)
    hf = hf_model(bf16_checkpoint)
    ids = prompt(23, seed=12)
    want = hf_logits(hf, ids)
    for mode in ("absorbed", "expanded"):
        llm = LLM(bf16_checkpoint, device="cpu", dtype="float32", attn_mode=mode, progress=False,
                  kv_cache_memory_gib=0.02)
        assert llm.config.weight_dtype == "bfloat16" and llm.model.ops.name == kernels
        assert llm.model.lm_head.dtype == llm.model.layers[1].mlp.w13.dtype == llm.model.embed_tokens.dtype == torch.bfloat16
        assert llm.model.layers[1].mlp.w13.dim() == 3  # the routed experts, stacked
        assert llm.model.layers[0].self_attn.kv_b_proj.dtype == torch.bfloat16  # W_UK, W_UV too
        assert (llm.prompt_logits(ids) - want).abs().max().item() < 1e-4
    out = llm.generate(prompt_token_ids=[ids], sampling_params=SamplingParams(max_tokens=6, temperature=0,
                                                                              ignore_eos=True, logprobs=0))[0]
    assert out.token_ids == hf_greedy(hf, ids, 6)
    full = torch.log_softmax(hf_logits(hf, ids + out.token_ids), -1)
    for j, tok in enumerate(out.token_ids):
        assert abs(out.logprobs[j][tok] - full[len(ids) - 1 + j, tok].item()) < 1e-4


def test_a_quantized_model_of_a_bf16_checkpoint_keeps_its_float_weights_bf16(bf16_checkpoint, tmp_path):
    """int4 linears; the embedding and kv_b_proj keep the checkpoint's bf16 (float_weight_dtype) and compute what
    float32 copies of the same values compute (the same checkpoint saved in float32): prompt logits, greedy tokens
    and logprobs of decode steps."""
    import shutil
    from kernels import QuantWeight
    from tests.tiny import hf_model
    f32 = str(tmp_path / "f32")
    hf_model(bf16_checkpoint).save_pretrained(f32)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{bf16_checkpoint}/{name}", f32)
    kw = dict(device="cpu", dtype="float32", weight_dtype="int4", progress=False, kv_cache_memory_gib=0.02)
    a, b = LLM(bf16_checkpoint, **kw), LLM(f32, **kw)
    assert (a.config.float_weight_dtype, b.config.float_weight_dtype) == ("bfloat16", None)
    assert a.model.embed_tokens.dtype == a.model.layers[0].self_attn.kv_b_proj.dtype == torch.bfloat16
    assert b.model.embed_tokens.dtype == torch.float32 and isinstance(a.model.lm_head, QuantWeight)
    ids = prompt(23, seed=13)
    assert (a.prompt_logits(ids) - b.prompt_logits(ids)).abs().max().item() < 1e-4
    sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=0)
    oa, ob = (m.generate(prompt_token_ids=[ids], sampling_params=sp)[0] for m in (a, b))
    assert oa.token_ids == ob.token_ids
    for la, lb in zip(oa.logprobs, ob.logprobs):
        assert abs(list(la.values())[0] - list(lb.values())[0]) < 1e-4


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype,weight_dtype,kv_cache_dtype", [("float32", None, "auto"), ("bfloat16", None, "auto"),
                                                               ("bfloat16", "int4", "int8"), ("float32", "int8", "int8"),
                                                               ("float32", "bfloat16", "auto")])
def test_cpu_decode_layer_equals_python_layer(checkpoints, name, dtype, weight_dtype, kv_cache_dtype, monkeypatch):
    """A CPU decode step runs each decoder layer as one C++ call (kernels/cpu_layer.cpp DecodeLayer): the same
    tokens and logprobs as the Python layer (the same kernels, in the same order and roundings) with it turned off."""
    from kernels import backend, cpu
    if cpu.ext() is None:
        pytest.skip("the C++ extension does not build here")
    # taken whatever the CPU: without AVX-512 the engine would give float weights to torch (cpu_kernels_serve)
    monkeypatch.setattr(backend, "cpu_kernels_serve", lambda narrow: True)
    llm = LLM(checkpoints[name], device="cpu", dtype=dtype, weight_dtype=weight_dtype, kv_cache_dtype=kv_cache_dtype,
              attn_mode="auto", progress=False, kv_cache_memory_gib=0.05)
    prompts = [prompt(n, seed=30 + n) for n in (9, 2, 21)]
    sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=0)
    fused = llm.runner.decode_layers
    assert fused is not None and len(fused) == len(llm.model.layers)  # every layer (dense and MoE) was built
    calls = [0] * len(fused)

    def counted(i):
        def layer(*args):
            calls[i] += 1
            return fused[i](*args)
        return layer
    llm.runner.decode_layers = [counted(i) for i in range(len(fused))]
    with_cpp = llm.generate(prompt_token_ids=prompts, sampling_params=sp)
    assert all(calls), calls  # ... and taken
    llm.runner.decode_layers = None  # the Python layers
    without = llm.generate(prompt_token_ids=prompts, sampling_params=sp)
    for a, b in zip(with_cpp, without):
        assert a.token_ids == b.token_ids
        for la, lb in zip(a.logprobs, b.logprobs):
            assert abs(list(la.values())[0] - list(lb.values())[0]) < 1e-5


def test_the_cpu_kernels_serve_where_they_pay(checkpoints):
    """Chosen once at start: the C++ kernels serve quantized weights, and float weights only where they are
    vectorized (AVX-512); elsewhere torch's GEMV is faster for float weights."""
    from kernels import cpu
    if cpu.ext() is None:
        pytest.skip("the C++ extension does not build here")
    kw = dict(device="cpu", dtype="float32", progress=False, kv_cache_memory_gib=0.01)
    assert LLM(checkpoints["v2_qlora"], **kw).model.ops.name == ("cpu" if cpu.ext().has_avx512() else "torch")
    assert LLM(checkpoints["v2_qlora"], weight_dtype="int8", **kw).model.ops.name == "cpu"
