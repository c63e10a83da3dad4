import os
import sys

import pytest
import torch

# hermetic: a threshold saved by `mla tune` on this machine must not change the tests' auto mode
os.environ["MLA_ENGINE_TUNED"] = os.path.join(os.path.dirname(os.path.abspath(__file__)), "no-such-tuned-file.json")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests import tiny  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))

SPECS = {"v2_lite": tiny.v2_lite_attention, "v2_qlora": tiny.v2_qlora, "v3": tiny.v3_noaux}


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """name -> folder of a tiny checkpoint written by transformers (several shards, with a tokenizer)."""
    out = {}
    for name, spec in SPECS.items():
        d = str(tmp_path_factory.mktemp(name))
        tiny.make_checkpoint(d, spec())
        out[name] = d
    return out


@pytest.fixture(scope="session")
def hf_models(checkpoints):
    return {name: tiny.hf_model(d) for name, d in checkpoints.items()}
