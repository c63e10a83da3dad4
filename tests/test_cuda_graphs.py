"""Decode steps through engine/cuda_graphs.py: static buffers, padding to batch-size buckets, the padding block,
fallback when capture fails. On a CPU the "replay" runs the forward pass on the static buffers (capture=False), so
everything but the capture itself is checked here; the capture is checked on a GPU (marked gpu)."""
import functools
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel is defined

from engine import LLM, SamplingParams  # noqa: E402
from engine.cuda_graphs import DecodeGraphs  # noqa: E402
from tests import tiny  # noqa: E402

PROMPTS = [torch.randint(3, 120, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 19, 11)]
MAX_TOKENS = (6, 3, 5)  # the decode batch shrinks 3 -> 2 -> 1: buckets 4, 2 and 1 all run


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("v3_graphs"))
    tiny.make_checkpoint(d, tiny.v3_noaux(), tokenizer=False)
    return d


def make(checkpoint, **kw):
    kw = dict(device="cpu", dtype="float32", attn_mode="auto", mla_threshold=4, progress=False,
              kv_cache_memory_gib=0.01, block_size=4, max_model_len=64) | kw
    return LLM(checkpoint, **kw)


def generate(llm):
    sps = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True, logprobs=0) for m in MAX_TOKENS]
    return llm.generate(prompt_token_ids=PROMPTS, sampling_params=sps)


def with_graphs(llm, max_batch=5):
    """Replays that record the bucket, the real rows and whether the padding rows came out finite."""
    graphs = DecodeGraphs(llm.model, llm.cache, llm.blocks.block_size, max_batch,
                          llm.blocks.blocks_for(llm.config.max_model_len), capture=False)
    seen = []
    capture = graphs._capture

    def recording(bucket):
        step = capture(bucket)

        def replay():
            hidden = step()
            seen.append((bucket, int((graphs.seq_lens[:bucket] > 1).sum()), bool(hidden.isfinite().all())))
            return hidden
        return replay

    graphs._capture = recording
    assert graphs.capture_all()  # as the runner does at start
    llm.runner.graphs = graphs
    return graphs, seen


@pytest.mark.parametrize("backend,weight_dtype", [("torch", None), ("triton", None), ("triton", "int4")])
def test_padded_bucketed_decode_equals_eager(checkpoint, backend, weight_dtype, monkeypatch):
    """Same tokens and logprobs as the eager engine, batches 3, 2, 1 in buckets 4, 2, 1; the padding rows (token 0
    in the padding block) come out finite although the cache is poisoned with NaN, so they read only what they
    wrote; and the real sequences never see the padding rows' writes. The Triton decode kernel splits the KV axis
    of the static, max_model_len-wide block tables (3 splits, most of them past a sequence's end); int4 experts go
    through the grouped MoE, padding rows included."""
    from kernels import triton_decode
    monkeypatch.setattr(triton_decode, "_choose_splits", lambda *a: 3)
    want = generate(make(checkpoint, backend=backend, weight_dtype=weight_dtype))
    llm = make(checkpoint, backend=backend, weight_dtype=weight_dtype)
    for layer in llm.cache.layers:
        layer.fill_(float("nan"))  # an unwritten slot read by anyone poisons its row
    graphs, seen = with_graphs(llm)
    assert graphs.buckets == [1, 2, 4, 5]
    got = generate(llm)
    for a, b in zip(got, want):
        assert a.token_ids == b.token_ids
        for la, lb, tok in zip(a.logprobs, b.logprobs, a.token_ids):
            assert abs(la[tok] - lb[tok]) < 1e-4
    buckets = {(bucket, real) for bucket, real, _ in seen}
    assert {(4, 3), (2, 2), (1, 1)} <= buckets, seen  # every batch size ran padded in its bucket
    assert all(finite for _, _, finite in seen)


def test_mixed_and_oversized_steps_run_eagerly(checkpoint):
    """A step with a prompt chunk, or more sequences than the largest bucket, is not a graph step."""
    want = generate(make(checkpoint))
    llm = make(checkpoint)
    graphs, seen = with_graphs(llm, max_batch=2)
    got = generate(llm)
    assert [a.token_ids for a in got] == [b.token_ids for b in want]
    assert seen and all(real <= 2 for _, real, _ in seen)  # batches of 3 ran eagerly


def test_failed_capture_falls_back_to_eager_with_one_warning(checkpoint, capsys, monkeypatch):
    """A capture that fails at start turns graphs off before any request, with one line; decoding is eager."""
    want = generate(make(checkpoint))

    def cannot(self, bucket):
        raise RuntimeError("operation not permitted when stream is capturing\nmore detail")
    monkeypatch.setattr(DecodeGraphs, "_capture", cannot)
    from engine import model_runner
    monkeypatch.setattr(model_runner, "use_graphs", lambda *a: True)  # as on a GPU, with the CPU's replay
    monkeypatch.setattr(model_runner, "DecodeGraphs", functools.partial(DecodeGraphs, capture=False))
    llm = make(checkpoint)
    assert llm.runner.graphs is None
    got = generate(llm)
    assert [a.token_ids for a in got] == [b.token_ids for b in want]
    err = capsys.readouterr().err
    assert err.count("CUDA graphs off") == 1
    assert "operation not permitted when stream is capturing" in err and "more detail" not in err


def test_graphs_only_where_they_can_run(checkpoint):
    """CPU: never; expanded-only mode has no decode steps to capture; enforce_eager turns them off."""
    assert make(checkpoint).runner.graphs is None
    if torch.cuda.is_available():
        assert make(checkpoint, device="cuda").runner.graphs is not None
        assert make(checkpoint, device="cuda", enforce_eager=True).runner.graphs is None
        assert make(checkpoint, device="cuda", attn_mode="expanded").runner.graphs is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype,tol", [("float32", 1e-3), ("bfloat16", 0.1)])
def test_captured_graphs_equal_eager_on_gpu(checkpoint, dtype, tol):
    want = generate(make(checkpoint, device="cuda", dtype=dtype, enforce_eager=True, max_num_seqs=5))
    llm = make(checkpoint, device="cuda", dtype=dtype, max_num_seqs=5)
    got = generate(llm)
    assert llm.runner.graphs is not None and {1, 2, 4} <= set(llm.runner.graphs.replays)
    for a, b in zip(got, want):
        assert a.token_ids == b.token_ids
        for la, lb, tok in zip(a.logprobs, b.logprobs, a.token_ids):
            assert abs(la[tok] - lb[tok]) < tol
