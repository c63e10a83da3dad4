"""mla: command-line front end. Argument parsing and printing only; the work is in engine/."""
import argparse
import os
import sys
import time

DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models", "default")


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def _int_at_least(lo):
    def parse(s):
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not an integer") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"{v} must be at least {lo}")
        return v
    return parse


def _float_at_least(lo):
    def parse(s):
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None
        if not v >= lo:
            raise argparse.ArgumentTypeError(f"{v} must be at least {lo}")
        return v
    return parse


def add_engine_args(p):
    p.add_argument("--model", "-m", default=DEFAULT_MODEL, help="checkpoint folder (default: the embedded model)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--attn-mode", default="auto", choices=["auto", "absorbed", "expanded"])
    p.add_argument("--mla-threshold", type=_int_at_least(1), default=None,
                   help="query tokens from which auto uses the expanded path")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    p.add_argument("--kv-cache-gib", type=_float_at_least(0.001), default=None, help="KV cache memory budget in GiB")
    p.add_argument("--backend", default="auto", choices=["auto", "triton", "torch"])


def add_sampling_args(p):
    p.add_argument("--max-tokens", "-n", type=_int_at_least(1), default=128)
    p.add_argument("--temperature", type=_float_at_least(0.0), default=0.0, help="0 is greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=_int_at_least(-1), default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true")


def build_parser():
    parser = Parser(prog="mla", description="Inference engine for DeepSeek MLA models")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    g = sub.add_parser("generate", help="generate text from a prompt, streaming")
    add_engine_args(g)
    add_sampling_args(g)
    g.add_argument("--prompt", "-p", required=True)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    return parser


def make_llm(args):
    from engine import LLM
    return LLM(args.model, device=args.device, dtype=args.dtype, attn_mode=args.attn_mode,
               kv_cache_dtype=args.kv_cache_dtype, backend=args.backend, mla_threshold=args.mla_threshold,
               kv_cache_memory_gib=args.kv_cache_gib)


def sampling_params(args):
    from engine import SamplingParams
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed, ignore_eos=args.ignore_eos)


def cmd_generate(args):
    llm = make_llm(args)
    params = sampling_params(args)
    ids = llm.chat_prompt([{"role": "user", "content": args.prompt}]) if args.chat else llm.encode(args.prompt)
    t0 = time.perf_counter()
    t_first = None
    for delta in llm.stream(ids, params, prompt=args.prompt):
        if t_first is None:
            t_first = time.perf_counter()  # the first token comes out of the prefill
        sys.stdout.write(delta)
        sys.stdout.flush()
    t_end = time.perf_counter()
    out = llm.last_output
    sys.stdout.write("\n")
    n = len(out.token_ids)
    pp = len(ids) / (t_first - t0)
    tg = (n - 1) / (t_end - t_first) if n > 1 else float("nan")
    print(f"prompt {len(ids)} tokens, generated {n} tokens ({out.finish_reason}), "
          f"PP {pp:.1f} tok/s, TG {tg:.1f} tok/s", file=sys.stderr)


def main(argv=None):
    args = build_parser().parse_args(argv)
    from models.errors import ModelError
    try:
        {"generate": cmd_generate}[args.command](args)
    except (ModelError, ValueError) as e:
        print(f"mla {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
