"""mla-engine next to llama.cpp and ik_llama.cpp on the same weights, on this CPU, in one session.

    python bench/llamacpp_compare.py [--llama-cpp DIR] [--ik-llama-cpp DIR] [--work DIR] [--formats f32,bf16,q8_0,q4_0]
                                     [--config bench/configs/deepseek-v2-lite.json --layers 27 --experts 8]

DIR is a source folder of each project with its llama-bench and llama-quantize built in DIR/build/bin (a project
left out gets an empty column: a run with one of them, then a run with both, measures each once; --no-4096 leaves out a
project's 4096-token tests). Nothing is
fetched: the script writes one random-weight bf16 checkpoint of the published config (cut to --layers/--experts)
with a small byte-level BPE tokenizer, converts it with each project's own convert_hf_to_gguf.py (f32, bf16, q8_0;
q4_0 through llama-quantize), runs llama-bench on every GGUF and `mla bench` on the safetensors folder, and prints
one markdown table (tok/s, mean of -r runs) with the ratios. llama-bench's own JSON is kept in --work; a GGUF is
deleted once measured (--keep-gguf keeps them).

Why 27 layers: both projects recognise a DeepSeek-V2 model without q_lora_rank ("lite") only by its layer count (26
or 27; src/models/deepseek2.cpp), so a cut to fewer layers does not load in either. The 27-layer, 8-expert cut has
V2-Lite's depth, attention and active parameters per token (top-6 routing): only the unused experts are left out.
The flag variants (llama.cpp -fa 0/1, ik_llama.cpp -rtr 0/1, which its llama-bench takes one at a time) are tried
on pp512 and tg32; the longer tests run with the better one of each.

Depth rows: llama.cpp's llama-bench measures tg with D tokens already cached (-d D), ik_llama.cpp's after a D-token
prompt (-gp D,32), mla-engine's with -d D. mla-engine's JSON is kept in --work as well, so an interrupted run resumes."""
import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FORMATS = {  # gguf type -> (mla bench flags, label); activations: --dtype auto (bf16 where the CPU multiplies bf16)
    "f32": (["--dtype", "float32"], "float32"),
    "bf16": ([], "bf16"),
    "q8_0": (["--weight-dtype", "int8"], "int8 / Q8_0"),
    "q4_0": (["--weight-dtype", "int4"], "int4 / Q4_0"),
}
# The converter hashes the tokenizer's output to name its pre-tokenizer; a tokenizer made here has no known hash,
# so the converter is told the one DeepSeek-V2 uses. llama-bench never tokenizes text.
CONVERT = """
import importlib.util, sys
sys.path.insert(0, {gguf_py!r})
sys.path.insert(0, {root!r})
spec = importlib.util.spec_from_file_location("convert_hf_to_gguf", {script!r})
mod = importlib.util.module_from_spec(spec)
sys.modules["convert_hf_to_gguf"] = mod
spec.loader.exec_module(mod)
for m in list(sys.modules.values()):  # the class that defines it (Model, or conversion.base's in newer trees)
    for v in list(getattr(m, "__dict__", dict()).values()):
        if isinstance(v, type) and "get_vocab_base_pre" in vars(v):
            v.get_vocab_base_pre = lambda self, tokenizer: "deepseek-llm"
sys.argv = ["convert_hf_to_gguf.py", {model!r}, "--outtype", {outtype!r}, "--outfile", {out!r}]
mod.main()
"""


def sh(cmd, **kw):
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    return subprocess.run(cmd, check=True, **kw)


def run_measured(cmd: list[str], out: str):
    """Runs cmd with its stdout to the file out (written whole or not at all) and the peak resident memory of the
    process in bytes beside it (peak_file; its own rusage: mapped model pages it touched count, as they occupy
    memory)."""
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    with open(out + ".part", "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.DEVNULL if "llama-bench" in cmd[0] else None)
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"{cmd[0]} failed (exit {os.waitstatus_to_exitcode(status)}); its output: {out}.part")
    with open(peak_file(out), "w") as f:
        f.write(str(usage.ru_maxrss * 1024))
    os.replace(out + ".part", out)


def peak_file(json_file: str) -> str:
    return json_file.removesuffix(".json") + ".peak"


