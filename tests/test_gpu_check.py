"""GPU readiness without a GPU: every Triton kernel family compiled for sm_90 at DeepSeek-V2-Lite's shapes, in bf16,
with no compile error, no spill and shared memory within the limit (tools/gpu_check.py). In a subprocess: the other
kernel tests turn Triton's interpreter on for the whole test process, and the compiler needs it off."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECK = """
import json, torch
from tools import gpu_check
rows = gpu_check.run(["bench/configs/deepseek-v2-lite.json"], ["sm_90"], dtypes=(torch.bfloat16,), progress=False)
print(json.dumps(rows))
"""


def test_every_kernel_compiles_for_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT
    r = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, env=env, cwd=ROOT, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(r.stdout.strip().splitlines()[-1])
    assert not [x for x in rows if x.get("error")], [x for x in rows if x.get("error")]
    kernels = {x["kernel"] for x in rows}
    assert kernels == {"_write_latent_kernel", "_mla_decode_kernel", "_merge_splits_kernel", "_mla_prefill_kernel",
                       "_quant_linear_kernel", "_moe_gate_up_kernel", "_moe_down_kernel"}
    configs = " ".join(x["config"] for x in rows)
    for needle in ("bfloat16", "int8", "fp8", "split-K", "plain", "float experts", "int4 experts"):
        assert needle in configs
    assert all(x["regs"] > 0 and x["shared"] <= 227 << 10 for x in rows)
