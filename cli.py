"""mla: command-line front end. Argument parsing and printing only; the work is in engine/ (generate, chat) and
tools/ (bench, tune, plan, perplexity)."""
import argparse
import os
import re
import sys
import time

from engine.config import ATTN_MODES, BACKENDS, DTYPES, KV_CACHE_DTYPES, PREFILL_GEMMS, WEIGHT_DTYPES, EngineConfig

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_MODEL = os.path.join(HERE, "models", "default")
V2_LITE_CONFIG = os.path.join(HERE, "bench", "configs", "deepseek-v2-lite.json")
V3_CONFIG = os.path.join(HERE, "bench", "configs", "deepseek-v3.json")


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def _at_least(lo, cast=int, hi=None, lo_open=False):
    def parse(s):
        try:
            v = cast(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not {'an integer' if cast is int else 'a number'}") from None
        if not (v > lo if lo_open else v >= lo) or (hi is not None and not v <= hi) or v in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"{v} must be {'above' if lo_open else 'at least'} {lo}"
                                             + (f" and at most {hi}" if hi is not None else "") + " (and finite)")
        return v
    return parse


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("mla-engine")
    except PackageNotFoundError:
        return "(not installed)"


def _device(s):
    if s == "cpu" or re.fullmatch(r"cuda(:\d+)?", s):
        return s
    raise argparse.ArgumentTypeError(f"{s!r} is not cpu, cuda or cuda:N")


def _int_at_least(lo):
    return _at_least(lo, int)


def _float_at_least(lo):
    return _at_least(lo, float)


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
    p.add_argument("--device", type=_device, default=None, help="cpu, cuda or cuda:N (default: cuda when present)")
    p.add_argument("--dtype", default="auto", choices=DTYPES)
    if lists:
        p.add_argument("--attn-mode", type=_choice_list(ATTN_MODES), default=["auto"], help="e.g. absorbed,expanded,auto")
        p.add_argument("--kv-cache-dtype", type=_choice_list(KV_CACHE_DTYPES), default=["auto"], help="e.g. auto,int8,fp8")
    else:
        p.add_argument("--attn-mode", default="auto", choices=ATTN_MODES)
        p.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES)
    p.add_argument("--mla-threshold", type=_int_at_least(1), default=None,
                   help="query tokens from which auto uses the expanded path")
    cache = p.add_mutually_exclusive_group()
    cache.add_argument("--kv-cache-gib", type=_float_at_least(1e-6), default=None, help="KV cache memory budget in GiB")
    cache.add_argument("--kv-cache-tokens", type=_int_at_least(1), default=None, metavar="N",
                       help="KV cache capacity in tokens (whole blocks), instead of --kv-cache-gib")
    p.add_argument("--no-prefix-caching", action="store_true",
                   help="compute every prompt whole (default: reuse the cached blocks of earlier requests' prefixes)")
    p.add_argument("--backend", default="auto", choices=BACKENDS)
    p.add_argument("--weight-dtype", default=None, choices=WEIGHT_DTYPES,
                   help="how every linear and expert is stored: int8/int4 weight-only quantization at load, or bfloat16 "
                        "under a float32 model (the same results at half the bytes; the default for a bf16 "
                        "checkpoint run in float32 on the CPU)")
    p.add_argument("--prefill-gemm", default="auto", choices=PREFILL_GEMMS,
                   help="how prompts multiply int8/int4 weights on the CPU: dequantized into a float GEMM, or int8 x "
                        "int8 (activations quantized per token; float32 models). auto: int8 on CPUs with VNNI but no "
                        "AMX")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs for decode steps")
    p.add_argument("--threads", type=_int_at_least(1), default=None, metavar="N",
                   help="CPU threads of torch and the C++ kernels, per rank with --tp (default: the machine's cores, "
                        "shared out among the ranks)")
    p.add_argument("--tp", type=_int_at_least(1), default=1, metavar="N",
                   help="tensor parallelism over N ranks (processes the engine starts; gloo on CPUs, NCCL on GPUs)")


