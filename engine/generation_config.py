"""A checkpoint's default sampling settings (generation_config.json), as vLLM reads them: the fields it names
become the defaults of every request; what a request sets itself wins."""
import json
import os

from models.errors import ModelError

from .sampling_params import SamplingParams

FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def sampling_defaults(model_dir: str) -> dict:
    """{SamplingParams field: value} for the fields generation_config.json sets ({} without the file)."""
    path = os.path.join(model_dir, "generation_config.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{path}: cannot read it ({e})") from None
    if not isinstance(cfg, dict):
        raise ModelError(f"{path}: expected a JSON object")
    defaults = {k: cfg[k] for k in FIELDS if cfg.get(k) is not None}
    try:
        SamplingParams(**defaults)
    except ValueError as e:
        raise ModelError(f"{path}: {e}") from None
    return defaults
