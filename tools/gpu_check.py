"""mla bench --kernels --compile-for sm_80,sm_90: every Triton kernel the engine can launch, compiled ahead of time
for a GPU that is not here, at the configurations its launchers choose, with the resources the cubin reports and a
static roofline.

How: each launcher (kernels/triton_*.py) is called, inside triton_common.compiling_for(a target of that GPU's kind),
on arguments of the real shapes and dtypes (the large ones on the meta device, so nothing is allocated or computed),
with the Triton launch intercepted: what it would launch (kernel, arguments, constexprs, warps, stages) is compiled
by triton.compile for GPUTarget("cuda", arch), and the cubin's registers, stack (spills) and shared memory are read
with the cuobjdump that ships in Triton's NVIDIA backend. Occupancy follows from the registers and shared memory;
the roofline from the bytes and FLOPs of the launch over the device's published bandwidth and dense bf16 peak."""
import dataclasses
import math
import os
import re
import subprocess
import sys
import tempfile

import torch

TARGETS = {  # per SM: 64K registers, 64 warps, 32 blocks; shared memory per block (opt-in) and per SM
    "sm_80": dict(arch=80, gpu="A100", sms=108, smem_block=163 << 10, smem_sm=164 << 10, bw=2.0e12, flops=312e12),
    "sm_90": dict(arch=90, gpu="H100", sms=132, smem_block=227 << 10, smem_sm=228 << 10, bw=3.35e12, flops=989e12),
}
REGS_PER_SM, MAX_WARPS, MAX_BLOCKS = 65536, 64, 32
TORCH_TO_TRITON = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32",
                   torch.int64: "i64", torch.int8: "i8", torch.uint8: "u8", torch.float8_e4m3fn: "fp8e4nv"}


@dataclasses.dataclass
class Launch:
    kernel: object  # the JITFunction
    args: dict  # parameter name -> value
    num_warps: int
    num_stages: int


def _capture(fn):
    """Run fn() with every Triton launch recorded instead of run; returns the launches."""
    from triton.runtime.jit import JITFunction
    launches, real = [], JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        names = [p.name for p in self.params]
        values = dict(zip(names, args))
        values.update({k: v for k, v in kwargs.items() if k in names})
        launches.append(Launch(self, values, kwargs.get("num_warps", 4), kwargs.get("num_stages", 3)))
    JITFunction.run = record
    try:
        fn()
    finally:
        JITFunction.run = real
    return launches


def _aligned(t: torch.Tensor) -> bool:
    offset = t.storage_offset() * t.element_size() if t.device.type == "meta" else t.data_ptr()
    return offset % 16 == 0


def compile_launch(launch: Launch, arch: int):
    """triton.compile of the launch as Triton's launcher would specialise it: pointers and integers divisible by 16
    marked so, integers equal to 1 made constants."""
    import triton
    import triton.knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    sig, constexprs, divisible = {}, {}, []
    for i, p in enumerate(launch.kernel.params):
        v = launch.args[p.name]
        if p.is_constexpr:
            sig[p.name], constexprs[p.name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[p.name] = "*" + TORCH_TO_TRITON[v.dtype]
            if _aligned(v):
                divisible.append(i)
        elif isinstance(v, bool):
            sig[p.name] = "i1"
        elif isinstance(v, int):
            if v == 1:
                sig[p.name], constexprs[p.name] = "constexpr", 1
            else:
                sig[p.name] = "i64" if abs(v) >= 2**31 else "i32"
                if v % 16 == 0:
                    divisible.append(i)
        elif isinstance(v, float):
            sig[p.name] = "fp32"
        else:
            raise TypeError(f"{launch.kernel.__name__}: argument {p.name} of type {type(v).__name__}")
    attrs = {(i,): [["tt.divisibility", 16]] for i in divisible}
    src = ASTSource(fn=launch.kernel, signature=sig, constexprs=constexprs, attrs=attrs)
    # FP fusion as TRITON_DEFAULT_FP_FUSION says (Triton 3.9's default: on), said aloud: Triton warns when left to pick
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": launch.num_warps, "num_stages": launch.num_stages,
                                   "enable_fp_fusion": triton.knobs.language.default_fp_fusion})


