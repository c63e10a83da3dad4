"""mla bench --kernels: the attention kernels alone, at a model's shapes (--config; DeepSeek-V2-Lite by default), against
what the device can do.

Four measurements, all in one run on one device (speed claims are ratios taken in the same run):
  copy     the device's memory bandwidth, from one large dst.copy_(src): 2 * bytes / time (read + write)
  decode   absorbed attention (kernels.mla_decode) over a paged latent cache: bytes a kernel must read per call
           (the cache rows of every sequence, the queries, the outputs) / time, and that as a fraction of `copy`
  prefill  expanded attention (kernels.mla_prefill, kv_b_proj expansion included) on one causal sequence, in TFLOP/s,
           next to torch SDPA doing the same work (the same expansion with torch.matmul, then SDPA)
  gemm     the expansion GEMM alone (torch.matmul), against a large square matmul: the device's reachable peak
The numbers are medians; on CUDA each call is timed with CUDA events after a write that flushes the L2 cache, so a
small cache cannot be served from L2 in the second and later repetitions."""
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import kernels
from kernels import CacheFormat
from kernels.reference import expand
from engine.config import EngineConfig
from models.loader import available_memory

DEFAULTS = {
    "cuda": dict(batch=[1, 8, 64], ctx=[1024, 4096, 16384, 65536], prefill=[512, 4096, 16384],
                 copy_bytes=1 << 30, peak_n=8192, target_s=0.25),
    "cpu": dict(batch=[1, 8], ctx=[1024, 4096], prefill=[512, 2048], copy_bytes=256 << 20, peak_n=2048, target_s=0.5),
}
MAX_REPS = 100
FILL_CHUNK = 1 << 18  # tokens written into a cache per write_latent call
MEMORY_MARGIN = 0.85  # use at most this fraction of the free memory


def _is_oom(e: BaseException) -> bool:
    """CUDA raises OutOfMemoryError; the CPU allocator a plain RuntimeError."""
    return isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in str(e)


class Timer:
    """Median seconds per call of fn on a device; the repetitions fill about target_s, at least min_reps."""

    def __init__(self, device: torch.device, min_reps: int, target_s: float):
        self.device, self.min_reps, self.target_s = device, min_reps, target_s
        self.cuda = device.type == "cuda"
        # larger than any L2 (50 MiB on H100/H200): zeroing it evicts what the previous call left there
        self._flush = torch.empty(256 << 20, dtype=torch.uint8, device=device) if self.cuda else None

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def __call__(self, fn, flush: bool = True) -> float:
        fn()  # warm-up: compiles Triton kernels, touches memory
        self._sync()
        t = time.perf_counter()
        fn()
        self._sync()
        first = time.perf_counter() - t
        reps = max(self.min_reps, min(MAX_REPS, int(self.target_s / max(first, 1e-6))))
        if not self.cuda:
            times = []
            for _ in range(reps):
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
            return statistics.median(times)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in events:
            if flush:
                self._flush.zero_()
            start.record()
            fn()
            end.record()
        self._sync()
        return statistics.median(s.elapsed_time(e) for s, e in events) / 1e3


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return "cpu: " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return "cpu: " + (platform.processor() or platform.machine())


