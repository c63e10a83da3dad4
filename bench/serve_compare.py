"""`mla serve` next to llama.cpp's llama-server and ik_llama.cpp's server on the same weights, on this machine.

    python bench/serve_compare.py --work DIR [--llama-cpp DIR] [--ik-llama-cpp DIR] [--formats bf16,q4_0]
        [--servers mla,llama.cpp,ik_llama.cpp] [--concurrency 1,4,16] [--num-prompts 4,4,16]
        [--prompt-lens 16,1024] [--gen-lens 16,256] [--turns 1] [--user-lens 16,64] [--threads 2]

--work holds the checkpoint of bench/llamacpp_compare.py (DIR/model: the 27-layer, 8-expert V2-Lite cut, random
bf16 weights) and its GGUFs (DIR/llama.cpp-bf16.gguf, ...-q4_0.gguf); what is missing is made by that script's own
functions (the GGUFs by --llama-cpp's converter and llama-quantize, else --ik-llama-cpp's). Both llama.cpp projects
read the same GGUF; mla serve reads the safetensors folder, quantized to int4 at load for q4_0.

For every format, server and concurrency C: the server is started on 127.0.0.1 at a free port (llama-server with
C slots of a context that holds the longest request, as continuous batching with -np C; mla serve with
--max-num-seqs C), so that every run starts with an empty cache, the same requests (tools/bench_serve: random token ids, greedy, EOS ignored, streamed) are sent
with at most C in flight (--num-prompts gives the count at each concurrency; with --turns T that many conversations
of T turns), and the server is stopped. Each run's numbers are kept as JSON in --work/serve (an interrupted run
resumes) and one markdown table is printed. Server variant mla-no-prefix-cache is mla serve --no-prefix-caching."""
import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import llamacpp_compare  # noqa: E402
from tools import bench_serve  # noqa: E402

