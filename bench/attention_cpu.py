"""The C++ absorbed attention (kernels.cpu.mla_decode) alone at V2-Lite's shapes (16 heads, latent 512 + rope 64)
over L cached tokens: one cache called again and again (hot), and 27 caches in turn, one per layer, as a decode step
meets them (cold). Prints the median and the fastest of 7 passes of 27 calls. With `absorbed`, the call is
kernels.cpu.mla_absorbed, the attention with the products through W_UK and W_UV around it (bf16, one pair per layer,
as a bf16 checkpoint stores kv_b_proj): at a small L that is mostly the read of those 4 MiB a layer.

    python bench/attention_cpu.py [L] [float32,bfloat16,int8] [absorbed]      (NT=1 for one thread)
"""
import os
import statistics
import sys
import time

import torch

from kernels import cpu
from kernels.cache_format import CacheFormat

torch.manual_seed(0)
torch.set_num_threads(int(os.environ.get("NT", os.cpu_count())))
L = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
fmts = sys.argv[2].split(",") if len(sys.argv) > 2 else ["float32", "bfloat16", "int8"]
absorbed = "absorbed" in sys.argv[3:]
H, R, DR, BS, DN, V = 16, 512, 64, 64, 128, 128
nb = (L + BS - 1) // BS
for name in fmts:
    fmt = CacheFormat(name, R, DR, torch.float32)
    kind = cpu.cache_kind(fmt)
    caches = []
    for i in range(27):
        c = torch.zeros(nb, BS, fmt.width, dtype=fmt.dtype)
        cpu.write_latent(c, torch.arange(nb * BS), torch.randn(nb * BS, R), torch.randn(nb * BS, DR))
        caches.append(c)
    bt = torch.arange(nb, dtype=torch.int32)[None]
    cu, lens = torch.tensor([0, 1], dtype=torch.int32), torch.tensor([L], dtype=torch.int32)
    q_lat, q_nope, q_pe = torch.randn(1, H, R), torch.randn(1, H, DN), torch.randn(1, H, DR)
    kv_b = [(torch.randn(H, DN, R) * 0.05).bfloat16() for _ in range(27)], \
        [(torch.randn(H, V, R) * 0.05).bfloat16() for _ in range(27)]
    for label, cs in (("hot", caches[:1]), ("cold", caches)):
        ts = []
        for _ in range(7):
            t0 = time.perf_counter()
            for i in range(27):
                j = i % len(cs)
                if absorbed:
                    cpu.mla_absorbed(q_nope, q_pe, kv_b[0][j], kv_b[1][j], cs[j], bt, cu, lens, 0.1, kind)
                else:
                    cpu.mla_decode(q_lat, q_pe, cs[j], bt, cu, lens, 0.1, kind)
            ts.append((time.perf_counter() - t0) / 27)
        med = statistics.median(ts)
        rate = (f"{(kv_b[0][0].nbytes + kv_b[1][0].nbytes) / med / 1e9:.1f} GB/s of W_UK, W_UV" if absorbed else
                f"{2 * H * L * (R + DR + R) / med / 1e9:.0f} GFLOP/s")
        print(f"{name:9s} L={L} {label:4s} {med * 1e3:.3f} ms/call  {rate}  (fastest {min(ts) * 1e3:.3f})")
