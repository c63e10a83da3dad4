"""mla bench --kernels on the CPU at tiny sizes: the structure of its report and its errors. Nothing is timed against
a bound: benchmarks are commands that print numbers, never timed assertions in tests."""
import json
import math

import pytest

from tests.test_cli_tools import main
from tools import kernel_bench

TINY = ["bench", "--kernels", "--device", "cpu", "--kernel-batch", "1,2", "--kernel-ctx", "64,100",
        "--kernel-prefill", "32,70", "-r", "1", "--dtype", "float32"]  # explicit: auto is bf16 on a CPU with AMX


@pytest.fixture(autouse=True)
def small_device_probes(monkeypatch):
    """The copy buffer and the peak matmul at tiny sizes, and few repetitions: the test checks shapes, not speed."""
    monkeypatch.setitem(kernel_bench.DEFAULTS, "cpu", dict(kernel_bench.DEFAULTS["cpu"], copy_bytes=1 << 20, peak_n=128,
                                                           target_s=0.0))


def positive_numbers(row):
    nums = [v for v in row.values() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    assert nums and all(math.isfinite(v) and v > 0 for v in nums), row


def test_json_report(capsys):
    code, out = main(capsys, *TINY, "--output", "json")
    assert code == 0, out.err
    r = json.loads(out.out)
    assert set(r) == {"info", "copy", "decode", "prefill", "gemm_peak", "gemm"}
    assert r["info"]["backend"] == "torch" and r["info"]["dtype"] == "float32" and r["info"]["device"] == "cpu"
    assert r["info"]["torch"] and r["info"]["device_name"]
    positive_numbers(r["copy"])
    assert [(d["batch"], d["ctx"], d["cache"]) for d in r["decode"]] == [
        (b, c, f) for b in (1, 2) for c in (64, 100) for f in ("float32", "int8", "fp8")]
    for d in r["decode"]:
        assert d["skipped"] is None
        positive_numbers(d)
        assert d["bytes"] > d["batch"] * d["ctx"] * d["bytes_per_token"]  # the cache rows plus queries and outputs
        assert d["gbps"] == pytest.approx(d["bytes"] / d["time_s"] / 1e9)
        assert d["frac_copy_bw"] == pytest.approx(d["gbps"] / r["copy"]["gbps"])
    assert {d["cache"]: d["bytes_per_token"] for d in r["decode"]} == {"float32": 2304, "int8": 772, "fp8": 784}
    assert [p["tokens"] for p in r["prefill"]] == [32, 70]
    for p in r["prefill"]:
        assert p["skipped"] is None and p["sdpa_v_dim"] in (128, 192)
        positive_numbers(p)
        S = p["tokens"]
        assert p["flops"] == 2 * S * S / 2 * 16 * 192 + 2 * S * S / 2 * 16 * 128 + 2 * S * 512 * 16 * 256
        assert p["ratio"] == pytest.approx(p["sdpa_time_s"] / p["time_s"])
    positive_numbers(r["gemm_peak"])
    assert [m["tokens"] for m in r["gemm"]] == [32, 70]
    for m in r["gemm"]:
        positive_numbers(m)


def test_markdown_report_and_one_format(capsys):
    code, out = main(capsys, "bench", "--kernels", "--kernel-batch", "1", "--kernel-ctx", "64", "--kernel-prefill",
                     "16", "--kv-cache-dtype", "int8", "-r", "1", "--dtype", "float32")
    assert code == 0, out.err
    text = out.out
    assert text.startswith("device: ") and "backend torch" in text and "torch " in text and "triton " in text
    for title in ("## copy bandwidth", "## absorbed decode", "## expanded prefill", "## expansion GEMM"):
        assert title in text
    rows = [l for l in text.splitlines() if l.startswith("| 1 | 64 |")]
    assert len(rows) == 1 and "| int8 | 772 |" in rows[0]


@pytest.mark.parametrize("argv,needle", [
    (["--kernel-ctx", "0"], "--kernel-ctx"),
    (["--kernel-batch", "1,-2"], "--kernel-batch"),
    (["--kernel-prefill", "x"], "--kernel-prefill"),
    (["--output", "csv"], "csv"),
    (["--device", "tpu"], "--device"),
])
def test_bad_values_give_one_line_errors(capsys, argv, needle):
    code, out = main(capsys, "bench", "--kernels", *argv)
    err = [l for l in out.err.strip().splitlines() if l.strip()]
    assert code != 0 and len(err) == 1 and needle in err[0], out.err
    assert out.out == ""


def test_rows_that_run_out_of_memory_are_skipped_not_fatal(monkeypatch):
    import torch

    from cli import V2_LITE_CONFIG
    from engine.config import EngineConfig
    timer = kernel_bench.Timer(torch.device("cpu"), min_reps=1, target_s=0.0)
    kb = kernel_bench.KernelBench(EngineConfig(V2_LITE_CONFIG, device="cpu").resolve(plan_memory=False), timer)

    def oom(*a, **k):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")
    monkeypatch.setattr(kb, "_fill_cache", oom)
    for row in (kb.decode_row(1, 64, "float32"), kb.prefill_row(64)):
        assert row["skipped"] == "out of memory"

    def broken(*a, **k):
        raise RuntimeError("some other failure")
    monkeypatch.setattr(kb, "_fill_cache", broken)
    with pytest.raises(RuntimeError, match="some other failure"):
        kb.decode_row(1, 64, "float32")
