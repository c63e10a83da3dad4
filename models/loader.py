"""safetensors checkpoint -> DeepseekModel, streaming: every tensor checked by name and shape from the headers first,
then read one at a time (a plain read into one buffer, no memory map that would keep the file's pages resident),
converted straight into its stored form, and dropped. Peak memory: the model in its final form plus one tensor."""
import json
import math
import struct
import zlib
import os
import re
import sys

import torch
from tqdm import tqdm

from kernels.weights import WeightFormat, store

from .config import ModelConfig
from .deepseek import DeepseekModel
from .errors import ModelError
from .parallel import Parallel

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
INDEX = "model.safetensors.index.json"
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
          "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
MAX_HEADER = 100 << 20
PROGRESS_DELAY = 1.0  # seconds before a progress bar appears: a load that takes less prints nothing


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


class Shard:
    """One safetensors file: its header parsed and checked against the file's size; tensors read with pread."""

    def __init__(self, file: str):
        self.file = file
        try:
            self.fd = os.open(file, os.O_RDONLY)
            size = os.fstat(self.fd).st_size
            n = struct.unpack("<Q", os.pread(self.fd, 8, 0))[0] if size >= 8 else -1
            if not 0 < n <= min(MAX_HEADER, size - 8):
                raise ValueError("truncated, or not a safetensors header")
            header = json.loads(os.pread(self.fd, n, 8))
            if not isinstance(header, dict):
                raise ValueError("the header is not a JSON object")
            header.pop("__metadata__", None)
            self.tensors, self.start = {}, 8 + n
            for name, e in header.items():
                dtype, shape, (b, end) = DTYPES[e["dtype"]], tuple(e["shape"]), e["data_offsets"]
                if not (0 <= b <= end and self.start + end <= size and end - b == math.prod(shape) * dtype.itemsize):
                    raise ValueError(f"tensor {name} lies outside the file (truncated?)")
                self.tensors[name] = (dtype, shape, b)
        except OSError as e:
            raise ModelError(f"{file}: cannot read ({e.strerror})") from None
        except (ValueError, KeyError, TypeError, struct.error, UnicodeDecodeError) as e:
            raise ModelError(f"{file}: not a valid safetensors file ({e})") from None

    def nbytes(self, name: str) -> int:
        dtype, shape, _ = self.tensors[name]
        return math.prod(shape) * dtype.itemsize

    def read(self, name: str) -> torch.Tensor:
        dtype, shape, offset = self.tensors[name]
        buf = torch.empty(self.nbytes(name), dtype=torch.uint8)
        view, done = memoryview(buf.numpy()), 0
        while done < len(view):  # pread may return less than asked
            got = os.preadv(self.fd, [view[done:]], self.start + offset + done)
            if got <= 0:
                raise ModelError(f"{self.file}: cannot read tensor {name} (the file ended early)")
            done += got
        return buf.view(dtype).view(shape)

    def close(self):
        os.close(self.fd)


def stored_dtype(path: str) -> torch.dtype | None:
    """The dtype the checkpoint stores its weight matrices in (read from the first shard's header), or None where
    they differ."""
    shard = Shard(checkpoint_files(path)[0])
    shard.close()
    dtypes = {dtype for dtype, shape, _ in shard.tensors.values() if len(shape) == 2}
    return dtypes.pop() if len(dtypes) == 1 else None


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


def _check(path: str, problems: list, missing: list):
    if missing or problems:
        parts = [f"missing tensors: {_listing(missing)}"] if missing else []
        for kind in ("misshapen", "unexpected"):
            names = [n for k, n in problems if k == kind]
            if names:
                parts.append(f"{kind} tensors: {_listing(names)}")
        raise ModelError(f"{path}: checkpoint does not match config.json: " + "; ".join(parts))


