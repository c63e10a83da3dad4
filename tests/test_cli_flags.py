"""Engine flags every command takes: --threads, --kv-cache-tokens, --no-prefix-caching."""
import pytest
import torch

import cli


def test_threads_sets_the_thread_count_of_torch_and_the_kernels(capsys):
    before = torch.get_num_threads()
    try:
        assert cli.main(["generate", "--threads", "1", "-p", "the value", "-n", "3"]) == 0
        assert torch.get_num_threads() == 1  # at::get_num_threads, which the C++ kernels split their rows by
    finally:
        torch.set_num_threads(before)
    assert "generated 3 tokens" in capsys.readouterr().err


def test_threads_are_set_where_each_rank_is_built():
    """The Python API takes threads too; build_rank (which every tensor-parallel rank runs) sets them."""
    from engine import LLM, EngineConfig
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        LLM(cli.DEFAULT_MODEL, threads=1, progress=False)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert cli.engine_config(cli.build_parser().parse_args(["serve", "--threads", "3", "--tp", "2"])).threads == 3
    with pytest.raises(ValueError, match="threads=0"):
        EngineConfig(cli.DEFAULT_MODEL, threads=0)


def test_cache_flags_reach_the_engine_config():
    args = cli.build_parser().parse_args(["generate", "-p", "x", "--kv-cache-tokens", "100", "--no-prefix-caching"])
    c = cli.engine_config(args)
    assert c.kv_cache_tokens == 100 and c.kv_cache_memory_gib is None and not c.enable_prefix_caching
    resolved = c.resolve()
    from engine import memory
    assert memory.cache_blocks(resolved, 100) == 2  # whole blocks of 64
    assert cli.engine_config(cli.build_parser().parse_args(["generate", "-p", "x"])).enable_prefix_caching


def test_kv_cache_tokens_and_gib_exclude_each_other(capsys):
    with pytest.raises(SystemExit) as e:
        cli.build_parser().parse_args(["generate", "-p", "x", "--kv-cache-tokens", "64", "--kv-cache-gib", "1"])
    assert e.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


@pytest.mark.parametrize("flags,dtype,weight_dtype,want", [
    (["avx512_vnni"], "auto", "int4", "int8"),  # VNNI, no bf16 arithmetic: a float32 model, int8 GEMMs
    (["avx512_vnni", "avx512_bf16"], "auto", "int4", "int8"),  # bf16 instructions but no AMX: the same
    (["avx512_vnni", "amx_bf16"], "float32", "int4", "dequantize"),  # AMX: dequantized (more accurate)
    (["avx2"], "auto", "int8", "dequantize"),  # no VNNI
    (["avx512_vnni"], "auto", None, "dequantize"),  # float weights: nothing to multiply in int8
])
def test_prefill_gemm_is_settled_once_from_the_cpu(monkeypatch, flags, dtype, weight_dtype, want):
    from engine import config
    monkeypatch.setattr(config, "cpu_flags", lambda: flags)
    c = config.EngineConfig(cli.DEFAULT_MODEL, device="cpu", dtype=dtype, weight_dtype=weight_dtype)
    assert c.resolve(plan_memory=False).prefill_gemm == want


@pytest.mark.parametrize("flags,want", [(["avx512_vnni"], "float32"), (["avx512_vnni", "avx512_bf16"], "float32"),
                                        (["avx512_bf16", "amx_bf16"], "bfloat16")])
def test_a_bf16_checkpoint_runs_in_bf16_on_the_cpu_only_with_amx(monkeypatch, flags, want):
    """Only AMX's bf16 GEMM outruns the float32 one (AVX512_BF16's ran at 0.6x it)."""
    from engine import config
    monkeypatch.setattr(config, "cpu_flags", lambda: flags)
    assert config.EngineConfig(cli.DEFAULT_MODEL, device="cpu").resolve(plan_memory=False).dtype == want


def test_prefill_gemm_int8_is_refused_where_it_does_not_apply(capsys):
    assert cli.main(["generate", "-p", "x", "-n", "1", "--weight-dtype", "int4", "--dtype", "bfloat16",
                     "--prefill-gemm", "int8"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert "prefill_gemm='int8'" in err[-1] and "Traceback" not in "\n".join(err)


@pytest.mark.parametrize("model,dtype,weight_dtype,want", [
    ("default", "auto", None, "bfloat16"),  # bf16 tensors, no bf16 arithmetic: a float32 model over bf16 weights
    ("default", "bfloat16", None, None),  # the model dtype already
    ("default", "auto", "int4", "int4"),  # asked for
    ("default", "bfloat16", "bfloat16", None),  # the same as the model dtype
    ("v2_lite", "float32", None, None),  # float32 tensors stay float32
])
def test_a_bf16_checkpoint_in_float32_keeps_bf16_weights(monkeypatch, checkpoints, model, dtype, weight_dtype, want):
    from engine import config
    monkeypatch.setattr(config, "cpu_flags", lambda: ["avx512_vnni"])
    path = cli.DEFAULT_MODEL if model == "default" else checkpoints[model]
    c = config.EngineConfig(path, device="cpu", dtype=dtype, weight_dtype=weight_dtype)
    assert c.resolve(plan_memory=False).weight_dtype == want


def test_bf16_weights_are_refused_where_they_do_not_apply(capsys):
    assert cli.main(["generate", "-p", "x", "-n", "1", "--weight-dtype", "bfloat16", "--dtype", "float16"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert "weight_dtype='bfloat16'" in err[-1] and "Traceback" not in "\n".join(err)
