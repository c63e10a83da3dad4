"""The absorbed/expanded threshold that `mla tune` (tools/tune.py) measured, per device kind, in one JSON file:
read by EngineConfig.resolve() for mla_threshold "auto", written by `mla tune`."""
import json
import os

import torch

TUNED_FILE = os.environ.get("MLA_ENGINE_TUNED", os.path.join(os.path.expanduser("~"), ".cache", "mla-engine",
                                                              "mla_threshold.json"))


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