def add_sampling_args(p):
    p.add_argument("--max-tokens", "-n", type=_int_at_least(1), default=128)
    # None: the checkpoint's generation_config.json, else greedy and no truncation or penalty
    p.add_argument("--temperature", type=_float_at_least(0.0), default=None,
                   help="0 is greedy (default, unless the checkpoint's generation_config.json sets one)")
    p.add_argument("--top-p", type=_at_least(0.0, float, hi=1.0, lo_open=True), default=None, help="in (0, 1]")
    p.add_argument("--top-k", type=_int_at_least(-1), default=None)
    p.add_argument("--min-p", type=_at_least(0.0, float, hi=1.0), default=None, help="in [0, 1]")
    p.add_argument("--repetition-penalty", type=_at_least(0.0, float, lo_open=True), default=None)
    p.add_argument("--presence-penalty", type=_at_least(-2.0, float, hi=2.0), default=0.0)
    p.add_argument("--frequency-penalty", type=_at_least(-2.0, float, hi=2.0), default=0.0)
    p.add_argument("--seed", type=_at_least(-2**63, int, hi=2**64 - 1), default=None)
    p.add_argument("--ignore-eos", action="store_true")


def build_parser():
    parser = Parser(prog="mla", description="Inference engine for DeepSeek MLA models")
    parser.add_argument("--version", action="version", version=f"mla {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    g = sub.add_parser("generate", help="generate text from a prompt, streaming")
    add_engine_args(g)
    add_sampling_args(g)
    g.add_argument("--prompt", "-p", required=True, help="the prompt, or - to read it from standard input")
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
                   help="also measure the GEMM peak (pp) and the read bandwidth (tg), and print each test's share of them")
    b.add_argument("--output", choices=["md", "json", "csv"], default="md")
    b.add_argument("--serve", "-N", type=_int_at_least(1), default=None, metavar="N",
                   help="instead of the tests: N requests of random lengths through continuous batching, in this "
                        "process (all at once, or --concurrency at a time)")
    b.add_argument("--url", default=None, help="instead of the tests: the same requests sent to an OpenAI-compatible "
                   "server (mla serve, llama-server, ...), streamed, e.g. http://127.0.0.1:8000")
    b.add_argument("--num-prompts", type=_int_at_least(1), default=32,
                   help="requests sent to --url (their random token ids are drawn from --model's or --config's vocabulary)")
    b.add_argument("--concurrency", type=_int_list(1), default=None,
                   help="requests in flight at most, e.g. 1,4,16 (--url default 1; --serve default all)")
    b.add_argument("--api-key", default=os.environ.get("MLA_API_KEY"), help="bearer token for --url")
    b.add_argument("--prompt-lens", type=_int_range, default=(16, 512), help="MIN,MAX prompt lengths (--serve, --url)")
    b.add_argument("--gen-lens", type=_int_range, default=(16, 128), help="MIN,MAX output lengths (--serve, --url)")
    b.add_argument("--turns", type=_int_at_least(1), default=1,
                   help="multi-turn chats (--serve, --url): each of the --num-prompts (--serve N) conversations sends "
                        "TURNS requests in turn, each resending the conversation so far plus a new message")
    b.add_argument("--user-lens", type=_int_range, default=(16, 64),
                   help="MIN,MAX lengths of the messages after the first (--turns; the first's are --prompt-lens)")
    b.add_argument("--kernels", action="store_true",
                   help="instead of the model: the attention kernels alone vs copy bandwidth, SDPA and matmul peak, "
                        "at the shapes of --config (default: DeepSeek-V2-Lite)")
    b.add_argument("--compile-for", type=_choice_list(["sm_80", "sm_90"]), default=None, metavar="sm_80,sm_90",
                   help="with --kernels: compile every Triton kernel for these GPUs (no GPU needed) and report registers, "
                        "spills, shared memory, occupancy and a static roofline; exit 1 if any fails")
    b.add_argument("--kernel-batch", type=_int_list(1), default=None,
                   help="decode batch sizes (--kernels; default 1,8,64 on CUDA, 1,8 on the CPU)")
    b.add_argument("--kernel-ctx", type=_int_list(1), default=None,
                   help="decode context lengths (--kernels; default 1024,4096,16384,65536 on CUDA, 1024,4096 on the CPU)")
    b.add_argument("--kernel-prefill", type=_int_list(1), default=None,
                   help="prefill lengths (--kernels; default 512,4096,16384 on CUDA, 512,2048 on the CPU)")
    sv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, ...)")
    add_engine_args(sv)
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    sv.add_argument("--port", type=_at_least(0, int, hi=65535), default=8000)
    sv.add_argument("--api-key", default=os.environ.get("MLA_API_KEY"),
                    help="clients must send Authorization: Bearer KEY (default: $MLA_API_KEY, else none)")
    sv.add_argument("--served-model-name", default=None, help="the model's name in the API (default: the folder's)")
    sv.add_argument("--max-num-seqs", type=_int_at_least(1), default=64, help="requests decoded together at most")
    sv.add_argument("--max-model-len", type=_int_at_least(2), default=None, help="context limit (default: the model's)")
    sv.add_argument("--max-queued-requests", type=_int_at_least(1), default=1024,
                    help="waiting requests beyond this are refused with 503 and Retry-After")
    sv.add_argument("--max-request-mib", type=_float_at_least(1e-3), default=16.0,
                    help="request bodies larger than this are refused (413) before they are parsed")
    sv.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    t = sub.add_parser("tune", help="measure the absorbed/expanded crossover on this device")
    add_engine_args(t)
    t.add_argument("--config", default=None)
    t.add_argument("--layers", type=_int_at_least(1), default=None)
    t.add_argument("--experts", type=_int_at_least(1), default=None)
    t.add_argument("-q", "--q-lens", type=_int_list(1), default=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024])
    t.add_argument("-d", "--depth", type=_int_list(0), default=[0, 1024, 4096])
    t.add_argument("-r", "--repetitions", type=_int_at_least(1), default=3)
    t.add_argument("--no-save", action="store_true", help="print the crossover without saving it")
    pl = sub.add_parser("plan", help="memory and communication per rank under tensor parallelism, from a config")
    pl.add_argument("--config", required=True, help="a config.json (e.g. bench/configs/deepseek-v3.json)")
    pl.add_argument("--tp", type=_int_at_least(1), default=1, metavar="N")
    pl.add_argument("--gpu-mem", type=_float_at_least(1e-3), default=80.0, metavar="GiB", help="memory per rank")
    pl.add_argument("--dtype", default="bfloat16", choices=[d for d in DTYPES if d != "auto"])
    pl.add_argument("--weight-dtype", default=None, choices=WEIGHT_DTYPES)
    pl.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES)
    pl.add_argument("--output", choices=["md", "json"], default="md")
    x = sub.add_parser("perplexity", help="perplexity of a text file, llama-perplexity style")
    add_engine_args(x)
    x.add_argument("--file", "-f", required=True, help="UTF-8 text file")
    x.add_argument("--ctx", "-c", type=_int_at_least(4), default=512, help="chunk length; its second half is scored")
    return parser