def resources(compiled) -> dict:
    """Registers per thread, stack and local bytes (spills), shared memory per block, from the cubin."""
    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    use = {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", text)}
    return dict(regs=use.get("REG", 0), spill=use.get("STACK", 0) + use.get("LOCAL", 0),
                shared=max(use.get("SHARED", 0), compiled.metadata.shared))


def occupancy(regs: int, shared: int, warps: int, t: dict) -> int:
    """Resident warps per SM: limited by registers (allocated per warp in units of 256), shared memory (1 KiB
    reserved per block), warps and blocks."""
    per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    blocks = min(REGS_PER_SM // (per_warp * warps), MAX_WARPS // warps, MAX_BLOCKS)
    if shared:
        blocks = min(blocks, t["smem_sm"] // (shared + 1024))
    return blocks * warps


# ---- the launches, at the shapes of a model ---------------------------------------------------------------------------
def _meta(*shape, dtype):
    return torch.empty(*shape, dtype=dtype, device="meta")


def scenarios(cfg, dtype) -> list:
    """(kernel family, configuration, launcher call, bytes, FLOPs) for the launches the engine makes with this model:
    decode (one token of 1 and 64 sequences over 4096 cached tokens) and a 256-token prompt, every cache format,
    weight-only int8 / int4 linears (a decode row and a prompt) and the grouped MoE (float, int8, int4)."""
    from kernels import cache_write, triton_decode, triton_moe, triton_prefill, triton_quant_linear
    from kernels.cache_format import CacheFormat
    from kernels.weights import empty_quant
    H, R, DR, DN, DV = (cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.qk_nope_head_dim,
                        cfg.v_head_dim)
    D, I, E, k = cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts, cfg.num_experts_per_tok
    elt, BS = dtype.itemsize, 64
    dname = TORCH_TO_TRITON[dtype]
    out = []
    for cname in (str(dtype).removeprefix("torch."), "int8", "fp8"):
        fmt = CacheFormat(cname, R, DR, dtype)
        cache = _meta(1 + 64 * 4096 // BS, BS, fmt.width, dtype=fmt.dtype)
        T = 64
        out.append(("cache write", f"{dname} {cname} T={T}",
                    lambda fmt=fmt, cache=cache: cache_write.write_latent(
                        cache, torch.arange(T), torch.zeros(T, R, dtype=dtype), torch.zeros(T, DR, dtype=dtype), fmt),
                    T * (R + DR) * elt + T * fmt.bytes_per_token, 0))
        for B, ctx in ((1, 4096), (64, 4096)):
            nb = ctx // BS
            tables = torch.arange(B * nb, dtype=torch.int32).view(B, nb)

            def decode(B=B, ctx=ctx, fmt=fmt, cache=cache, tables=tables):
                triton_decode.mla_decode(torch.zeros(B, H, R, dtype=dtype), torch.zeros(B, H, DR, dtype=dtype), cache,
                                         tables, torch.arange(B + 1, dtype=torch.int32),
                                         torch.full((B,), ctx, dtype=torch.int32), DR ** -0.5, fmt)
            out.append(("absorbed decode", f"{dname} {cname} batch {B} ctx {ctx}", decode,
                        B * ctx * fmt.bytes_per_token + B * H * (2 * R + DR) * elt, 2 * B * H * ctx * (2 * R + DR)))
        S = 256  # tiles of 64 queries and keys; the launcher expands the cache on the CPU (fp16 GEMMs are slow there)

        def prefill(fmt=fmt):  # the launcher gathers and expands the cache in torch: real (small) tensors
            nb = S // BS
            triton_prefill.mla_prefill(torch.zeros(S, H, DN, dtype=dtype), torch.zeros(S, H, DR, dtype=dtype),
                                       torch.zeros(nb, BS, fmt.width, dtype=fmt.dtype),
                                       torch.arange(nb, dtype=torch.int32)[None], torch.tensor([0, S], dtype=torch.int32),
                                       torch.tensor([S], dtype=torch.int32), torch.zeros(H * (DN + DV), R, dtype=dtype),
                                       (DN + DR) ** -0.5, fmt)
        out.append(("expanded prefill", f"{dname} {cname} {S} tokens", prefill,
                    S * H * (DN + DR + DN + 2 * DV) * elt, S * S * H * (DN + DR + DV)))
    for mode in ("int8", "int4"):
        wb = 1 if mode == "int8" else 0.5
        qw = empty_quant((I * max(1, cfg.n_shared_experts) * 2, D), mode, "meta", "triton")
        N, K = qw.shape
        for M in (1, 512):
            out.append(("quant linear", f"{dname} {mode} M={M} N={N} K={K} ({'split-K' if M == 1 else 'plain'})",
                        lambda qw=qw, M=M: triton_quant_linear.quant_linear(torch.zeros(M, K, dtype=dtype), qw),
                        N * K * wb + M * (K + N) * elt, 2 * M * N * K))
    for wname in ("float", "int8", "int4"):
        if wname == "float":
            w13, w2, wb = _meta(E, 2 * I, D, dtype=dtype), _meta(E, D, I, dtype=dtype), elt
        else:
            w13, w2 = empty_quant((2 * I, D), wname, "meta", "triton", E), empty_quant((D, I), wname, "meta", "triton", E)
            wb = 1 if wname == "int8" else 0.5
        for T in (1, 512):
            used = min(E, T * k)
            out.append(("grouped MoE", f"{dname} {wname} experts, {T} tokens x top-{k} of {E}",
                        lambda w13=w13, w2=w2, T=T: triton_moe.moe_experts(
                            torch.zeros(T, D, dtype=dtype), (torch.arange(T * k) % E).view(T, k),
                            torch.full((T, k), 1.0 / k), w13, w2),
                        used * 3 * I * D * wb + T * k * (2 * D + 2 * I) * elt, 2 * T * k * 3 * I * D))
    return out


def run(config_files: list[str], targets: list[str], dtypes=(torch.bfloat16, torch.float16), progress=True) -> list:
    """One row per kernel x configuration x target."""
    from kernels.triton_common import Target, compiling_for
    from models.config import ModelConfig
    from tqdm import tqdm
    for t in targets:
        if t not in TARGETS:
            raise ValueError(f"--compile-for {t}: unknown target (known: {', '.join(TARGETS)})")
    rows = []
    jobs = [(f, dt, t) for f in config_files for dt in dtypes for t in targets]
    for file, dtype, tname in tqdm(jobs, desc="compile", file=sys.stderr, leave=False, disable=not progress):
        cfg, t = ModelConfig.from_hf(file), TARGETS[tname]
        for family, conf, call, nbytes, flops in scenarios(cfg, dtype):
            with compiling_for(Target(True, t["sms"])), torch.inference_mode():
                launches = _capture(call)
            best = max(nbytes / t["bw"], flops / t["flops"])
            for launch in launches:
                row = dict(model=os.path.basename(file), family=family, config=conf, target=tname, gpu=t["gpu"],
                           kernel=launch.kernel.__name__, warps=launch.num_warps, stages=launch.num_stages,
                           bytes=nbytes, flops=flops, best_time_s=best)
                try:
                    res = resources(compile_launch(launch, t["arch"]))
                except Exception as e:  # reported, and the run fails
                    rows.append(dict(row, error=" ".join(str(e).split())[:300]))
                    continue
                warps = occupancy(res["regs"], res["shared"], launch.num_warps, t)
                problems = []
                if res["spill"]:
                    problems.append(f"spills {res['spill']} B")
                if res["shared"] > t["smem_block"]:
                    problems.append(f"shared {res['shared'] >> 10} KiB > {t['smem_block'] >> 10} KiB")
                flags = []
                if family == "absorbed decode" and warps // launch.num_warps < 2:
                    flags.append("fewer than 2 blocks per SM")
                rows.append(dict(row, **res, resident_warps=warps, error="; ".join(problems) or None,
                                 flag="; ".join(flags) or None))
    return rows


def markdown(rows: list) -> str:
    lines = ["| model | kernel | configuration | target | warps | regs | spill B | shared KiB | resident warps/SM | "
             "best time (roofline) | note |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "regs" not in r:
            lines.append(f"| {r['model']} | {r['kernel']} | {r['config']} | {r['target']} | {r['warps']} | - | - | - | "
                         f"- | - | FAILED: {r['error']} |")
            continue
        t = r["best_time_s"]
        lines.append(f"| {r['model']} | {r['kernel']} | {r['config']} | {r['target']} ({r['gpu']}) | {r['warps']} | "
                     f"{r['regs']} | {r['spill']} | {r['shared'] / 1024:.1f} | {r['resident_warps']} | "
                     f"{t * 1e6:.1f} us | {r['error'] or r['flag'] or ''} |")
    failed = [r for r in rows if r.get("error")]
    lines.append("")
    lines.append(f"{len(rows)} compiled launches, {len(failed)} failing (compile error, spill or shared memory over "
                 "the limit)")
    return "\n".join(lines)
