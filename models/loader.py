"""safetensors checkpoint -> DeepseekModel: memory-mapped, tensor by tensor, every tensor checked by name and shape."""
import contextlib
import json
import math
import os
import re
import sys

import torch
from safetensors import safe_open
from tqdm import tqdm

from kernels.weights import WeightFormat, store

from .config import ModelConfig
from .deepseek import DeepseekModel
from .errors import ModelError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
INDEX = "model.safetensors.index.json"
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "I32": 4, "I64": 8, "F64": 8}


def checkpoint_files(path: str) -> list[str]:
    """The safetensors shards of a checkpoint folder, checked to exist."""
    index = os.path.join(path, INDEX)
    if os.path.exists(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise ModelError(f"{index}: not a valid safetensors index ({e.__class__.__name__}: {e})") from None
        files = sorted(set(weight_map.values()))
        for name in files:
            if not os.path.exists(os.path.join(path, name)):
                raise ModelError(f"{os.path.join(path, name)}: shard named in {INDEX} is missing")
        return [os.path.join(path, name) for name in files]
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if files:
        return [os.path.join(path, f) for f in files]
    pickles = sorted(f for f in os.listdir(path) if f.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise ModelError(f"{os.path.join(path, pickles[0])}: pickle checkpoints are refused because loading them can run "
                         "arbitrary code; convert the checkpoint to safetensors")
    raise ModelError(f"{path}: no weights found (expected model.safetensors or {INDEX} with shards)")


def _open(file: str):
    try:
        return safe_open(file, framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error types for truncated or garbage files
        raise ModelError(f"{file}: not a valid safetensors file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def _listing(names: list[str], limit: int = 5) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def available_memory(device: torch.device) -> int:
    """Bytes that can be allocated now: free device memory on CUDA; on the CPU the kernel's MemAvailable, which
    counts the reclaimable page cache (right after copying a checkpoint, most of memory is page cache)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def load_model(path: str, fmt: WeightFormat, cfg: ModelConfig | None = None, progress: bool = True) -> DeepseekModel:
    """The checkpoint at path in the stored form fmt says. Streaming: each tensor is read from its memory-mapped
    shard, converted (dtype, quantization) straight into its place in the model, and dropped before the next one,
    so the float model is never held in memory."""
    if not os.path.isdir(path):
        raise ModelError(f"{path}: no such model folder")
    cfg = cfg or ModelConfig.from_hf(path)
    files = checkpoint_files(path)
    model = DeepseekModel(cfg, fmt)
    expected: dict[str, list] = {}
    for name, target in model.weights():
        expected.setdefault(name, []).append(target)

    # Pass 1, headers only: every expected tensor present once with its shape, nothing unknown.
    where, scales, sizes, problems = {}, {}, {}, []
    for file in files:
        with _open(file) as f:
            for name in f.keys():
                m = _LAYER.match(name)
                if m and int(m.group(1)) >= cfg.num_hidden_layers:
                    continue  # multi-token-prediction layers (V3): not used for generation
                if name == "lm_head.weight" and cfg.tie_word_embeddings:
                    continue
                weight = name.removesuffix("_scale_inv")
                if cfg.fp8_block and name.endswith(".weight_scale_inv") and weight in expected:
                    scales[weight] = file  # an fp8 weight's block scales: [rows / block rows, cols / block cols]
                    want = tuple(-(-n // b) for n, b in zip(tuple(expected[weight][0].shape), cfg.fp8_block))
                elif name in expected:
                    where[name] = file
                    want = tuple(expected[name][0].shape)  # a QuantWeight's: its float (N, K)
                else:
                    problems.append(("unexpected", name))
                    continue
                shape = tuple(f.get_slice(name).get_shape())
                if name in where:
                    sizes[name] = math.prod(shape) * _ITEMSIZE.get(f.get_slice(name).get_dtype(), 2)
                if shape != want:
                    problems.append(("misshapen", f"{name} {list(shape)} (expected {list(want)})"))
    missing = [n for n in expected if n not in where]
    if missing or problems:
        parts = [f"missing tensors: {_listing(missing)}"] if missing else []
        for kind in ("misshapen", "unexpected"):
            names = [n for k, n in problems if k == kind]
            if names:
                parts.append(f"{kind} tensors: {_listing(names)}")
        raise ModelError(f"{path}: checkpoint does not match config.json: " + "; ".join(parts))

    # Pass 2: tensor by tensor from the memory-mapped shards into the model's stored form.
    by_file = {}
    for name, file in where.items():
        by_file.setdefault(file, []).append(name)
    bar = tqdm(total=sum(sizes.values()), desc="Loading weights", unit="B", unit_scale=True, unit_divisor=1024,
               disable=not progress, file=sys.stderr, leave=False)
    with contextlib.ExitStack() as shards:
        opened = {file: shards.enter_context(_open(file)) for file in files}
        for file in files:
            for name in by_file.get(file, []):
                tensor = _read(opened[file], file, name)
                if tensor.dtype == torch.float8_e4m3fn:
                    if name not in scales:
                        raise ModelError(f"{file}: fp8 tensor {name} has no {name}_scale_inv "
                                         "(and config.json no fp8 quantization_config)")
                    tensor = dequantize_fp8(tensor, _read(opened[scales[name]], scales[name], name + "_scale_inv"),
                                            cfg.fp8_block)
                for target in expected[name]:
                    store(target, tensor)
                del tensor
                bar.update(sizes[name])
    bar.close()
    return model


def _read(f, file: str, name: str) -> torch.Tensor:
    try:
        return f.get_tensor(name)
    except Exception as e:
        raise ModelError(f"{file}: cannot read tensor {name} ({e})") from None


def dequantize_fp8(w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """DeepSeek-V3's block fp8: w [N, K] e4m3 times one float32 factor per [block rows x block cols] tile."""
    N, K = w.shape
    s = scale_inv.float().repeat_interleave(block[0], 0)[:N].repeat_interleave(block[1], 1)[:, :K]
    return w.float() * s