def _int_range(s):
    values = _int_list(1)(s)
    if len(values) != 2 or values[0] > values[1]:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX with 1 <= MIN <= MAX, got {s!r}")
    return tuple(values)


def _int_list(lo):
    one = _int_at_least(lo)

    def parse(s):
        return [one(x) for x in s.split(",") if x.strip()] or one("")
    return parse


def engine_config(args, **overrides) -> EngineConfig:
    """The engine settings the flags give (the one place that maps flags to EngineConfig fields)."""
    fields = dict(model=args.model, device=args.device, dtype=args.dtype, attn_mode=args.attn_mode,
                  kv_cache_dtype=args.kv_cache_dtype, backend=args.backend, mla_threshold=args.mla_threshold,
                  kv_cache_memory_gib=args.kv_cache_gib, kv_cache_tokens=args.kv_cache_tokens,
                  enable_prefix_caching=not args.no_prefix_caching, weight_dtype=args.weight_dtype,
                  enforce_eager=args.enforce_eager, tensor_parallel_size=args.tp, threads=args.threads,
                  prefill_gemm=args.prefill_gemm)
    return EngineConfig(**{**fields, **overrides})


def make_llm(args, **overrides):
    from engine import LLM
    return LLM(engine_config(args, **overrides))


def sampling_params(args, llm):
    """The flags given, over the checkpoint's defaults, over greedy."""
    given = {k: getattr(args, k) for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
             if getattr(args, k) is not None}
    return llm.sampling_params(**{"temperature": 0.0, **llm.sampling_defaults, **given}, max_tokens=args.max_tokens,
                               seed=args.seed, ignore_eos=args.ignore_eos, presence_penalty=args.presence_penalty,
                               frequency_penalty=args.frequency_penalty)


