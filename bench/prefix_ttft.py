"""Time to first token of a prompt whose leading tokens an earlier request sent, against the same length cold.

    python bench/prefix_ttft.py [--config bench/configs/deepseek-v2-lite.json --layers 27 --experts 8]
                                [--prompt-len 2000 --shared 1990] [-r 3] [--dtype auto] [--weight-dtype int4]

Random weights of the config's shapes (made in the stored form, nothing written), random token ids. Per repetition:
a cold prompt (nothing of it cached) is timed; then a fresh prompt is sent once, and a prompt that shares its first
--shared tokens is timed. TTFT here is in-process: from add_request to the first sampled token. Prints the medians
and their ratio."""
import argparse
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402

from engine import LLM, SamplingParams  # noqa: E402
from models.random_checkpoint import cut_config  # noqa: E402


def ttft(llm: LLM, ids: list[int]) -> float:
    t = time.perf_counter()
    seq = llm.add_request(ids, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    while not seq.finished:
        llm.step()
    return time.perf_counter() - t


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=os.path.join(HERE, "configs", "deepseek-v2-lite.json"))
    p.add_argument("--layers", type=int, default=27)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=2000)
    p.add_argument("--shared", type=int, default=1990)
    p.add_argument("-r", "--repetitions", type=int, default=3)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--weight-dtype", default=None)
    args = p.parse_args()
    if not 0 < args.shared < args.prompt_len:
        p.error("--shared must be between 0 and --prompt-len")
    with tempfile.TemporaryDirectory() as tmp:
        path = cut_config(args.config, tmp, layers=args.layers, experts=args.experts, dtype=torch.bfloat16)
        llm = LLM(path, load_format="dummy", dtype=args.dtype, weight_dtype=args.weight_dtype,
                  max_model_len=args.prompt_len + 64, max_num_seqs=1)
    vocab = llm.model_config.vocab_size
    g = torch.Generator().manual_seed(0)
    rand = lambda n: torch.randint(vocab, (n,), generator=g).tolist()  # noqa: E731
    ttft(llm, rand(64))  # warm-up
    cold, warm = [], []
    for r in range(args.repetitions):
        cold.append(ttft(llm, rand(args.prompt_len)))
        first = rand(args.prompt_len)
        ttft(llm, first)
        warm.append(ttft(llm, first[:args.shared] + rand(args.prompt_len - args.shared)))
        print(f"rep {r + 1}: cold {cold[-1]:.3f} s, {args.shared} of {args.prompt_len} cached {warm[-1]:.3f} s",
              file=sys.stderr, flush=True)
    c, w = statistics.median(cold), statistics.median(warm)
    print(f"| prompt | cached | TTFT cold (s) | TTFT cached (s) | cold / cached |\n|---|---|---|---|---|\n"
          f"| {args.prompt_len} | {args.shared} | {c:.3f} | {w:.3f} | {c / w:.1f}x |")
    print(f"prefix cache: {llm.scheduler.prefix_hit_tokens} of {llm.scheduler.prefix_queried_tokens} prompt tokens "
          f"found; {llm.config.model_config.num_hidden_layers} layers, {llm.config.dtype}, "
          f"weights {args.weight_dtype or llm.config.dtype}, block {llm.config.block_size}")


if __name__ == "__main__":
    main()