# ---- copy bandwidth -------------------------------------------------------------------------------------------------
def copy_bandwidth(device, timer: Timer, nbytes: int) -> dict:
    nbytes = min(nbytes, int(available_memory(device) * MEMORY_MARGIN) // 2)
    nbytes -= nbytes % 4096
    if nbytes <= 0:
        raise ValueError(f"no memory left on {device} to measure the copy bandwidth")
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = timer(lambda: dst.copy_(src), flush=False)  # far larger than any cache
    return dict(bytes=nbytes, time_s=t, gbps=2 * nbytes / t / 1e9)


def read_bandwidth(device, timer: Timer, nbytes: int) -> dict:
    """A read-only stream, the limit of a decode step (it reads its weights and writes little): the sum of a large
    float32 array (a copy writes as much as it reads, and on this CPU runs slower than reading alone). On the CPU,
    the faster of torch's sum and the C++ kernels' own read loop (kernels.cpu.stream_sum, with the software
    prefetch of the decode products, which read faster than torch's sum)."""
    nbytes = min(nbytes, int(available_memory(device) * MEMORY_MARGIN))
    x = torch.ones(max(1, nbytes // 4), dtype=torch.float32, device=device)
    t = timer(lambda: x.sum(), flush=False)
    if device.type == "cpu":
        from kernels import cpu
        ext = cpu.ext()
        if ext is not None:
            t = min(t, timer(lambda: ext.stream_sum(x), flush=False))
    return dict(bytes=x.nbytes, time_s=t, gbps=x.nbytes / t / 1e9)


class KernelBench:
    """The kernel measurements at one model's attention shapes on one device, dtype and backend."""

    def __init__(self, config: EngineConfig, timer: Timer, block_size: int = 64):
        cfg = config.model_config
        self.config, self.timer = config, timer
        self.device, self.dtype, self.backend = config.torch_device, config.torch_dtype, config.backend
        self.H, self.R, self.DR = cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
        self.DN, self.DV, self.BS = cfg.qk_nope_head_dim, cfg.v_head_dim, block_size
        self.QK = self.DN + self.DR

    def info(self) -> dict:
        try:
            import triton
            triton_version = triton.__version__
        except ImportError:
            triton_version = None
        device = self.device
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
        return dict(device=device.type, device_name=name, dtype=self.config.dtype, backend=self.backend,
                    torch=torch.__version__, triton=triton_version, model=self.config.model, heads=self.H,
                    kv_lora_rank=self.R, rope_dim=self.DR, block_size=self.BS, threads=torch.get_num_threads())

    def cache_format(self, name: str) -> CacheFormat:
        return CacheFormat(name, self.R, self.DR, self.dtype)

    # ---- absorbed decode ----------------------------------------------------------------------------------------
    def _decode_need(self, batch: int, ctx: int, fmt: CacheFormat) -> int:
        """Bytes one configuration allocates: the cache, the filling chunk, and what the torch path copies."""
        blocks = batch * -(-ctx // self.BS)
        W, elt = self.R + self.DR, self.dtype.itemsize
        need = blocks * self.BS * fmt.bytes_per_token + min(FILL_CHUNK, blocks * self.BS) * W * 4 * 2
        if self.backend == "torch":
            if fmt.packed:  # the reference runs on the dequantized blocks of the whole batch
                need += blocks * self.BS * W * elt * 2
            need += ctx * W * elt + 3 * self.H * ctx * 4  # one sequence's gathered rows, scores
        return need

    def _fill_cache(self, num_blocks: int, fmt: CacheFormat, g: torch.Generator):
        """A paged cache of num_blocks blocks written with kernels.write_latent from random latents (the float
        formats too, so that every format is filled the same way)."""
        dev = self.device
        cache = torch.empty(num_blocks, self.BS, fmt.width, device=dev, dtype=fmt.dtype)
        slots = num_blocks * self.BS
        for s0 in range(0, slots, FILL_CHUNK):
            s1 = min(slots, s0 + FILL_CHUNK)
            c_kv = torch.randn(s1 - s0, self.R, device=dev, generator=g).to(self.dtype)  # RMSNorm'd: unit scale
            k_pe = torch.randn(s1 - s0, self.DR, device=dev, generator=g).to(self.dtype)
            kernels.write_latent(cache, torch.arange(s0, s1, device=dev), c_kv, k_pe, fmt, backend=self.backend)
        return cache

    def decode_row(self, batch: int, ctx: int, fmt_name: str, seed: int = 0) -> dict:
        fmt, dev, H, R, DR = self.cache_format(fmt_name), self.device, self.H, self.R, self.DR
        elt = self.dtype.itemsize
        row = dict(batch=batch, ctx=ctx, cache=fmt_name, bytes_per_token=fmt.bytes_per_token)
        need, free = self._decode_need(batch, ctx, fmt), available_memory(dev)
        if need > free * MEMORY_MARGIN:
            return dict(row, skipped=f"needs {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free")
        g = torch.Generator(device=dev).manual_seed(seed)
        per_seq = -(-ctx // self.BS)

        def measure():
            cache = self._fill_cache(batch * per_seq, fmt, g)
            # each sequence's blocks scattered over the cache, as the block manager leaves them after a while
            block_tables = torch.randperm(batch * per_seq, device=dev, generator=g).to(torch.int32).view(batch, per_seq)
            cu_seqlens_q = torch.arange(batch + 1, dtype=torch.int32, device=dev)  # one query token per sequence
            seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=dev)
            q_lat = torch.randn(batch, H, R, device=dev, generator=g).mul_(R ** -0.5).to(self.dtype)
            q_pe = torch.randn(batch, H, DR, device=dev, generator=g).to(self.dtype)
            t = self.timer(lambda: kernels.mla_decode(q_lat, q_pe, cache, block_tables, cu_seqlens_q, seq_lens,
                                                      self.QK ** -0.5, fmt, backend=self.backend))
            nbytes = batch * ctx * fmt.bytes_per_token + batch * H * (R + DR) * elt + batch * H * R * elt
            return dict(bytes=nbytes, time_s=t, gbps=nbytes / t / 1e9)
        return _unless_oom(row, dev, measure)

    # ---- expanded prefill ---------------------------------------------------------------------------------------
    def prefill_flops(self, S: int) -> dict:
        """Causal attention counts half the S x S score matrix: QK^T 2 * S * S/2 * H * (nope + rope), PV
        2 * S * S/2 * H * v; the expansion is one GEMM [S, R] x [R, H * (nope + v)]."""
        attn = 2 * S * S / 2 * self.H * self.QK + 2 * S * S / 2 * self.H * self.DV
        expand = 2 * S * self.R * self.H * (self.DN + self.DV)
        return dict(attn=attn, expand=expand, total=attn + expand)

    def _prefill_need(self, S: int) -> int:
        elt, H, QK, DN, DV = self.dtype.itemsize, self.H, self.QK, self.DN, self.DV
        need = S * (self.R + self.DR) * elt  # cache
        need += S * H * (QK * 3 + DV * 3 + DN + DV) * elt  # q, k, v, padded v, expansion, outputs
        need += min(S, 8192) * H * (DN + DV) * elt * 2  # our workspace / reference chunks
        if self.device.type == "cpu":  # SDPA's CPU path may build the whole score matrix
            need += S * S * H * 4 * 2
        return need

    def prefill_row(self, S: int, seed: int = 0) -> dict:
        dev, H, R, DR, DN, DV, QK = self.device, self.H, self.R, self.DR, self.DN, self.DV, self.QK
        fl = self.prefill_flops(S)
        row = dict(tokens=S, flops=fl["total"], attn_flops=fl["attn"], expand_flops=fl["expand"])
        need, free = self._prefill_need(S), available_memory(dev)
        if need > free * MEMORY_MARGIN:
            return dict(row, skipped=f"needs {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free")
        g = torch.Generator(device=dev).manual_seed(seed)
        blocks = -(-S // self.BS)
        fmt = self.cache_format(self.config.dtype)

        def measure():
            cache = self._fill_cache(blocks, fmt, g)
            block_tables = torch.arange(blocks, dtype=torch.int32, device=dev)[None]
            cu_seqlens_q = torch.tensor([0, S], dtype=torch.int32, device=dev)
            seq_lens = torch.tensor([S], dtype=torch.int32, device=dev)
            q_nope = torch.randn(S, H, DN, device=dev, generator=g).to(self.dtype)
            q_pe = torch.randn(S, H, DR, device=dev, generator=g).to(self.dtype)
            w_kv_b = (torch.randn(H * (DN + DV), R, device=dev, generator=g) * R ** -0.5).to(self.dtype)
            scale = QK ** -0.5
            t_ours = self.timer(lambda: kernels.mla_prefill(q_nope, q_pe, cache, block_tables, cu_seqlens_q,
                                                            seq_lens, w_kv_b, scale, fmt, backend=self.backend))

            # the baseline: the same expansion with torch.matmul, K = [k_nope | shared k_pe], then SDPA
            lat = cache.view(-1, R + DR)[:S]
            q = torch.cat((q_nope, q_pe), -1).transpose(0, 1)[None]  # [1, H, S, QK], built once: not part of the work
            backends = _sdpa_backends(dev)

            def sdpa_call(pad_v: bool):
                k_nope, v = expand(lat[:, :R], w_kv_b, H, DN)  # [S, H, nope], [S, H, v]
                k = torch.cat((k_nope, lat[:, None, R:].expand(S, H, DR)), -1)
                if pad_v:  # the fused kernels that want one head dim for Q, K and V
                    v = F.pad(v, (0, QK - DV))
                o = _sdpa(q, k.transpose(0, 1)[None], v.transpose(0, 1)[None], backends)  # [1, H, S, dv]
                return o[..., :DV]
            pad_v = False
            try:
                sdpa_call(False)
            except RuntimeError as e:  # no fused kernel takes V 128 next to Q/K 192 here
                if _is_oom(e):
                    raise
                pad_v = True
            t_sdpa = self.timer(lambda: sdpa_call(pad_v))
            return dict(time_s=t_ours, tflops=fl["total"] / t_ours / 1e12, sdpa_time_s=t_sdpa,
                        sdpa_tflops=fl["total"] / t_sdpa / 1e12, sdpa_v_dim=QK if pad_v else DV,
                        ratio=t_sdpa / t_ours)
        return _unless_oom(row, dev, measure)

    # ---- expansion GEMM vs peak ---------------------------------------------------------------------------------
    def gemm_row(self, S: int, peak_tflops: float) -> dict:
        g = torch.Generator(device=self.device).manual_seed(2)
        lat = torch.randn(S, self.R, device=self.device, generator=g).to(self.dtype)
        w_kv_b = torch.randn(self.H * (self.DN + self.DV), self.R, device=self.device, generator=g).to(self.dtype)
        t = self.timer(lambda: torch.matmul(lat, w_kv_b.T))  # [S, R] x [R, H * (nope + v)], as the reference expands
        flops = self.prefill_flops(S)["expand"]
        return dict(tokens=S, flops=flops, time_s=t, tflops=flops / t / 1e12, frac_peak=flops / t / 1e12 / peak_tflops)


def _unless_oom(row: dict, device, measure) -> dict:
    """row with measure()'s figures; when the estimate of what fits was short (out of memory), a skipped row, so
    that the run goes on with the next. measure's tensors are gone when it returns, and CUDA's cache is emptied."""
    try:
        return dict(row, skipped=None, **measure())
    except RuntimeError as e:
        if not _is_oom(e):
            raise
        return dict(row, skipped="out of memory")
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _sdpa_backends(device):
    """On CUDA the fused SDPA kernels only: never the math fallback, which builds the S x S matrix."""
    if device.type != "cuda":
        return None
    from torch.nn.attention import SDPBackend
    return [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]


def _sdpa(q, k, v, backends):
    if backends is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    from torch.nn.attention import sdpa_kernel
    with sdpa_kernel(backends):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def peak_matmul(n: int, dtype, device, timer: Timer) -> dict:
    g = torch.Generator(device=device).manual_seed(1)
    a = torch.randn(n, n, device=device, generator=g).to(dtype)
    b = torch.randn(n, n, device=device, generator=g).to(dtype)
    t = timer(lambda: torch._int_mm(a, b) if dtype == torch.int8 else a @ b)
    return dict(n=n, flops=2 * n ** 3, time_s=t, tflops=2 * n ** 3 / t / 1e12)


# ---- the whole run --------------------------------------------------------------------------------------------------
def run(config: EngineConfig, kv_cache_dtype: str = "auto", batch=None, ctx=None, prefill=None, min_reps: int = 3,
        progress: bool = True) -> dict:
    """config: resolved (device, dtype, backend, the model's shapes). kv_cache_dtype "auto": the model dtype, int8
    and fp8."""
    device, dtype = config.torch_device, config.torch_dtype
    if dtype == torch.float16 and device.type == "cpu":
        raise ValueError("--dtype float16: use float32 or bfloat16 on the CPU")
    d = DEFAULTS[device.type]
    batch, ctx, prefill = batch or d["batch"], ctx or d["ctx"], prefill or d["prefill"]
    for name, values in (("--kernel-batch", batch), ("--kernel-ctx", ctx), ("--kernel-prefill", prefill)):
        if not values or min(values) < 1:
            raise ValueError(f"{name}: every value must be at least 1, got {','.join(map(str, values))}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timer = Timer(device, min_reps, d["target_s"])
    kb = KernelBench(config, timer)
    out = dict(info=kb.info())

    def bar(items, desc):
        return tqdm(items, desc=desc, file=sys.stderr, leave=False, disable=not progress)

    out["copy"] = copy_bandwidth(device, timer, d["copy_bytes"])
    bw = out["copy"]["gbps"]
    formats = [config.dtype, "int8", "fp8"] if kv_cache_dtype == "auto" else [kv_cache_dtype]
    configs = [(b, c, f) for b in batch for c in ctx for f in formats]
    out["decode"] = []
    for i, (b, c, f) in enumerate(bar(configs, "decode")):
        r = kb.decode_row(b, c, f, seed=i)
        if r["skipped"] is None:
            r["frac_copy_bw"] = r["gbps"] / bw
        out["decode"].append(r)
    out["prefill"] = [kb.prefill_row(S, seed=i) for i, S in enumerate(bar(prefill, "prefill"))]
    out["gemm_peak"] = peak_matmul(d["peak_n"], dtype, device, timer)
    out["gemm"] = [kb.gemm_row(S, out["gemm_peak"]["tflops"]) for S in bar(prefill, "gemm")]
    return out


def report(r: dict, output: str = "md") -> str:
    return json.dumps(r, indent=1) if output == "json" else markdown(r)


def _sig(x: float) -> str:
    """Three significant digits, without switching to exponents for the small numbers of a CPU."""
    if x >= 100:
        return f"{x:.0f}"
    return f"{x:.{max(0, 2 - math.floor(math.log10(x)))}f}" if x > 0 else f"{x:g}"


def _size(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def markdown(r: dict) -> str:
    i = r["info"]
    lines = [f"device: {i['device_name']} | dtype {i['dtype']} | backend {i['backend']} | torch {i['torch']} | "
             f"triton {i['triton'] or '-'} | threads {i['threads']}",
             f"shapes: {os.path.basename(i['model'])} attention, {i['heads']} heads, kv_lora_rank {i['kv_lora_rank']}, "
             f"rope {i['rope_dim']}, block size {i['block_size']}", ""]
    c = r["copy"]
    lines += ["## copy bandwidth", "", "| bytes | time ms | GB/s (2 x bytes / time) |", "|---|---|---|",
              f"| {c['bytes'] / 2**20:.0f} MiB | {c['time_s'] * 1e3:.3f} | {_sig(c['gbps'])} |", ""]
    lines += [f"## absorbed decode (kernels.mla_decode, backend {i['backend']})", "",
              "bytes = batch x ctx x bytes/token of the cache + queries + outputs; one query token per sequence"
              + ("; the torch backend dequantizes int8/fp8 blocks before the reference, so its packed rows move far "
                 "more than these bytes" if i["backend"] == "torch" else ""), "",
              "| batch | ctx | cache | B/token | MiB read | time ms | GB/s | of copy BW |", "|---|---|---|---|---|---|---|---|"]
    for d in r["decode"]:
        head = f"| {d['batch']} | {_size(d['ctx'])} | {d['cache']} | {d['bytes_per_token']} |"
        if d["skipped"]:
            lines.append(f"{head} skipped: {d['skipped']} | - | - | - |")
        else:
            lines.append(f"{head} {d['bytes'] / 2**20:.1f} | {d['time_s'] * 1e3:.3f} | {_sig(d['gbps'])} | "
                         f"{_sig(d['frac_copy_bw'] * 100)}% |")
    lines += ["", f"## expanded prefill (kernels.mla_prefill, backend {i['backend']}) vs torch SDPA", "",
              "one sequence, empty prefix, causal; FLOPs = QK^T 2·S·S/2·H·192 + PV 2·S·S/2·H·128 + expansion "
              "2·S·512·H·256; SDPA side: the same expansion with torch.matmul, then SDPA(is_causal=True)", "",
              "| tokens | GFLOP | ours ms | ours TFLOP/s | SDPA ms | SDPA TFLOP/s | SDPA V dim | ours / SDPA |",
              "|---|---|---|---|---|---|---|---|"]
    for p in r["prefill"]:
        head = f"| {_size(p['tokens'])} | {p['flops'] / 1e9:.2f} |"
        if p["skipped"]:
            lines.append(f"{head} skipped: {p['skipped']} | - | - | - | - | - |")
        else:
            lines.append(f"{head} {p['time_s'] * 1e3:.2f} | {_sig(p['tflops'])} | {p['sdpa_time_s'] * 1e3:.2f} | "
                         f"{_sig(p['sdpa_tflops'])} | {p['sdpa_v_dim']}{' (padded)' if p['sdpa_v_dim'] != 128 else ''} | "
                         f"{p['ratio']:.2f}x |")
    pk = r["gemm_peak"]
    lines += ["", "## expansion GEMM (torch.matmul [S, 512] x [512, H·256]) vs peak", "",
              f"peak: {pk['n']}x{pk['n']} @ {pk['n']}x{pk['n']} matmul in {i['dtype']}: {pk['time_s'] * 1e3:.2f} ms, "
              f"{_sig(pk['tflops'])} TFLOP/s", "",
              "| tokens | GFLOP | time ms | TFLOP/s | of peak |", "|---|---|---|---|---|"]
    for m in r["gemm"]:
        lines.append(f"| {_size(m['tokens'])} | {m['flops'] / 1e9:.2f} | {m['time_s'] * 1e3:.3f} | {_sig(m['tflops'])} | "
                     f"{_sig(m['frac_peak'] * 100)}% |")
    return "\n".join(lines)