def _prompt_text(prompt: str) -> str:
    if prompt == "-":
        prompt = sys.stdin.buffer.read().decode("utf-8", errors="surrogateescape")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("--prompt: the text is not valid UTF-8") from None
    return prompt


def cmd_generate(args):
    prompt = _prompt_text(args.prompt)
    llm = make_llm(args)
    if llm.tokenizer is None:
        raise ValueError(f"{args.model}: the checkpoint has no tokenizer (tokenizer.json or tokenizer.model), so text "
                         "prompts cannot be encoded")
    params = sampling_params(args, llm)
    ids = llm.chat_prompt([{"role": "user", "content": prompt}]) if args.chat else llm.encode(prompt)
    t0 = time.perf_counter()
    t_first = None
    stream = llm.stream(ids, params, prompt=prompt)
    for delta in stream:
        if t_first is None:
            t_first = time.perf_counter()  # the first token comes out of the prefill
        sys.stdout.write(delta)
        sys.stdout.flush()
    t_end = time.perf_counter()
    out = stream.output
    sys.stdout.write("\n")
    n = len(out.token_ids)
    pp = len(ids) / (t_first - t0)
    tg = f"{(n - 1) / (t_end - t_first):.1f} tok/s" if n > 1 else "n/a"
    print(f"prompt {len(ids)} tokens, generated {n} tokens ({out.finish_reason}), PP {pp:.1f} tok/s, TG {tg}",
          file=sys.stderr)


def cmd_chat(args, read=input, out=sys.stdout):
    """The conversation's cache is kept between turns: each turn prefills only what the previous one did not."""
    llm = make_llm(args)
    if llm.tokenizer is None or not getattr(llm.tokenizer, "chat_template", None):
        raise ValueError(f"{args.model}: the checkpoint's tokenizer has no chat template; use mla generate")
    params = sampling_params(args, llm)
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
        try:
            ids = llm.chat_prompt(messages + [{"role": "user", "content": _prompt_text(line)}])
            stream = llm.stream(ids, params, session=session, keep_cache=True)
        except ValueError as e:  # this turn cannot run (too long for the context, not UTF-8): say so, keep going
            print(f"mla chat: error: {e}" + ("; /reset starts a new conversation" if "context" in str(e) else ""),
                  file=sys.stderr)
            continue
        messages.append({"role": "user", "content": line})
        session = stream.seq
        try:
            for delta in stream:
                out.write(delta)
                out.flush()
        except KeyboardInterrupt:  # stop this answer, keep the conversation and its cache
            llm.abort(session)
        out.write("\n")
        messages.append({"role": "assistant", "content": session.text})


