"""Sampler and request handling: seeds, top-k/top-p, stop strings, EOS, max_tokens, streaming text."""
import torch

from engine import LLM, SamplingParams
from engine.sampler import sample
import pytest


@pytest.fixture(scope="module")
def llm(checkpoints):
    return LLM(checkpoints["v2_qlora"], device="cpu", dtype="float32", progress=False, kv_cache_memory_gib=0.05)


def test_same_seed_same_text_different_seed_differs(llm):
    p = [5, 9, 11, 13]
    sp = lambda seed: SamplingParams(max_tokens=20, temperature=1.5, seed=seed, ignore_eos=True)
    a = llm.generate(prompt_token_ids=[p], sampling_params=sp(7))[0].token_ids
    b = llm.generate(prompt_token_ids=[p], sampling_params=sp(7))[0].token_ids
    c = llm.generate(prompt_token_ids=[p], sampling_params=sp(8))[0].token_ids
    assert a == b and a != c
    # a seeded request gives the same tokens whatever else is in the batch
    mixed = llm.generate(prompt_token_ids=[[7, 8], p, [3] * 9], sampling_params=[sp(1), sp(7), sp(2)])
    assert mixed[1].token_ids == a


def test_top_k_one_and_tiny_top_p_are_greedy(llm):
    p = [4, 5, 6]
    greedy = llm.generate(prompt_token_ids=[p], sampling_params=SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
    for kw in ({"top_k": 1}, {"top_p": 1e-6}):
        out = llm.generate(prompt_token_ids=[p], sampling_params=SamplingParams(
            max_tokens=10, temperature=2.0, seed=3, ignore_eos=True, **kw))
        assert out[0].token_ids == greedy[0].token_ids


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    gens = [torch.Generator().manual_seed(i) for i in range(1)]
    seen_k = {sample(logits, [SamplingParams(temperature=5.0, top_k=2)], gens)[0] for _ in range(200)}
    assert seen_k == {0, 1}
    # softmax(logits) = [.636, .234, .086, .032, .012]: top_p 0.8 keeps the first two tokens only
    seen_p = {sample(logits, [SamplingParams(temperature=1.0, top_p=0.8)], gens)[0] for _ in range(300)}
    assert seen_p == {0, 1}
    assert sample(logits, [SamplingParams(temperature=0)], gens) == [0]


def test_temperature_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    g = [torch.Generator().manual_seed(0)]
    counts = torch.bincount(torch.tensor([sample(logits, [SamplingParams(temperature=1.0)], g)[0] for _ in range(3000)]),
                            minlength=3).float() / 3000
    assert torch.allclose(counts, torch.tensor([0.7, 0.2, 0.1]), atol=0.04)


def test_max_tokens_eos_and_ignore_eos(llm):
    p = [9, 10, 11]
    out = llm.generate(prompt_token_ids=[p], sampling_params=SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length"
    eos = out.token_ids[2]  # pretend the third greedy token is the end of sequence
    cut = out.token_ids.index(eos) + 1
    llm.output.eos_token_ids.add(eos)
    try:
        stopped = llm.generate(prompt_token_ids=[p], sampling_params=SamplingParams(max_tokens=5, temperature=0))[0]
        assert stopped.token_ids == out.token_ids[:cut] and stopped.finish_reason == "stop"
        ignored = llm.generate(prompt_token_ids=[p], sampling_params=SamplingParams(
            max_tokens=5, temperature=0, ignore_eos=True))[0]
        assert ignored.token_ids == out.token_ids
    finally:
        llm.output.eos_token_ids.discard(eos)
    by_id = llm.generate(prompt_token_ids=[p], sampling_params=SamplingParams(
        max_tokens=5, temperature=0, stop_token_ids=[eos]))[0]
    assert by_id.token_ids == out.token_ids[:cut] and by_id.finish_reason == "stop"


def test_stop_strings_cut_the_text(llm):
    prompt = "the function returns"
    full = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    # the text continues the prompt, so it may start with the space that separates them
    assert full.text.lstrip() == llm.tokenizer.decode(full.token_ids, skip_special_tokens=True)
    words = full.text.split()
    assert len(words) >= 3
    stop = words[2]
    out = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, stop=[stop]))[0]
    assert out.finish_reason == "stop"
    assert stop not in out.text and full.text.startswith(out.text)
    assert full.text.index(stop) == len(out.text)


def test_stream_yields_the_same_text(llm):
    ids = llm.encode("a list of values")
    sp = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    stream = llm.stream(ids, sp)
    streamed = "".join(stream)
    assert streamed == stream.text == llm.generate(prompt_token_ids=[ids], sampling_params=sp)[0].text


def test_chat_template(llm):
    ids = llm.chat_prompt([{"role": "user", "content": "the value"}])
    text = llm.tokenizer.decode(ids)
    assert "<|user|>" in text and text.rstrip().endswith("<|assistant|>")


def test_bad_sampling_params():
    for kw in ({"max_tokens": 0}, {"temperature": -1}, {"top_p": 0}, {"top_k": -5}, {"logprobs": -1}):
        with pytest.raises(ValueError):
            SamplingParams(**kw)


def test_sentencepiece_only_tokenizer(tmp_path, capsys):
    """A checkpoint whose tokenizer is a sentencepiece tokenizer.model (no tokenizer.json) loads through
    AutoTokenizer and generates."""
    import json

    import sentencepiece as spm

    import cli
    from tests.tiny import make_checkpoint, v2_qlora
    path = tmp_path / "sp"
    make_checkpoint(str(path), v2_qlora(num_hidden_layers=2), tokenizer=False)
    text = tmp_path / "text.txt"
    text.write_text("\n".join(["the function returns a list of values", "the name of the file is a string"] * 40))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(path / "tokenizer"), vocab_size=60,
                                   model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
    (path / "tokenizer.vocab").unlink()
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>",
                                                            "eos_token": "</s>", "unk_token": "<unk>"}))
    assert not (path / "tokenizer.json").exists()
    llm = LLM(str(path), device="cpu", dtype="float32", progress=False, kv_cache_memory_gib=0.01)
    ids = llm.encode("the function returns")
    sp = spm.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
    assert [i for i in ids if i != sp.bos_id()] == sp.encode("the function returns")
    out = llm.generate(prompt_token_ids=[ids], sampling_params=SamplingParams(max_tokens=5, temperature=0,
                                                                              ignore_eos=True))[0]
    assert out.text.strip() == sp.decode([t for t in out.token_ids if t < sp.get_piece_size()]).strip()
    assert cli.main(["generate", "--model", str(path), "--prompt", "the name", "-n", "4", "--ignore-eos"]) == 0