def load_model(path: str, fmt: WeightFormat, cfg: ModelConfig | None = None, progress: bool = True,
               dummy: bool = False, par: Parallel = Parallel(), ops=None) -> DeepseekModel:
    """The checkpoint at path in the stored form fmt says (dummy: random weights of cfg's shapes, made tensor by
    tensor straight into that form; path is then only named), run on the kernel backend ops."""
    if not dummy and not os.path.isdir(path):
        raise ModelError(f"{path}: no such model folder")
    cfg = cfg or ModelConfig.from_hf(path)
    model = DeepseekModel(cfg, fmt, par, ops)  # with par: this rank's share of every weight
    expected: dict[str, list] = {}
    others = set()  # tensors other ranks hold (tensor parallelism): known, not read here
    for name, target in model.weights():
        if target is None:
            others.add(name)
        else:
            expected.setdefault(name, []).append(target)
    if dummy:
        _fill_random(expected, progress)
        return model
    shards = [Shard(f) for f in checkpoint_files(path)]
    try:
        # Pass 1, headers only: every expected tensor present once with its shape, nothing unknown.
        where, scales, problems = {}, {}, []
        for shard in shards:
            for name, (_, shape, _) in shard.tensors.items():
                m = _LAYER.match(name)
                if m and cfg.num_hidden_layers <= int(m.group(1)) < cfg.num_hidden_layers + cfg.num_nextn_predict_layers:
                    continue  # multi-token-prediction layers (V3): not used for generation
                if name == "lm_head.weight" and cfg.tie_word_embeddings:
                    continue
                weight = name.removesuffix("_scale_inv")
                if name in others or weight in others:
                    continue
                if cfg.fp8_block and name.endswith(".weight_scale_inv") and weight in expected:
                    scales[weight] = shard  # an fp8 weight's block scales: [rows / block rows, cols / block cols]
                    want = tuple(-(-n // b) for n, b in zip(tuple(expected[weight][0].shape), cfg.fp8_block))
                elif name in expected:
                    where[name] = shard
                    want = tuple(expected[name][0].shape)  # a QuantWeight's: its float (N, K)
                else:
                    problems.append(("unexpected", name))
                    continue
                if shape != want:
                    problems.append(("misshapen", f"{name} {list(shape)} (expected {list(want)})"))
        _check(path, problems, [n for n in expected if n not in where])

        # Pass 2: tensor by tensor, shard by shard, into the model's stored form.
        bar = tqdm(total=sum(s.nbytes(n) for n, s in where.items()), desc="Loading weights", unit="B",
                   unit_scale=True, unit_divisor=1024, disable=not progress, file=sys.stderr, leave=False,
                   delay=PROGRESS_DELAY)
        for shard in shards:
            for name in [n for n, s in where.items() if s is shard]:
                tensor = shard.read(name)
                if tensor.dtype == torch.float8_e4m3fn:
                    if name not in scales:
                        raise ModelError(f"{shard.file}: fp8 tensor {name} has no {name}_scale_inv "
                                         "(and config.json no fp8 quantization_config)")
                    tensor = dequantize_fp8(tensor, scales[name].read(name + "_scale_inv"), cfg.fp8_block)
                elif not tensor.is_floating_point():
                    raise ModelError(f"{shard.file}: tensor {name} is {tensor.dtype}, not a float weight")
                for target in expected[name]:
                    store(target, tensor)
                del tensor
                bar.update(shard.nbytes(name))
        bar.close()
    finally:
        for shard in shards:
            shard.close()
    return model


def random_tensor(name: str, shape: tuple) -> torch.Tensor:
    """A random weight (normal, std 0.02; norms 1; correction biases 0) from a generator seeded by its name: the
    same for a dummy load and for a random checkpoint written to disk (models/random_checkpoint.py)."""
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    if name.endswith("e_score_correction_bias"):
        return torch.zeros(shape)
    return torch.randn(shape, generator=torch.Generator().manual_seed(zlib.crc32(name.encode()))) * 0.02


def _fill_random(expected: dict, progress: bool):
    """Random weights made and stored one tensor at a time: never a float model in memory."""
    bar = tqdm(expected.items(), desc="Random weights", unit="tensor", disable=not progress, file=sys.stderr,
               leave=False, delay=PROGRESS_DELAY)
    for name, targets in bar:
        t = random_tensor(name, tuple(targets[0].shape))
        for target in targets:
            store(target, t)


def dequantize_fp8(w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """DeepSeek-V3's block fp8: w [N, K] e4m3 times one float32 factor per [block rows x block cols] tile."""
    N, K = w.shape
    s = scale_inv.float().repeat_interleave(block[0], 0)[:N].repeat_interleave(block[1], 1)[:, :K]
    return w.float() * s