def _bench_model(args, tmp, **overrides) -> tuple[str, str]:
    """(model, load_format): --model as given, or --config's shapes with random weights: made straight into the
    engine's stored form (a dummy load), or written to tmp as a checkpoint when transformers must read it too.
    overrides: EngineConfig fields that differ from the flags (as engine_config takes them)."""
    if args.config:
        from models.errors import ModelError
        from models.random_checkpoint import cut_config, write_random_checkpoint
        # in the dtype the engine will run in, so that auto reads it back
        dtype = engine_config(args, model=args.config, attn_mode="auto", kv_cache_dtype="auto", **overrides).resolve(
            plan_memory=False).torch_dtype
        path = cut_config(args.config, tmp, layers=args.layers, experts=args.experts, dtype=dtype)
        try:  # the memory plan, before anything is written or allocated
            engine_config(args, model=path, attn_mode="auto", kv_cache_dtype="auto", load_format="dummy",
                          **overrides).resolve()
        except ModelError as e:
            name = os.path.basename(os.path.normpath(path))
            raise ModelError(f"{args.config}: {str(e).removeprefix(name + ' ')}; --layers N / --experts N "
                             f"cut it") from None
        if getattr(args, "baseline", "none") != "transformers":
            return path, "dummy"
        return write_random_checkpoint(path, dtype), "auto"
    if args.layers or args.experts:
        raise ValueError("--layers/--experts apply to --config models only")
    return args.model, "auto"


def _label(args, model: str) -> str:
    if not args.config:
        return os.path.basename(os.path.normpath(model))
    from models.config import ModelConfig
    cfg = ModelConfig.from_hf(model)
    return f"{os.path.basename(args.config)} ({cfg.num_hidden_layers}L, {cfg.n_routed_experts or 0}E)"


def cmd_bench(args):
    import tempfile

    if args.compile_for and not args.kernels:
        raise ValueError("--compile-for goes with --kernels")
    if args.kernels and args.compile_for:
        import json

        from tools import gpu_check
        configs = [args.config] if args.config else [V2_LITE_CONFIG, V3_CONFIG]
        rows = gpu_check.run(configs, args.compile_for)
        print(json.dumps(rows, indent=1) if args.output == "json" else gpu_check.markdown(rows))
        failed = [r for r in rows if r.get("error")]
        if failed:
            raise ValueError(f"{len(failed)} of {len(rows)} kernel launches failed the check (first: {failed[0]['kernel']} "
                             f"{failed[0]['config']} on {failed[0]['target']}: {failed[0]['error']})")
        return
    if args.kernels:
        if args.output == "csv":
            raise ValueError("--kernels prints md or json, not csv")
        from tools import kernel_bench
        if len(args.kv_cache_dtype) > 1 or len(args.attn_mode) > 1:
            raise ValueError("--kernels takes one --kv-cache-dtype (auto: the model dtype, int8 and fp8)")
        config = engine_config(args, model=args.config or V2_LITE_CONFIG, attn_mode="auto", kv_cache_dtype="auto")
        r = kernel_bench.run(config.resolve(plan_memory=False), args.kv_cache_dtype[0], batch=args.kernel_batch,
                             ctx=args.kernel_ctx, prefill=args.kernel_prefill, min_reps=args.repetitions)
        print(kernel_bench.report(r, args.output))
        return
    if args.url or args.serve:
        return _bench_serving(args)
    from tools import bench
    kv_cache_gib = args.kv_cache_gib
    if args.baseline == "transformers" and kv_cache_gib is None:
        kv_cache_gib = 4.0  # on a GPU the default (85% of free memory) would leave transformers no room
    combos = [(m, c) for m in args.attn_mode for c in args.kv_cache_dtype]
    tests = [("pp", n, d, 1) for n in args.n_prompt if n for d in args.depth]
    tests += [("tg", n, d, b) for n in args.n_gen if n for d in args.depth for b in args.batch]
    with tempfile.TemporaryDirectory() as tmp:
        model, load_format = _bench_model(args, tmp, kv_cache_memory_gib=kv_cache_gib)
        configs = [engine_config(args, model=model, attn_mode=m, kv_cache_dtype=c, load_format=load_format,
                                 kv_cache_memory_gib=kv_cache_gib) for m, c in combos]
        rows = bench.run(configs, tests, args.repetitions, _label(args, model),
                         baseline=args.baseline == "transformers", with_roofline=args.roofline)
    print(bench.table(rows, args.output))


def cmd_serve(args):
    from server.run import serve
    name = args.served_model_name or os.path.basename(os.path.normpath(args.model))
    config = engine_config(args, max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len)
    serve(config, args.host, args.port, name, api_key=args.api_key, max_queued_requests=args.max_queued_requests,
          max_body_bytes=int(args.max_request_mib * 2**20), log_level=args.log_level)


