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


def _at_least(lo, cast=int):
    def parse(s):
        try:
            v = cast(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not {'an integer' if cast is int else 'a number'}") from None
        if not v >= lo:  # also rejects nan
            raise argparse.ArgumentTypeError(f"{v} must be at least {lo}")
        return v
    return parse


def _int_at_least(lo):
    return _at_least(lo, int)


def _float_at_least(lo):
    return _at_least(lo, float)


ATTN_MODES = ["auto", "absorbed", "expanded"]
CACHE_DTYPES = ["auto", "bfloat16", "float16", "float32", "int8", "fp8"]


def _choice_list(allowed):
    def parse(s):
        values = [x.strip() for x in s.split(",") if x.strip()]
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"invalid choice {(bad or [s])[0]!r} (choose from {', '.join(allowed)})")
        return values
    return parse


def add_engine_args(p, lists=False):
    """lists: --attn-mode and --kv-cache-dtype take comma-separated lists (bench compares them in one run)."""
    p.add_argument("--model", "-m", default=DEFAULT_MODEL, help="checkpoint folder (default: the embedded model)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    if lists:
        p.add_argument("--attn-mode", type=_choice_list(ATTN_MODES), default=["auto"], help="e.g. absorbed,expanded,auto")
        p.add_argument("--kv-cache-dtype", type=_choice_list(CACHE_DTYPES), default=["auto"], help="e.g. auto,int8,fp8")
    else:
        p.add_argument("--attn-mode", default="auto", choices=ATTN_MODES)
        p.add_argument("--kv-cache-dtype", default="auto", choices=CACHE_DTYPES)
    p.add_argument("--mla-threshold", type=_int_at_least(1), default=None,
                   help="query tokens from which auto uses the expanded path")
    p.add_argument("--kv-cache-gib", type=_float_at_least(1e-6), default=None, help="KV cache memory budget in GiB")
    p.add_argument("--backend", default="auto", choices=["auto", "triton", "torch"])
    p.add_argument("--weight-dtype", default=None, choices=["int8", "int4"],
                   help="weight-only quantization of every linear and expert at load")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs for decode steps")


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
    c = sub.add_parser("chat", help="interactive multi-turn chat (/reset, /exit; Ctrl-C stops an answer)")
    add_engine_args(c)
    add_sampling_args(c)
    c.add_argument("--system", default=None, help="system prompt")
    b = sub.add_parser("bench", help="prompt-processing and generation throughput, llama-bench style")
    add_engine_args(b, lists=True)
    b.add_argument("--config", default=None, help="a published config.json: random weights of the real shapes")
    b.add_argument("--layers", type=_int_at_least(1), default=None, help="keep only the first N layers (--config)")
    b.add_argument("--experts", type=_int_at_least(1), default=None, help="keep only N routed experts (--config)")
    b.add_argument("-p", "--n-prompt", type=_int_list(0), default=[512], help="PP tests, e.g. 512,2048")
    b.add_argument("-n", "--n-gen", type=_int_list(0), default=[128], help="TG tests, e.g. 128")
    b.add_argument("-d", "--depth", type=_int_list(0), default=[0], help="tokens already cached, e.g. 0,4096")
    b.add_argument("-b", "--batch", type=_int_list(1), default=[1], help="TG batch sizes, e.g. 1,8,64")
    b.add_argument("-r", "--repetitions", type=_int_at_least(1), default=3)
    b.add_argument("--baseline", choices=["none", "transformers"], default="none")
    b.add_argument("--roofline", action="store_true",
                   help="also measure the device's GEMM peak and copy bandwidth, and print each test's share of them")
    b.add_argument("--output", choices=["md", "json", "csv"], default="md")
    b.add_argument("--serve", "-N", type=_int_at_least(1), default=None, metavar="N",
                   help="instead of the tests: N requests of random lengths at once, continuous batching")
    b.add_argument("--prompt-lens", type=_int_list(1), default=[16, 512], help="range of prompt lengths (--serve)")
    b.add_argument("--gen-lens", type=_int_list(1), default=[16, 128], help="range of output lengths (--serve)")
    b.add_argument("--kernels", action="store_true",
                   help="instead of the model: the attention kernels alone vs copy bandwidth, SDPA and matmul peak")
    b.add_argument("--kernel-batch", type=_int_list(1), default=None,
                   help="decode batch sizes (--kernels; default 1,8,64 on CUDA, 1,8 on the CPU)")
    b.add_argument("--kernel-ctx", type=_int_list(1), default=None,
                   help="decode context lengths (--kernels; default 1024,4096,16384,65536 on CUDA, 1024,4096 on the CPU)")
    b.add_argument("--kernel-prefill", type=_int_list(1), default=None,
                   help="prefill lengths (--kernels; default 512,4096,16384 on CUDA, 512,2048 on the CPU)")
    t = sub.add_parser("tune", help="measure the absorbed/expanded crossover on this device")
    add_engine_args(t)
    t.add_argument("--config", default=None)
    t.add_argument("--layers", type=_int_at_least(1), default=None)
    t.add_argument("--experts", type=_int_at_least(1), default=None)
    t.add_argument("-q", "--q-lens", type=_int_list(1), default=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024])
    t.add_argument("-d", "--depth", type=_int_list(0), default=[0, 1024, 4096])
    t.add_argument("-r", "--repetitions", type=_int_at_least(1), default=3)
    t.add_argument("--no-save", action="store_true", help="print the crossover without saving it")
    x = sub.add_parser("perplexity", help="perplexity of a text file, llama-perplexity style")
    add_engine_args(x)
    x.add_argument("--file", "-f", required=True, help="UTF-8 text file")
    x.add_argument("--ctx", "-c", type=_int_at_least(4), default=512, help="chunk length; its second half is scored")
    return parser


