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
