"""The whole engine on the Triton kernels against the torch reference backend: same greedy tokens, close logprobs.
On a CPU the kernels run in Triton's interpreter (float32 / float16 only), so prompts are short."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel is defined

from engine import LLM, SamplingParams  # noqa: E402
from tests import tiny  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
PROMPTS = [torch.randint(3, 120, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 12)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("v2_qlora_triton"))
    tiny.make_checkpoint(d, tiny.v2_qlora())
    return d


def run(checkpoint, backend, dtype, mode, **kw):
    llm = LLM(checkpoint, device=DEV, dtype=dtype, attn_mode=mode, backend=backend, progress=False,
              kv_cache_memory_gib=0.01, block_size=16, **kw)
    sp = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=0)
    return llm.generate(prompt_token_ids=PROMPTS, sampling_params=sp)


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-4), ("float16", 3e-2)])
@pytest.mark.parametrize("mode", ["absorbed", "expanded"])
def test_triton_engine_matches_torch(checkpoint, mode, dtype, tol, monkeypatch):
    from kernels import cache_write, triton_decode, triton_prefill
    calls = []
    for mod, name in ((cache_write, "write_latent"), (triton_decode, "mla_decode"), (triton_prefill, "mla_prefill")):
        def counted(*a, _f=getattr(mod, name), _n=name, **k):
            calls.append(_n)
            return _f(*a, **k)
        monkeypatch.setattr(mod, name, counted)
    ours = run(checkpoint, "triton", dtype, mode)
    assert {"write_latent", "mla_decode" if mode == "absorbed" else "mla_prefill"} <= set(calls)
    want = run(checkpoint, "torch", dtype, mode)
    for a, b in zip(ours, want):
        assert a.token_ids == b.token_ids
        for la, lb, tok in zip(a.logprobs, b.logprobs, a.token_ids):
            assert abs(la[tok] - lb[tok]) < tol


@pytest.mark.parametrize("kv_cache_dtype,tol", [("int8", 0.05), ("fp8", 0.3)])
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("mode", ["absorbed", "expanded"])
def test_packed_cache_close_to_float_cache(checkpoint, mode, backend, kv_cache_dtype, tol):
    """A quantized latent cache: the same greedy tokens as the float cache, logprobs within the quantization error;
    the Triton kernels and the torch reference agree on it."""
    ours = run(checkpoint, backend, "float32", mode, kv_cache_dtype=kv_cache_dtype)
    want = run(checkpoint, "torch", "float32", mode)
    for a, b in zip(ours, want):
        assert a.token_ids == b.token_ids
        for la, lb, tok in zip(a.logprobs, b.logprobs, a.token_ids):
            assert abs(la[tok] - lb[tok]) < tol


def test_packed_cache_bytes_per_token():
    from kernels import CacheFormat
    for name, want in (("int8", 644), ("fp8", 656)):
        assert CacheFormat(name, 512, 64, torch.bfloat16).bytes_per_token == want


@pytest.mark.parametrize("weight_dtype", ["int8", "int4"])
def test_weight_quantized_engine_on_triton(checkpoint, weight_dtype, monkeypatch):
    """--weight-dtype on the Triton backend: the quantized linears and the grouped MoE over stacked QuantWeights (no
    per-expert loop) give the torch backend's tokens; logprobs differ by the torch path's bf16 activations."""
    from kernels import QuantWeight, triton_moe
    calls = []

    def counted(x, ids, weights, w13, w2, *a, _f=triton_moe.moe_experts, **k):
        calls.append(isinstance(w13, QuantWeight) and w13.stacked)
        return _f(x, ids, weights, w13, w2, *a, **k)
    monkeypatch.setattr(triton_moe, "moe_experts", counted)
    ours = run(checkpoint, "triton", "float32", "auto", weight_dtype=weight_dtype)
    assert calls and all(calls)
    want = run(checkpoint, "torch", "float32", "auto", weight_dtype=weight_dtype)
    for a, b in zip(ours, want):
        assert a.token_ids == b.token_ids
        for la, lb, tok in zip(a.logprobs, b.logprobs, a.token_ids):
            assert abs(la[tok] - lb[tok]) < 0.05


def test_packed_caches_agree_between_backends_at_odd_widths(tmp_path):
    """kv_lora_rank 48 (fp8's groups of 12 are no power of two), q_lora_rank 40, 5 heads, rope 16, nope 24, v 40,
    a group-limited MoE: the Triton kernels write and read the same bytes as the torch reference for every cache
    format, so greedy tokens are equal and logprobs agree, for prompts of 3, 37 and 70 tokens on the absorbed path.
    (With the tile's quarters taken as fp8's scale groups, tokens differed from the first one.)"""
    d = str(tmp_path / "groups")
    tiny.make_checkpoint(d, tiny.v2_qlora(q_lora_rank=40, kv_lora_rank=48, qk_rope_head_dim=16, qk_nope_head_dim=24,
                                          v_head_dim=40, num_attention_heads=5, num_key_value_heads=5, hidden_size=40),
                         tokenizer=False)
    prompts = [torch.randint(3, 120, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (3, 37, 70)]
    sp = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=0)
    # On the CPU the torch backend's attention is the C++ one: over a bf16 cache it rounds differently, and over an
    # int8 cache it quantizes the query to int8 (the bytes written are checked bit for bit in test_cpu_kernels.py)
    cpu_tol = {"bfloat16": 3e-3, "int8": 2e-3} if DEV == "cpu" else {}
    for kv_cache_dtype in ("bfloat16", "int8", "fp8"):
        tol = cpu_tol.get(kv_cache_dtype, 1e-4)
        outs = [LLM(d, device=DEV, dtype="float32", attn_mode="absorbed", backend=backend, progress=False,
                    kv_cache_dtype=kv_cache_dtype, kv_cache_memory_gib=0.01, block_size=16).generate(
                        prompt_token_ids=prompts, sampling_params=sp) for backend in ("triton", "torch")]
        for a, b in zip(*outs):
            assert a.token_ids == b.token_ids, kv_cache_dtype
            for la, lb, tok in zip(a.logprobs, b.logprobs, a.token_ids):
                assert abs(la[tok] - lb[tok]) < tol, kv_cache_dtype
