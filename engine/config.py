"""EngineConfig: every setting of an engine in one frozen object, and resolve(), the one place where "auto" is
settled (device, dtype, backend, attention threshold, cache format, weight format, context, cache budget).

The allowed values of each setting are listed here once; the CLI builds its choices from these tuples."""
import json
import os
import sys
from dataclasses import dataclass, field, replace

import torch

from kernels import CacheFormat, WeightFormat
from kernels.cache_format import NAMES as CACHE_FORMATS
from models.config import ModelConfig
from models.errors import ModelError

DTYPES = ("auto", "float32", "float16", "bfloat16")
ATTN_MODES = ("auto", "absorbed", "expanded")
BACKENDS = ("auto", "triton", "torch")
KV_CACHE_DTYPES = ("auto",) + CACHE_FORMATS
LOAD_FORMATS = ("auto", "dummy")  # dummy: random weights of the config's shapes (no weight files read)
WEIGHT_DTYPES = ("int8", "int4")  # weight-only quantization of the linears and experts; None keeps the model dtype
CPU_CACHE_GIB = 4.0  # default KV cache budget on the CPU
CUDA_CACHE_FRACTION = 0.85  # default on CUDA: this share of what is free after the weights and workspace
# Query tokens per sequence from which the expanded path serves a forward pass, per device kind, unless `mla tune`
# measured this device (TUNED_FILE). cpu: measured by `mla tune` (bench/results/tune-cpu.md); cuda: vLLM's
# FlashMLA crossover until measured on a GPU.
MLA_THRESHOLD = {"cpu": 256, "cuda": 128}
TUNED_FILE = os.environ.get("MLA_ENGINE_TUNED", os.path.join(os.path.expanduser("~"), ".cache", "mla-engine",
                                                              "mla_threshold.json"))


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
    model_config: ModelConfig | None = field(default=None, repr=False, compare=False)  # set by resolve()

    def __post_init__(self):
        _choice("dtype", self.dtype, DTYPES)
        _choice("attn_mode", self.attn_mode, ATTN_MODES)
        _choice("backend", self.backend, BACKENDS)
        _choice("kv_cache_dtype", self.kv_cache_dtype, KV_CACHE_DTYPES)
        _choice("load_format", self.load_format, LOAD_FORMATS)
        if self.weight_dtype is not None:
            _choice("weight_dtype", self.weight_dtype, WEIGHT_DTYPES)
        if self.mla_threshold is not None and self.mla_threshold < 1:
            raise ValueError(f"mla_threshold={self.mla_threshold}: must be at least 1")
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
        elif model_cfg.torch_dtype == "float32" or not cpu_has_bf16():
            dtype = "float32"
        else:  # a bf16 (or fp16) checkpoint on a CPU with bf16 arithmetic: its GEMMs run 3x faster than fp32
            dtype = "bfloat16"
        backend = self.backend if self.backend != "auto" else ("triton" if device.type == "cuda" else "torch")
        if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("backend='triton' on the CPU needs TRITON_INTERPRET=1")
        max_len = min(model_cfg.max_position_embeddings, self.max_model_len or model_cfg.max_position_embeddings)
        self._check_split(model_cfg)
        n = self.tensor_parallel_size
        if n > 1 and device.type == "cuda" and torch.cuda.device_count() < (device.index or 0) + n:
            raise ValueError(f"tensor_parallel_size={n} needs {n} CUDA devices, {torch.cuda.device_count()} present")
        resolved = replace(self, device=str(device), dtype=dtype, backend=backend,
                           kv_cache_dtype=dtype if self.kv_cache_dtype == "auto" else self.kv_cache_dtype,
                           mla_threshold=self.mla_threshold or tuned_threshold(device) or MLA_THRESHOLD[device.type],
                           max_model_len=max_len, model_config=model_cfg)
        return resolved._plan_memory() if plan_memory else resolved

    def _check_split(self, cfg: ModelConfig):
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

    def _plan_memory(self) -> "EngineConfig":
        """The cache budget, and the check that weights, workspace and cache fit in what the device has available
        (MemAvailable on the CPU, free memory on CUDA). The default CPU budget shrinks to what is left, and says so."""
        from models.loader import available_memory
        device = self.torch_device
        free = available_memory(device)
        weights, work, least = self.weight_bytes(), self.workspace_bytes(), self.least_cache_bytes()
        left = free - weights - work
        gib = self.kv_cache_memory_gib
        if self.kv_cache_tokens is not None:
            gib = self.cache_bytes(self.kv_cache_tokens) / 2**30
        elif gib is None:
            if device.type == "cuda":
                gib = CUDA_CACHE_FRACTION * left / 2**30
            else:
                gib = min(CPU_CACHE_GIB, 0.9 * left / 2**30)  # a tenth of what is left stays for everything else
                if least <= gib * 2**30 < CPU_CACHE_GIB * 2**30 and self.progress:
                    print(f"mla: KV cache {gib:.2f} GiB, what is left after the weights (the default is "
                          f"{CPU_CACHE_GIB:g} GiB)", file=sys.stderr)
        small = self.kv_cache_memory_gib is None and self.kv_cache_tokens is None and gib * 2**30 < least  # an explicit budget is the user's to size
        if small or weights + work + gib * 2**30 > free:
            raise ModelError(self._does_not_fit(free, least))
        return replace(self, kv_cache_memory_gib=gib)

    def _does_not_fit(self, free: int, least: int) -> str:
        def need(c):
            return (c.weight_bytes() + c.workspace_bytes() + least) / 2**30
        name = os.path.basename(os.path.normpath(self.model))
        msg = (f"{name} needs {need(self):.1f} GiB in {self.dtype}"
               f"{f' with {self.weight_dtype} weights' if self.weight_dtype else ''} (weights, workspace and the "
               f"least KV cache), {free / 2**30:.1f} GiB available on {self.device}")
        others = [f"--weight-dtype {w} needs {need(replace(self, weight_dtype=w)):.1f} GiB" for w in WEIGHT_DTYPES
                  if w != self.weight_dtype]
        return msg + ("; " + ", ".join(others) if others else "")

    def least_cache_bytes(self) -> int:
        """The least default cache: one sequence of up to 4096 tokens (or the whole context, if shorter)."""
        tokens = -(-min(self.max_model_len, 4096) // self.block_size) * self.block_size + self.block_size  # + pad
        return tokens * self.model_config.num_hidden_layers * self.cache_format.bytes_per_token

    def cache_blocks(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def cache_bytes(self, tokens: int) -> int:
        """What a cache of this many tokens (whole blocks, and the padding block) takes."""
        per_block = self.block_size * self.model_config.num_hidden_layers * self.cache_format.bytes_per_token
        return (self.cache_blocks(tokens) + 1) * per_block

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
        return WeightFormat(self.torch_dtype, self.torch_device, self.weight_dtype, self.backend)

    @property
    def cache_format(self) -> CacheFormat:
        cfg = self.model_config
        self._need_resolved()
        return CacheFormat(self.kv_cache_dtype, cfg.kv_lora_rank, cfg.qk_rope_head_dim, self.torch_dtype)

    def weight_bytes(self) -> int:
        """The model's weights in their stored form, counted on the meta device (nothing allocated)."""
        from models.deepseek import DeepseekModel
        from models.parallel import Parallel
        meta = replace(self.weight_format, device=torch.device("meta"))
        return DeepseekModel(self.model_config, meta, Parallel(0, self.tensor_parallel_size)).nbytes()  # per rank

    def workspace_bytes(self) -> int:
        """A bound on the activations of one forward pass of max_num_batched_tokens tokens: the routed experts'
        gathered rows and their gate/up outputs (k + 1 per token), the hidden state and its residuals, in float32."""
        cfg = self.model_config
        T, k = self.max_num_batched_tokens, max(cfg.num_experts_per_tok, 1)
        inter = max(cfg.intermediate_size, cfg.moe_intermediate_size * k)
        return T * ((k + 4) * cfg.hidden_size + 3 * inter) * 4


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512_BF16 or AMX), as /proc/cpuinfo lists its flags."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


# ---- the measured absorbed/expanded threshold, per device kind ------------------------------------------------------
def device_kind(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def tuned_threshold(device: torch.device) -> int | None:
    try:
        with open(TUNED_FILE) as f:
            value = json.load(f).get(device_kind(device))
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and value >= 1 else None


def save_tuned_threshold(device: torch.device, threshold: int) -> str:
    try:
        with open(TUNED_FILE) as f:
            table = json.load(f)
    except (OSError, ValueError):
        table = {}
    table = table if isinstance(table, dict) else {}
    table[device_kind(device)] = threshold
    os.makedirs(os.path.dirname(TUNED_FILE) or ".", exist_ok=True)
    with open(TUNED_FILE, "w") as f:
        json.dump(table, f, indent=1)
    return TUNED_FILE
