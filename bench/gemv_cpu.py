"""The C++ decode product (kernels.cpu.gemv, one token) alone, cold: 16 weights of [N, 2048] (V2-Lite's hidden
size) taken in turn, about 0.3-0.6 GB in all, so that each is read from memory. Prints the weights' stored bytes
per second beside the roofline's read bandwidth measured in the same run (tools/kernel_bench.py read_bandwidth: the
faster of torch's sum and kernels.cpu.stream_sum over 1 GiB); medians of tools/kernel_bench.py's Timer.

    python bench/gemv_cpu.py [int4,int8,bfloat16] [N]      (NT=1 for one thread)
"""
import os
import sys

import torch

from kernels import cpu
from kernels.weights import quantize_weight
from tools.kernel_bench import Timer, read_bandwidth

torch.manual_seed(0)
torch.set_num_threads(int(os.environ.get("NT", os.cpu_count())))
kinds = sys.argv[1].split(",") if len(sys.argv) > 1 else ["int4", "int8", "bfloat16"]
K, COUNT = 2048, 16
cpu_device = torch.device("cpu")
timer = Timer(cpu_device, min_reps=7, target_s=0.5)

for kind in kinds:
    N = int(sys.argv[2]) if len(sys.argv) > 2 else {"int4": 32768, "int8": 16384}.get(kind, 8192)
    ws = [torch.randn(N, K) * 0.02 for _ in range(COUNT)]
    ws = [quantize_weight(w, kind) if kind in ("int4", "int8") else w.to(getattr(torch, kind)) for w in ws]
    nbytes = sum(w.nbytes for w in ws)
    x, out = torch.randn(1, K), torch.empty(1, N)

    def products():
        for w in ws:
            cpu.gemv(x, w, out)
    gemv = nbytes / timer(products) / 1e9
    del ws
    read = read_bandwidth(cpu_device, timer, 1 << 30)["gbps"]
    print(f"{kind:8s} {COUNT} x [{N}, {K}] ({nbytes / 1e6:.0f} MB): gemv {gemv:.1f} GB/s, read bandwidth "
          f"{read:.1f} GB/s ({gemv / read:.0%})")
