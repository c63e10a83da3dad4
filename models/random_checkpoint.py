"""Random-weight checkpoints of a published config (optionally cut to fewer layers and routed experts): the config
for a dummy load (EngineConfig(load_format="dummy")), or the whole checkpoint written shard by shard with the
published tensor names, for engines that read files (transformers, llama.cpp's converters)."""
import json
import math
import os
import sys

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from kernels import WeightFormat

from .config import ModelConfig
from .deepseek import DeepseekModel
from .errors import ModelError
from .loader import INDEX, random_tensor

ARCH_NAMES = {"deepseek_v2": "DeepseekV2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"}


def cut_config(config_file: str, out_dir: str, layers: int | None = None, experts: int | None = None,
               dtype: torch.dtype | None = None) -> str:
    """config.json of config_file with only the first `layers` layers and `experts` routed experts (random weights
    are made in the model dtype: no fp8 quantization_config), written to out_dir; returns out_dir."""
    try:
        with open(config_file) as f:
            raw = json.load(f)
    except OSError as e:
        raise ModelError(f"{config_file}: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{config_file}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ModelError(f"{config_file}: expected a JSON object")
    if layers:
        raw["num_hidden_layers"] = layers
    if experts:
        raw["n_routed_experts"] = experts
        raw["num_experts_per_tok"] = min(raw.get("num_experts_per_tok") or experts, experts)
        if raw.get("n_group") and experts % raw["n_group"]:
            raw["n_group"] = raw["topk_group"] = 1
    raw.pop("quantization_config", None)
    raw["num_nextn_predict_layers"] = 0
    cfg = ModelConfig.from_dict(raw, config_file)
    raw["architectures"] = [ARCH_NAMES[cfg.arch]]
    if dtype is not None:
        raw["torch_dtype"] = str(dtype).removeprefix("torch.")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(raw, f, indent=1)
    return out_dir


def write_random_checkpoint(config_dir: str, dtype=torch.bfloat16, shard_bytes: int = 4 << 30,
                            progress: bool = True) -> str:
    """Weights for config_dir/config.json in shards of at most shard_bytes (and an index when there are several):
    each shard's tensors are made, written and dropped before the next, so a 31 GB checkpoint needs one shard of
    memory."""
    cfg = ModelConfig.from_hf(config_dir)
    names = [(n, tuple(t.shape)) for n, t in DeepseekModel(cfg, WeightFormat(dtype, torch.device("meta"))).weights()]
    groups, cur, size = [], [], 0
    for name, shape in names:
        n = math.prod(shape) * (4 if name.endswith("e_score_correction_bias") else dtype.itemsize)
        if cur and size + n > shard_bytes:
            groups.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += n
    groups.append(cur)
    files = ["model.safetensors"] if len(groups) == 1 else [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
                                                             for i in range(len(groups))]
    weight_map = {}
    for file, group in tqdm(list(zip(files, groups)), desc="Writing shards", unit="shard", disable=not progress,
                            file=sys.stderr, leave=False):
        tensors = {name: random_tensor(name, shape).to(torch.float32 if name.endswith("bias") else dtype)
                   for name, shape in group}
        save_file(tensors, os.path.join(config_dir, file), metadata={"format": "pt"})
        weight_map.update({name: file for name in tensors})
        del tensors
    if len(files) > 1:
        with open(os.path.join(config_dir, INDEX), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=1)
    with open(os.path.join(config_dir, "config.json")) as f:
        raw = json.load(f)
    raw["torch_dtype"] = str(dtype).removeprefix("torch.")
    with open(os.path.join(config_dir, "config.json"), "w") as f:
        json.dump(raw, f, indent=1)
    return config_dir
