"""The C++ decode product (kernels.cpu.gemv, one token) alone, cold: 16 weights of [N, 2048] (V2-Lite's hidden
size) taken in turn, about 0.3-0.6 GB in all, so that each is read from memory. Prints the weights' stored bytes
per second (median of 7 passes) beside the read rate of a sum over 1 GiB measured in the same run, torch's and the
C++ kernels' own (kernels.cpu.stream_sum, the faster of the two is the roofline's read bandwidth).

    python bench/gemv_cpu.py [int4,int8,bfloat16] [N]      (NT=1 for one thread)
"""
import os
import statistics
import sys
import time

import torch

from kernels import cpu
from kernels.weights import quantize_weight

torch.manual_seed(0)
torch.set_num_threads(int(os.environ.get("NT", os.cpu_count())))
kinds = sys.argv[1].split(",") if len(sys.argv) > 1 else ["int4", "int8", "bfloat16"]
K, COUNT = 2048, 16


def rate(fn, nbytes: int) -> float:
    fn()
    ts = []
    for _ in range(7):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return nbytes / statistics.median(ts) / 1e9


for kind in kinds:
    N = int(sys.argv[2]) if len(sys.argv) > 2 else {"int4": 32768, "int8": 16384}.get(kind, 8192)
    ws = [torch.randn(N, K) * 0.02 for _ in range(COUNT)]
    ws = [quantize_weight(w, kind) if kind in ("int4", "int8") else w.to(getattr(torch, kind)) for w in ws]
    nbytes = sum(w.nbytes for w in ws)
    x, out = torch.randn(1, K), torch.empty(1, N)

    def products():
        for w in ws:
            cpu.gemv(x, w, out)
    gemv = rate(products, nbytes)
    del ws
    big = torch.ones(1 << 28)
    read = rate(big.sum, big.nbytes)
    stream = rate(lambda: cpu.ext().stream_sum(big), big.nbytes)
    print(f"{kind:8s} {COUNT} x [{N}, {K}] ({nbytes / 1e6:.0f} MB): gemv {gemv:.1f} GB/s; sum {read:.1f} GB/s, "
          f"stream_sum {stream:.1f} ({gemv / max(read, stream):.0%} of the faster)")
