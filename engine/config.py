"""EngineConfig: every setting of an engine in one frozen object, and resolve(), the one place where "auto" is
settled (device, dtype, backend, attention threshold, cache format, weight format, context, cache budget). The cache
budget is the memory plan's (engine/memory.py); a threshold `mla tune` measured is read through engine/tune.py.

The allowed values of each setting are listed here once; the CLI builds its choices from these tuples."""
import os
from dataclasses import dataclass, field, replace

import torch

from kernels import CacheFormat, WeightFormat
from kernels.cache_format import NAMES as CACHE_FORMATS
from kernels.cpu import cpu_flags
from models.config import ModelConfig
from models.errors import ModelError

from .tune import tuned_threshold

DTYPES = ("auto", "float32", "float16", "bfloat16")
ATTN_MODES = ("auto", "absorbed", "expanded")
BACKENDS = ("auto", "triton", "torch")
KV_CACHE_DTYPES = ("auto",) + CACHE_FORMATS
LOAD_FORMATS = ("auto", "dummy")  # dummy: random weights of the config's shapes (no weight files read)
# How the linears and experts are stored (kernels/weights.py WeightFormat): weight-only quantization, or bfloat16
# under a float32 model; None keeps the model dtype. A bf16 checkpoint computed in float32 on the CPU (no bf16
# arithmetic there) keeps its float weights in bf16 by default (float_weight_dtype; the linears too unless they are
# quantized): the same products from half the bytes.
QUANT_WEIGHT_DTYPES = ("int8", "int4")
WEIGHT_DTYPES = QUANT_WEIGHT_DTYPES + ("bfloat16",)
# How prompts multiply int8 / int4 weights on the CPU (kernels/matmul.py): dequantized into a GEMM in the model dtype,
# or int8 x int8 (activations quantized per token; float32 models only). auto: int8 where the CPU has VNNI and no bf16
# arithmetic, so that the model runs in float32, whose GEMM is about 4x slower there than the int8 one.
PREFILL_GEMMS = ("auto", "dequantize", "int8")
# Query tokens per sequence from which the expanded path serves a forward pass, per device kind, unless `mla tune`
# measured this device (engine/tune.py). cpu: measured by `mla tune` (bench/results/tune-cpu.md); cuda: vLLM's
# FlashMLA crossover until measured on a GPU.
MLA_THRESHOLD = {"cpu": 256, "cuda": 128}


def _choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name}={value!r}: must be one of {', '.join(map(str, allowed))}")


