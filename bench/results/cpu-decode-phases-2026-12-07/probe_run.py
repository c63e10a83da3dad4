# scratch driver of probe-run-gemvs.patch: run from a copy of the tree with the patch applied (edit the path)
import sys; sys.path.insert(0, "/path/to/patched/tree")
from engine import LLM
from tools.bench import EngineRunner
llm = LLM("/work/build/cut27/model", device="cpu", weight_dtype="int4", progress=False, kv_cache_memory_gib=1)
r = EngineRunner(llm)
print("tok/s", [round(r.tg(32, 16, 1, seed=0), 2) for _ in range(4)], flush=True)