def _bench_serving(args):
    """--serve N (through the engine here) or --url (through a server): the same random requests for the same flags."""
    import tempfile

    from models.config import ModelConfig
    from tools import bench_serve
    if args.url and args.serve:
        raise ValueError("--url and --serve: choose one (a server, or the engine in this process)")
    if args.output == "csv":
        raise ValueError("--serve / --url print md or json, not csv")
    if len(args.attn_mode) > 1 or len(args.kv_cache_dtype) > 1:
        raise ValueError("--serve takes one --attn-mode and one --kv-cache-dtype")
    num = args.serve or args.num_prompts
    with tempfile.TemporaryDirectory() as tmp:
        model, load_format = _bench_model(args, tmp) if not args.url else (args.config or args.model, "auto")
        sessions = bench_serve.make_chats(num, args.turns, args.prompt_lens, args.user_lens, args.gen_lens,
                                          ModelConfig.from_hf(model).vocab_size)
        if args.url:
            results = [bench_serve.run_http(args.url, sessions, c, args.api_key) for c in args.concurrency or [1]]
        else:
            from engine import LLM
            llm = LLM(engine_config(args, model=model, attn_mode=args.attn_mode[0],
                                    kv_cache_dtype=args.kv_cache_dtype[0], load_format=load_format))
            results = [bench_serve.run_engine(llm, sessions, c) for c in args.concurrency or [num]]
    print(bench_serve.report(results, args.output))


def cmd_tune(args):
    import tempfile

    from engine.tune import save_tuned_threshold
    from tools import tune
    with tempfile.TemporaryDirectory() as tmp:
        model, load_format = _bench_model(args, tmp)
        llm = make_llm(args, model=model, attn_mode="auto", load_format=load_format)
        rows = tune.tune(llm, args.depth, args.q_lens, reps=args.repetitions)
    print(tune.markdown(rows))
    threshold = tune.crossover(rows)
    print(f"crossover: expanded from {threshold} query tokens on {llm.device.type}")
    if not args.no_save:
        print(f"saved to {save_tuned_threshold(llm.device, threshold)}: mla_threshold auto uses it on this device kind")


def cmd_plan(args):
    import json

    from tools import plan
    p = plan.plan(args.config, args.tp, args.gpu_mem, args.dtype, args.weight_dtype, args.kv_cache_dtype)
    print(json.dumps(p, indent=1) if args.output == "json" else plan.markdown(p))


def cmd_perplexity(args):
    from tools.perplexity import perplexity
    try:
        with open(args.file, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--file {args.file}: {e.strerror if isinstance(e, OSError) else 'not UTF-8 text'}") from None
    if not text.strip():
        raise ValueError(f"--file {args.file}: the file is empty")
    llm = make_llm(args)
    r = perplexity(llm, llm.encode(text), args.ctx)
    c = llm.config
    print(f"PPL = {r['ppl']:.4f} +/- {r['ppl_stderr']:.4f} ({r['tokens']} tokens scored in {r['chunks']} chunks "
          f"of {args.ctx}, {c.dtype} activations, {c.weight_dtype or 'float'} weights, {c.kv_cache_dtype} KV cache)")


def main(argv=None):
    args = build_parser().parse_args(argv)
    from models.errors import ModelError
    if getattr(args, "threads", None):
        import torch
        torch.set_num_threads(args.threads)
    try:
        {"generate": cmd_generate, "chat": cmd_chat, "bench": cmd_bench, "serve": cmd_serve, "tune": cmd_tune,
         "plan": cmd_plan, "perplexity": cmd_perplexity}[args.command](args)
        sys.stdout.flush()
    except (ModelError, ValueError) as e:
        print(f"mla {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (| head): stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 141
    except OSError as e:
        if e.errno is None:
            raise
        print(f"mla {args.command}: error: cannot write the output ({e.strerror})", file=sys.stderr)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