@dataclass(frozen=True)
class EngineConfig:
    model: str  # checkpoint folder (or, for benches that build no model, a config.json)
    device: str | None = None  # None: cuda when present
    dtype: str = "auto"
    attn_mode: str = "auto"
    kv_cache_dtype: str = "auto"
    backend: str = "auto"
    mla_threshold: int | None = None
    weight_dtype: str | None = None
    kv_cache_memory_gib: float | None = None
    kv_cache_tokens: int | None = None  # the cache's capacity in tokens (whole blocks); set, it decides the budget
    enable_prefix_caching: bool = True
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 4096
    block_size: int = 64
    max_model_len: int | None = None
    enforce_eager: bool = False
    seed: int = 0
    progress: bool = True
    load_format: str = "auto"
    tensor_parallel_size: int = 1
    threads: int | None = None  # CPU threads per rank (torch's and the C++ kernels'); None: the cores shared out
    prefill_gemm: str = "auto"
    float_weight_dtype: str | None = None  # set by resolve(): "bfloat16" where float weights are kept in bf16
    model_config: ModelConfig | None = field(default=None, repr=False, compare=False)  # set by resolve()

    def __post_init__(self):
        _choice("dtype", self.dtype, DTYPES)
        _choice("attn_mode", self.attn_mode, ATTN_MODES)
        _choice("backend", self.backend, BACKENDS)
        _choice("kv_cache_dtype", self.kv_cache_dtype, KV_CACHE_DTYPES)
        _choice("load_format", self.load_format, LOAD_FORMATS)
        _choice("prefill_gemm", self.prefill_gemm, PREFILL_GEMMS)
        _choice("float_weight_dtype", self.float_weight_dtype, (None, "bfloat16"))
        if self.weight_dtype is not None:
            _choice("weight_dtype", self.weight_dtype, WEIGHT_DTYPES)
        if self.mla_threshold is not None and self.mla_threshold < 1:
            raise ValueError(f"mla_threshold={self.mla_threshold}: must be at least 1")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads={self.threads}: must be at least 1")
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "tensor_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be at least 1")
        if self.kv_cache_memory_gib is not None and not self.kv_cache_memory_gib > 0:
            raise ValueError(f"kv_cache_memory_gib={self.kv_cache_memory_gib}: must be positive")
        if self.kv_cache_tokens is not None and self.kv_cache_tokens < 1:
            raise ValueError(f"kv_cache_tokens={self.kv_cache_tokens}: must be at least 1")


    # ---- resolution -----------------------------------------------------------------------------------------------
    def resolve(self, plan_memory: bool = True) -> "EngineConfig":
        """A copy with every "auto" settled, the model's config read, and (plan_memory) the cache budget set."""
        if self.model_config is not None:
            return self
        model_cfg = ModelConfig.from_hf(self.model)
        device = self._device()
        if self.dtype != "auto":
            dtype = self.dtype
        elif device.type == "cuda":
            dtype = model_cfg.torch_dtype
        elif model_cfg.torch_dtype == "float32" or not cpu_bf16_gemm():
            dtype = "float32"
        else:  # a bf16 (or fp16) checkpoint on a CPU whose bf16 GEMM runs faster than its fp32 one
            dtype = "bfloat16"
        backend = self.backend if self.backend != "auto" else ("triton" if device.type == "cuda" else "torch")
        if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("backend='triton' on the CPU needs TRITON_INTERPRET=1")
        max_len = min(model_cfg.max_position_embeddings, self.max_model_len or model_cfg.max_position_embeddings)
        self.check_split(model_cfg)
        n = self.tensor_parallel_size
        if n > 1 and device.type == "cuda" and torch.cuda.device_count() < (device.index or 0) + n:
            raise ValueError(f"tensor_parallel_size={n} needs {n} CUDA devices, {torch.cuda.device_count()} present")
        bf16_float = self._bf16_float_weights(device, dtype, backend)
        resolved = replace(self, device=str(device), dtype=dtype, backend=backend,
                           weight_dtype=self.weight_dtype if self.weight_dtype in QUANT_WEIGHT_DTYPES else
                           ("bfloat16" if bf16_float else None),
                           float_weight_dtype="bfloat16" if bf16_float else None,
                           prefill_gemm=self._prefill_gemm(device, dtype, backend),
                           kv_cache_dtype=dtype if self.kv_cache_dtype == "auto" else self.kv_cache_dtype,
                           mla_threshold=self.mla_threshold or tuned_threshold(device) or MLA_THRESHOLD[device.type],
                           max_model_len=max_len, model_config=model_cfg)
        if not plan_memory:
            return resolved
        from . import memory  # memory.py reads EngineConfig's fields: imported where used
        return memory.plan_memory(resolved)

    def _bf16_float_weights(self, device: torch.device, dtype: str, backend: str) -> bool:
        """Whether the float weights (those not quantized) are kept in bf16: asked for (weight_dtype bfloat16), or a
        bf16 checkpoint computed in float32 on the CPU; only under a float32 model on the torch backend."""
        if self.weight_dtype == "bfloat16" and (backend != "torch" or dtype not in ("float32", "bfloat16")):
            raise ValueError("weight_dtype='bfloat16' stores the weights of a float32 model (or a bfloat16 one, "
                             "where it changes nothing) with the torch backend")
        if dtype != "float32" or backend != "torch":
            return False
        return self.weight_dtype == "bfloat16" or self.float_weight_dtype == "bfloat16" or (
            device.type == "cpu" and self._checkpoint_dtype() == torch.bfloat16)

    def _checkpoint_dtype(self) -> torch.dtype | None:
        """The dtype the checkpoint stores its weights in (not config.json's torch_dtype, which need not match);
        None for random weights (made in float32) or where there is only a config.json."""
        if self.load_format == "dummy" or not os.path.isdir(self.model):
            return None
        from models.loader import stored_dtype
        return stored_dtype(self.model)

    def _prefill_gemm(self, device: torch.device, dtype: str, backend: str) -> str:
        cpu_quant = device.type == "cpu" and backend == "torch" and self.weight_dtype in QUANT_WEIGHT_DTYPES
        if self.prefill_gemm == "int8" and not (cpu_quant and dtype == "float32"):
            raise ValueError("prefill_gemm='int8' is for int8 / int4 weights (weight_dtype) in a float32 model on the "
                             "CPU with the torch backend")
        if self.prefill_gemm != "auto":
            return self.prefill_gemm
        flags = cpu_flags()
        vnni = "avx512_vnni" in flags or "avx_vnni" in flags
        return "int8" if cpu_quant and dtype == "float32" and vnni and not cpu_bf16_gemm() else "dequantize"

    def check_split(self, cfg: ModelConfig):
        """Over several ranks every split dimension must divide evenly (models/parallel.py)."""
        n = self.tensor_parallel_size
        dims = {"num_attention_heads": cfg.num_attention_heads, "vocab_size": cfg.vocab_size,
                "intermediate_size": cfg.intermediate_size}
        if cfg.n_routed_experts:
            dims.update({"n_routed_experts": cfg.n_routed_experts,
                         "moe_intermediate_size * n_shared_experts": cfg.moe_intermediate_size * cfg.n_shared_experts})
        for name, v in dims.items():
            if v % n:
                raise ModelError(f"{self.model}: {name}={v} cannot be split over tensor_parallel_size={n}")

    def _device(self) -> torch.device:
        name = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            device = torch.device(name)
        except RuntimeError:
            raise ValueError(f"device={name!r}: not a device (cpu or cuda[:N])") from None
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"device={name!r}: only cpu and cuda[:N] are supported")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={name!r}: CUDA is not available on this machine")
        return device

    # ---- what the resolved settings stand for ---------------------------------------------------------------------
    def _need_resolved(self):
        if self.model_config is None:
            raise RuntimeError("EngineConfig.resolve() first")

    @property
    def torch_device(self) -> torch.device:
        self._need_resolved()
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        self._need_resolved()
        return getattr(torch, self.dtype)

    @property
    def weight_format(self) -> WeightFormat:
        quant = self.weight_dtype if self.weight_dtype in QUANT_WEIGHT_DTYPES else None
        return WeightFormat(self.torch_dtype, self.torch_device, quant, self.backend,
                            torch.bfloat16 if self.float_weight_dtype == "bfloat16" else None)

    @property
    def cache_format(self) -> CacheFormat:
        cfg = self.model_config
        self._need_resolved()
        return CacheFormat(self.kv_cache_dtype, cfg.kv_lora_rank, cfg.qk_rope_head_dim, self.torch_dtype)


def cpu_bf16_gemm() -> bool:
    """Whether this CPU's bf16 GEMM outruns its float32 one: with AMX. AVX512_BF16 alone does not (oneDNN's bf16 GEMM
    ran at 0.6x the float32 one, and a bf16 model's prompts at 0.6x a float32 model's over the same bf16 weights, on a
    Xeon with AVX512_BF16 and no AMX: bench/results/cpu-xeon-avx512bf16-2026-12-07.md)."""
    return "amx_bf16" in cpu_flags()