def _int_list(lo):
    one = _int_at_least(lo)

    def parse(s):
        return [one(x) for x in s.split(",") if x.strip()] or one("")
    return parse


def make_llm(args):
    from engine import LLM
    return LLM(args.model, device=args.device, dtype=args.dtype, attn_mode=args.attn_mode,
               kv_cache_dtype=args.kv_cache_dtype, backend=args.backend, mla_threshold=args.mla_threshold,
               kv_cache_memory_gib=args.kv_cache_gib, weight_dtype=args.weight_dtype, enforce_eager=args.enforce_eager)


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


def cmd_chat(args, read=input, out=sys.stdout):
    """The conversation's cache is kept between turns: each turn prefills only what the previous one did not."""
    llm = make_llm(args)
    params = sampling_params(args)
    start = [{"role": "system", "content": args.system}] if args.system else []
    messages, session = list(start), None
    print("chat: /reset clears the conversation, /exit (or Ctrl-D) quits, Ctrl-C stops an answer", file=sys.stderr)
    while True:
        try:
            line = read("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=out)
            return
        if line.strip() == "/exit":
            return
        if line.strip() == "/reset":
            if session is not None:
                llm.abort(session, free=True)
            messages, session = list(start), None
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        ids = llm.chat_prompt(messages)
        try:
            for delta in llm.stream(ids, params, session=session, keep_cache=True):
                out.write(delta)
                out.flush()
            session = llm.current
        except KeyboardInterrupt:  # stop this answer, keep the conversation and its cache
            session = llm.current
            llm.abort(session)
        out.write("\n")
        messages.append({"role": "assistant", "content": session.text})


def _bench_model(args, tmp):
    """--model as given, or a random-weight checkpoint of --config's shapes written to tmp."""
    if args.config:
        import torch
        from engine.bench import random_checkpoint
        # the dtype the engine will run in (auto: bf16 on CUDA, float32 on the CPU), so auto reads it back
        cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
        dtype = getattr(torch, args.dtype) if args.dtype != "auto" else (torch.bfloat16 if cuda else torch.float32)
        return random_checkpoint(args.config, tmp, layers=args.layers, experts=args.experts, dtype=dtype,
                                 need_copies=2 if getattr(args, "baseline", "none") == "transformers" else 1)
    if args.layers or args.experts:
        raise ValueError("--layers/--experts apply to --config models only")
    return args.model


def cmd_bench(args):
    import copy
    import json
    import tempfile

    if args.kernels:
        if args.output == "csv":
            raise ValueError("--kernels prints md or json, not csv")
        from engine import kernel_bench
        r = kernel_bench.run(device=args.device, dtype=args.dtype, backend=args.backend,
                             kv_cache_dtype=args.kv_cache_dtype, batch=args.kernel_batch, ctx=args.kernel_ctx,
                             prefill=args.kernel_prefill, min_reps=args.repetitions)
        print(json.dumps(r, indent=1) if args.output == "json" else kernel_bench.markdown(r))
        return
    import torch
    from engine import bench
    if args.baseline == "transformers" and args.kv_cache_gib is None:
        args.kv_cache_gib = 4.0  # on a GPU the default (85% of free memory) would leave transformers no room
    combos = [(m, c) for m in args.attn_mode for c in args.kv_cache_dtype]
    if args.serve and len(combos) > 1:
        raise ValueError("--serve takes one --attn-mode and one --kv-cache-dtype")
    tests = [("pp", n, d, 1) for n in args.n_prompt if n for d in args.depth]
    tests += [("tg", n, d, b) for n in args.n_gen if n for d in args.depth for b in args.batch]
    rows, baseline = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        args.model = _bench_model(args, tmp)
        base = peaks = None
        bar = bench.tqdm(total=len(tests) * len(combos), desc="bench", file=sys.stderr, leave=False)
        for mode, cache in combos:
            one = copy.copy(args)
            one.attn_mode, one.kv_cache_dtype = mode, cache
            llm = make_llm(one)
            if args.serve:
                r = bench.serve(llm, args.serve, _range(args.prompt_lens, "--prompt-lens"),
                                _range(args.gen_lens, "--gen-lens"))
                print(json.dumps(r, indent=1) if args.output == "json" else
                      f"{r['requests']} requests, {r['prompt_tokens']} prompt + {r['output_tokens']} output tokens in "
                      f"{r['wall_s']:.2f} s: {r['total_tps']:.1f} tok/s total, {r['output_tps']:.1f} output tok/s; "
                      f"TTFT p50/p90/p99 {r['ttft_p50_s']:.2f}/{r['ttft_p90_s']:.2f}/{r['ttft_p99_s']:.2f} s; "
                      f"latency p50/p90/p99 {r['e2e_p50_s']:.2f}/{r['e2e_p90_s']:.2f}/{r['e2e_p99_s']:.2f} s")
                return
            if args.baseline == "transformers" and base is None:
                base = bench.TransformersRunner(args.model, llm.device, llm.dtype)
            ours, cfg = bench.EngineRunner(llm), llm.config
            if args.roofline and peaks is None:
                peaks = bench.device_peaks(llm.device, llm.dtype)
                print(f"roofline: {peaks['tflops']:.2f} TFLOP/s ({str(llm.dtype).removeprefix('torch.')} GEMM), "
                      f"{peaks['gbps']:.1f} GB/s copy", file=sys.stderr)
            info = dict(model=os.path.basename(os.path.normpath(args.config or args.model)) +
                        (f" ({cfg.num_hidden_layers}L, {cfg.n_routed_experts or 0}E)" if args.config else ""),
                        params=bench.fmt_params(bench.param_count(cfg)),
                        device=torch.cuda.get_device_name(llm.device) if llm.device.type == "cuda" else "cpu",
                        dtype=str(llm.dtype).removeprefix("torch."), weights=args.weight_dtype or "-",
                        cache=cache if cache in ("int8", "fp8") else str(llm.cache.dtype).removeprefix("torch."),
                        mode=mode)
            for kind, n, d, b in tests:
                name = f"{kind}{n}" + (f" @ d{d}" if d else "") + (f" x{b}" if b > 1 else "")
                seed = len(rows)
                run = (lambda r: lambda: r.pp(n, d, seed=seed)) if kind == "pp" else (lambda r: lambda: r.tg(n, d, b, seed=seed))
                mean, std = bench.measure(run(ours), args.repetitions)
                row = dict(info, test=name, tps=mean, tps_std=std)
                if peaks is not None:
                    row["roofline"] = bench.roofline_share(llm, peaks, kind, n, d, b, mean, args.weight_dtype)
                if base is not None:  # transformers does not depend on our mode or cache: measured once per test
                    if name not in baseline:
                        baseline[name] = bench.measure(run(base), args.repetitions)
                    ref = baseline[name]
                    row.update(baseline_tps=ref[0], baseline_std=ref[1],
                               ratio=mean / ref[0] if ref[0] == ref[0] else float("nan"))
                rows.append(row)
                bar.update()
            del llm, ours
        bar.close()
    if args.output == "json":
        print(json.dumps(rows, indent=1))
    elif args.output == "csv":
        keys = list(rows[0])
        print(",".join(keys))
        for r in rows:
            print(",".join(str(r[k]) for k in keys))
    else:
        head = ["model", "params", "device", "dtype", "weights", "cache", "mode", "test", "t/s"]
        if peaks is not None:
            head += ["roofline"]
        if base is not None:
            head += ["transformers t/s", "ratio"]
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for r in rows:
            cells = [r[k] for k in ("model", "params", "device", "dtype", "weights", "cache", "mode", "test")]
            cells.append(f"{r['tps']:.2f} ± {r['tps_std']:.2f}")
            if peaks is not None:
                cells.append(f"{100 * r['roofline']:.0f}%")
            if base is not None:
                cells += [f"{bench.nan_safe(r['baseline_tps'])} ± {bench.nan_safe(r['baseline_std'])}",
                          bench.nan_safe(r["ratio"])]
            print("| " + " | ".join(cells) + " |")


def _range(values, flag):
    if len(values) != 2 or values[0] > values[1]:
        raise ValueError(f"{flag}: expected MIN,MAX, got {','.join(map(str, values))}")
    return values[0], values[1]


def cmd_tune(args):
    import tempfile

    from engine import bench
    with tempfile.TemporaryDirectory() as tmp:
        args.model = _bench_model(args, tmp)
        args.attn_mode = "auto"
        llm = make_llm(args)
        rows = bench.tune(llm, args.depth, args.q_lens, reps=args.repetitions)
    print("| depth | q tokens | absorbed ms | expanded ms | expanded / absorbed |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['depth']} | {r['q']} | {r['absorbed'] * 1e3:.2f} | {r['expanded'] * 1e3:.2f} | "
              f"{r['expanded'] / r['absorbed']:.2f} |")
    threshold = bench.crossover(rows)
    print(f"crossover: expanded from {threshold} query tokens on {llm.device.type}")
    if not args.no_save:
        from engine.llm import save_tuned_threshold
        print(f"saved to {save_tuned_threshold(llm.device, threshold)}: mla_threshold auto uses it on this device kind")


def cmd_perplexity(args):
    from engine.perplexity import perplexity
    try:
        with open(args.file, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--file {args.file}: {e.strerror if isinstance(e, OSError) else 'not UTF-8 text'}") from None
    if not text.strip():
        raise ValueError(f"--file {args.file}: the file is empty")
    llm = make_llm(args)
    r = perplexity(llm, llm.encode(text), args.ctx)
    cache = args.kv_cache_dtype if args.kv_cache_dtype in ("int8", "fp8") else str(llm.cache.dtype).removeprefix("torch.")
    print(f"PPL = {r['ppl']:.4f} +/- {r['ppl_stderr']:.4f} ({r['tokens']} tokens scored in {r['chunks']} chunks "
          f"of {args.ctx}, {str(llm.dtype).removeprefix('torch.')} activations, {args.weight_dtype or 'float'} weights, "
          f"{cache} KV cache)")


def main(argv=None):
    args = build_parser().parse_args(argv)
    from models.errors import ModelError
    try:
        {"generate": cmd_generate, "chat": cmd_chat, "bench": cmd_bench, "tune": cmd_tune, "perplexity": cmd_perplexity}[args.command](args)
    except (ModelError, ValueError) as e:
        print(f"mla {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