def make_tokenizer(path: str):
    """A small byte-level BPE (with merges, which llama.cpp's gpt2 vocab loader needs)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = [open(os.path.join(ROOT, "README.md")).read()] * 4
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=600, special_tokens=["<bos>", "<eos>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>").save_pretrained(path)


def checkpoint(args) -> str:
    sys.path.insert(0, ROOT)
    import torch

    from models.random_checkpoint import cut_config, write_random_checkpoint
    path = os.path.join(args.work, "model")
    if not os.path.exists(os.path.join(path, "config.json")):
        write_random_checkpoint(cut_config(args.config, path, layers=args.layers, experts=args.experts),
                                torch.bfloat16)
        with open(os.path.join(path, "config.json")) as f:
            cfg = json.load(f)
        cfg.update(bos_token_id=0, eos_token_id=1)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(cfg, f, indent=1)
        make_tokenizer(path)
    return path


def gguf(project: str, model: str, fmt: str, work: str, q4_from: str = "bf16") -> str:
    """The GGUF of the checkpoint in fmt by project's converter (q4_0: llama-quantize from the q4_from GGUF)."""
    name = os.path.basename(os.path.normpath(project))
    out = os.path.join(work, f"{name}-{fmt}.gguf")
    if os.path.exists(out):
        return out
    if fmt == "q4_0":
        src = gguf(project, model, q4_from, work)
        sh([os.path.join(project, "build", "bin", "llama-quantize")] + (["--allow-requantize"] if q4_from != "bf16" else []) +
           [src, out, "Q4_0", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return out
    code = CONVERT.format(gguf_py=os.path.join(project, "gguf-py"), root=project, script=os.path.join(project, "convert_hf_to_gguf.py"),
                          model=model, outtype=fmt, out=out)
    log = os.path.join(work, f"{name}-{fmt}.convert.log")
    with open(log, "w") as f:
        sh([sys.executable, "-c", code], stdout=f, stderr=subprocess.STDOUT)
    return out


def llama_bench(project: str, model: str, flags: list[str], tests: list[str], reps: int, work: str, tag: str) -> list:
    out = os.path.join(work, f"{tag}.json")
    if not os.path.exists(out):
        cmd = [os.path.join(project, "build", "bin", "llama-bench"), "-m", model, "-t", "2", "-r", str(reps),
               "-o", "json"] + flags + tests
        run_measured(cmd, out)
    with open(out) as f:
        return json.load(f)


def peak_gib(work: str, tags: list[str]) -> float | None:
    """The largest peak resident memory of the runs tagged (None when a run was measured before peaks were kept)."""
    peaks = []
    for t in tags:
        f = peak_file(os.path.join(work, f"{t}.json"))
        if not os.path.exists(f):
            return None
        peaks.append(int(open(f).read()))
    return max(peaks) / 2 ** 30 if peaks else None


def best(rows: list, **match) -> dict:
    """The fastest of the rows that match (over the flag variants: -fa 0/1, -rtr 0/1)."""
    keep = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
    return max(keep, key=lambda r: r["avg_ts"]) if keep else None


def anchors(args, model: str, fmt: str) -> dict:
    """tok/s per test name for llama.cpp and ik_llama.cpp."""
    res, shared = {}, None
    for name, project, flags, flag, depth_tests in (
            ("llama.cpp", args.llama_cpp, [], "-fa", ["-p", "0", "-n", "32", "-d", "512,4096"]),
            ("ik_llama.cpp", args.ik_llama_cpp, ["-mla", "3", "-fa", "1", "-fmoe", "1"], "-rtr",
             ["-gp", "512,32", "-gp", "4096,32"])):
        if project is None:
            res[name] = {}
            continue
        short_only = name in args.no_4096.split(",")
        if short_only:  # no test of 4096 tokens: tg @ d512 is the deepest
            depth_tests = ["-p", "0", "-n", "32", "-d", "512"] if name == "llama.cpp" else ["-gp", "512,32"]
        no_pp4096 = short_only or name in args.no_pp4096.split(",")
        tags = [f"{name}-{fmt}-short{flag}0", f"{name}-{fmt}-short{flag}1"] + \
            ([] if no_pp4096 else [f"{name}-{fmt}-pp4096"]) + \
            ([f"{name}-{fmt}-depth512"] if short_only else [f"{name}-{fmt}-depth"])
        measured = all(os.path.exists(os.path.join(args.work, f"{t}.json")) for t in tags)
        path = None if measured else gguf_for(args, project, model, fmt)  # measured before: no GGUF needed
        short = {v: llama_bench(project, path, flags + [flag, v], ["-p", "512", "-n", "32"], args.reps, args.work,
                                f"{name}-{fmt}-short{flag}{v}") for v in ("0", "1")}
        cost = {v: sum((r["n_prompt"] + r["n_gen"]) / r["avg_ts"] for r in rows) for v, rows in short.items()}
        best = min(cost, key=cost.get)
        flags = flags + [flag, best]
        pp4096 = f"{name}-{fmt}-pp4096"  # with --no-4096, kept where an earlier run measured it
        long = [] if no_pp4096 and not os.path.exists(os.path.join(args.work, f"{pp4096}.json")) else \
            llama_bench(project, path, flags, ["-p", "4096", "-n", "0"], args.reps, args.work, pp4096)
        deep = llama_bench(project, path, flags, depth_tests, args.reps, args.work, tags[-1])
        r = {"flags": " ".join(flags), "peak": peak_gib(args.work, tags)}
        for row in short[best] + long + [row for row in deep if row["n_gen"] == 32]:
            # llama.cpp reports a depth as n_depth; ik_llama.cpp's -gp as the prompt before the generation
            depth = row.get("n_depth", 0) or (row["n_prompt"] if row["n_gen"] else 0)
            test = f"pp{row['n_prompt']}" if not row["n_gen"] else f"tg{row['n_gen']}" + (f" @ d{depth}" if depth else "")
            r.setdefault(test, row["avg_ts"])
        res[name] = r
        if path and args.one_gguf:  # the other project may run it still
            shared = path
        elif path:
            done_with(args, path, fmt)
    if shared:
        done_with(args, shared, fmt)
    return res


def gguf_for(args, project: str, model: str, fmt: str) -> str:
    """The GGUF project runs: of its own converter, or with --one-gguf the first given project's (the same file for
    both)."""
    converter = (args.llama_cpp or args.ik_llama_cpp) if args.one_gguf else project
    return gguf(converter, model, fmt, args.work, args.q4_from)


def done_with(args, path: str, fmt: str):
    """Deletes a measured GGUF (unless --keep-gguf), keeping the source of a Q4_0 still to be made."""
    q4 = path.removesuffix(f"-{fmt}.gguf") + "-q4_0.gguf"
    if args.keep_gguf or (fmt == args.q4_from and "q4_0" in args.formats.split(",") and not os.path.exists(q4)):
        return
    os.remove(path)


def ours(args, model: str, fmt: str) -> dict:
    flags, _ = FORMATS[fmt]
    r, tags = {}, []
    for i, tests in enumerate((["-p", "512,4096", "-n", "0"], ["-p", "0", "-n", "32", "-d", "0,512,4096"])):
        tags.append(f"mla-engine-{fmt}-{('pp', 'tg')[i]}")
        out = os.path.join(args.work, f"{tags[-1]}.json")
        if not os.path.exists(out):
            cmd = [sys.executable, os.path.join(ROOT, "cli.py"), "bench", "--model", model, "-r", str(args.reps),
                   "--output", "json"] + flags + tests
            run_measured(cmd, out)
        with open(out) as f:
            r.update({row["test"]: row["tps"] for row in json.load(f)})
    r["peak"] = peak_gib(args.work, tags)
    return r


def fmt_ts(x):
    return "-" if x is None else f"{x:.1f}"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--llama-cpp")
    p.add_argument("--ik-llama-cpp")
    p.add_argument("--work", default=os.path.join(os.path.expanduser("~"), ".cache", "mla-engine", "compare"))
    p.add_argument("--config", default=os.path.join(HERE, "configs", "deepseek-v2-lite.json"))
    p.add_argument("--layers", type=int, default=27)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--formats", default="f32,bf16,q8_0,q4_0")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--skip-ours", action="store_true", help="only the anchors (e.g. to measure them first)")
    p.add_argument("--keep-gguf", action="store_true")
    p.add_argument("--one-gguf", action="store_true",
                   help="both anchors run the GGUFs of the first project given (its converter; one file per format)")
    p.add_argument("--q4-from", default="bf16", choices=["bf16", "q8_0"],
                   help="the GGUF llama-quantize makes Q4_0 from (q8_0, with --allow-requantize: for the full-size "
                        "model, whose 31 GB bf16 GGUF next to its checkpoint may not fit the disk)")
    p.add_argument("--no-4096", default="", metavar="PROJECTS",
                   help="e.g. llama.cpp: leave out its pp4096 and tg @ d4096 (each 4096-token prompt takes it minutes)")
    p.add_argument("--no-pp4096", default="", metavar="PROJECTS", help="leave out only the projects' pp4096")
    args = p.parse_args()
    os.makedirs(args.work, exist_ok=True)
    model = checkpoint(args)
    lines = ["| test | format | mla-engine | llama.cpp | ik_llama.cpp | mla / llama.cpp | mla / ik |", "|" + "---|" * 7]
    ratios = []
    for fmt in args.formats.split(","):
        a = anchors(args, model, fmt)
        o = {} if args.skip_ours else ours(args, model, fmt)
        for test in ("pp512", "pp4096", "tg32", "tg32 @ d512", "tg32 @ d4096"):
            m, lc, ik = o.get(test), a["llama.cpp"].get(test), a["ik_llama.cpp"].get(test)
            rl = m / lc if m and lc else None
            ri = m / ik if m and ik else None
            if ri:
                ratios.append(ri)
            lines.append(f"| {test} | {FORMATS[fmt][1]} | {fmt_ts(m)} | {fmt_ts(lc)} | {fmt_ts(ik)} | "
                         f"{fmt_ts(rl) if rl is None else f'{rl:.2f}'} | {fmt_ts(ri) if ri is None else f'{ri:.2f}'} |")
        peaks = [o.get("peak"), a["llama.cpp"].get("peak"), a["ik_llama.cpp"].get("peak")]
        lines.append(f"| peak memory (GiB) | {FORMATS[fmt][1]} | " + " | ".join("-" if g is None else f"{g:.2f}" for g in peaks)
                     + " | | |")
        print("\n".join(lines[-6:]), file=sys.stderr, flush=True)
    print("\n".join(lines))
    if ratios:
        print(f"\ngeometric mean mla / ik_llama.cpp over {len(ratios)} rows: "
              f"{statistics.geometric_mean(ratios):.2f}")


if __name__ == "__main__":
    main()
