"""Packaging traps: our top-level `kernels` package must not break transformers, which probes a `kernels`
distribution at import, and the console script must be wired to cli:main."""
import importlib.metadata
import subprocess
import sys


def test_transformers_imports_and_loads_a_tokenizer_beside_our_kernels(checkpoints):
    code = ("import kernels, transformers; from transformers import AutoTokenizer, DeepseekV2ForCausalLM; "
            f"t = AutoTokenizer.from_pretrained({checkpoints['v2_qlora']!r}); print(len(t('the value').input_ids))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout.strip()) >= 2


def test_console_script_points_at_cli_main():
    try:
        eps = importlib.metadata.entry_points(group="console_scripts")
    except Exception:
        eps = []
    mla = [e for e in eps if e.name == "mla"]
    if mla:  # installed (pip install -e .): the script must be ours
        assert mla[0].value == "cli:main"
    import cli
    assert callable(cli.main)