MLA_FLAGS = {"bf16": [], "q4_0": ["--weight-dtype", "int4"], "q8_0": ["--weight-dtype", "int8"]}
LABEL = {"bf16": "bf16", "q4_0": "int4 / Q4_0", "q8_0": "int8 / Q8_0"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One server process on 127.0.0.1; ready once /health answers 200 (waited for at most `timeout` seconds)."""

    def __init__(self, cmd: list[str], port: int, log: str, timeout: float = 1800):
        import httpx
        print("+", " ".join(cmd), file=sys.stderr, flush=True)
        self.url = f"http://127.0.0.1:{port}"
        # in the log's folder: ik_llama.cpp's server writes a llama.log into its working directory
        self.proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=os.path.dirname(log))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{cmd[0]} exited with {self.proc.returncode}; see {log}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(2)
        self.stop()
        raise RuntimeError(f"{cmd[0]}: no /health within {timeout:.0f} s; see {log}")

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def command(server: str, fmt: str, args, port: int, slots: int, ctx: int) -> list[str]:
    if server.startswith("mla"):
        return [sys.executable, os.path.join(ROOT, "cli.py"), "serve", "--model", os.path.join(args.work, "model"),
                "--port", str(port), "--max-num-seqs", str(slots), "--threads", str(args.threads),
                "--log-level", "warning"] + MLA_FLAGS[fmt] + (["--no-prefix-caching"] if "no-prefix" in server else [])
    project = args.llama_cpp if server == "llama.cpp" else args.ik_llama_cpp
    extra = ["-mla", "3", "-fa", "on"] if server == "ik_llama.cpp" else []
    return [os.path.join(project, "build", "bin", "llama-server"), "-m", args.gguf[fmt], "--host", "127.0.0.1", "--port",
            str(port), "-np", str(slots), "-c", str(slots * ctx), "-t", str(args.threads), "--cont-batching"] + extra


def measure(server: str, fmt: str, args, workloads: dict) -> dict:
    """{concurrency: Result.flat()} for one server and format; runs what --work/serve does not hold yet."""
    out = {}
    todo = []
    for c, sessions in workloads.items():
        path = os.path.join(args.work, "serve", f"{server}-{fmt}-c{c}-t{args.turns}.json")
        if os.path.exists(path):
            with open(path) as f:
                out[c] = json.load(f)
        else:
            todo.append((c, sessions, path))
    # a fresh server per concurrency, with C slots for llama-server: each run starts with an empty cache
    for c, sessions, path in todo:
        # llama-server's slot context: the longest request plus room (with 16, ik_llama.cpp's server stopped one
        # request of 452 tokens for exceeding its 468-token slot)
        ctx = max(len(r.prompt_token_ids) + r.max_tokens for chat in sessions for r in chat) + 64
        port = free_port()
        s = Server(command(server, fmt, args, port, c, ctx), port,
                   os.path.join(args.work, "serve", f"{server}-{fmt}-c{c}-t{args.turns}.log"))
        try:
            print(f"{server} {fmt}: concurrency {c}, {sum(map(len, sessions))} requests", file=sys.stderr, flush=True)
            r = bench_serve.run_http(s.url, sessions, c).flat()
            print(json.dumps(r), file=sys.stderr, flush=True)
            with open(path, "w") as f:
                json.dump(r, f)
            out[c] = r
        finally:
            s.stop()
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", required=True)
    p.add_argument("--llama-cpp")
    p.add_argument("--ik-llama-cpp")
    p.add_argument("--formats", default="bf16,q4_0")
    p.add_argument("--servers", default="mla,llama.cpp,ik_llama.cpp",
                   help="any of mla, mla-no-prefix-cache, llama.cpp, ik_llama.cpp")
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--num-prompts", default="4,4,16", help="requests (or conversations) at each concurrency")
    p.add_argument("--prompt-lens", default="16,1024")
    p.add_argument("--gen-lens", default="16,256")
    p.add_argument("--turns", type=int, default=1)
    p.add_argument("--user-lens", default="16,64")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    args = p.parse_args()
    args.work = os.path.abspath(args.work)  # the servers run in --work/serve, so every path given them is absolute
    lens = lambda s: tuple(int(x) for x in s.split(","))  # noqa: E731
    conc, nums = lens(args.concurrency), lens(args.num_prompts)
    if len(conc) != len(nums):
        p.error("--num-prompts needs one count per --concurrency")
    servers = args.servers.split(",")
    for name, flag in (("llama.cpp", args.llama_cpp), ("ik_llama.cpp", args.ik_llama_cpp)):
        if name in servers and not flag:
            p.error(f"server {name} needs --{name.replace('.', '-').replace('_', '-')} DIR")
    os.makedirs(os.path.join(args.work, "serve"), exist_ok=True)
    model = llamacpp_compare.checkpoint(argparse.Namespace(
        work=args.work, config=os.path.join(HERE, "configs", "deepseek-v2-lite.json"), layers=27, experts=8))
    converter = args.llama_cpp or args.ik_llama_cpp
    anchors = any(not s.startswith("mla") for s in servers)
    args.gguf = {f: llamacpp_compare.gguf(converter, model, f, args.work) for f in args.formats.split(",")} if anchors else {}
    from models.config import ModelConfig
    vocab = ModelConfig.from_hf(model).vocab_size
    workloads = {c: bench_serve.make_chats(n, args.turns, lens(args.prompt_lens), lens(args.user_lens),
                                           lens(args.gen_lens), vocab) for c, n in zip(conc, nums)}
    results = {(s, f): measure(s, f, args, workloads) for f in args.formats.split(",") for s in servers}
    ms = lambda r: f"{1e3 * r['ttft_p50_s']:.0f}"  # noqa: E731
    head = ["format", "concurrency", "requests"] + [f"{s} output tok/s" for s in servers] + \
        [f"{s} TTFT p50 ms" for s in servers] + [f"{s} ITL p50 ms" for s in servers] + \
        [f"{s} prompt tokens cached" for s in servers]
    ref = next((s for s in servers if not s.startswith("mla")), None)
    if ref and "mla" in servers:
        head += [f"mla / {ref} tok/s", f"mla / {ref} TTFT p50"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for f in args.formats.split(","):
        for c in conc:
            rows = [results[s, f][c] for s in servers]
            cells = [LABEL[f], str(c), str(rows[0]["requests"])]
            cells += [f"{r['output_tps']:.2f}" + (f" ({r['failed']} failed)" if r["failed"] else "") for r in rows]
            cells += [ms(r) for r in rows] + [f"{1e3 * r['itl_p50_s']:.0f}" for r in rows]
            cells += ["-" if r["cached_tokens"] is None else str(r["cached_tokens"]) for r in rows]
            if ref and "mla" in servers:
                m, o = results["mla", f][c], results[ref, f][c]
                cells += [f"{m['output_tps'] / o['output_tps']:.2f}", f"{m['ttft_p50_s'] / o['ttft_p50_s']:.2f}"]
            lines.append("| " + " | ".join(cells) + " |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
