"""Several ranks, one engine (tensor_parallel_size > 1). This process is rank 0: it owns the tokenizer, the
scheduler and the outputs. It starts the other ranks itself (torch.multiprocessing, spawn); each loads only its share
of the weights (models/parallel.py) and its own copy of the latent cache, then waits for work. Every call of the
model that runs collectives (a forward pass, the logits) is announced to them first, with what it needs (token ids
and the step's metadata), by one broadcast; then all ranks run it together. gloo on CPUs, NCCL on GPUs."""
import atexit
import dataclasses
import socket
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from models.parallel import Parallel

TIMEOUT = timedelta(minutes=30)  # loading a large model's share can take long


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(config, rank: int, port: int) -> Parallel:
    size = config.tensor_parallel_size
    device = config.torch_device
    if device.type == "cuda":
        torch.cuda.set_device(device.index or 0)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=size, timeout=TIMEOUT)
    return Parallel(rank, size)


def _to(obj, device):
    """Tensors (in dataclasses, tuples) moved to device: what a rank receives, placed on its own device."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if dataclasses.is_dataclass(obj):
        return dataclasses.replace(obj, **{f.name: _to(getattr(obj, f.name), device) for f in dataclasses.fields(obj)})
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(x, device) for x in obj)
    return obj


def _rank_device(config, rank: int) -> torch.device:
    d = config.torch_device
    return torch.device("cuda", (d.index or 0) + rank) if d.type == "cuda" else d


def _worker(config, rank: int, port: int):
    try:
        _serve(config, rank, port)
    except Exception as e:  # one line: rank 0 reports the failure of the group
        print(f"mla: rank {rank}: {' '.join(str(e).split()) or type(e).__name__}", file=sys.stderr)
        sys.exit(1)


def _serve(config, rank: int, port: int):
    from .model_runner import build_rank
    par = _init(config, rank, port)
    model, cache, _ = build_rank(config, par, _rank_device(config, rank))
    dist.barrier()  # loaded: rank 0 may start
    while True:
        msg = [None]
        dist.broadcast_object_list(msg, src=0)
        kind, args = msg[0]
        if kind == "stop":
            break
        args = _to(args, model.device)
        if kind == "forward":
            model.forward(*args, cache)
        else:
            model.logits(*args)
    dist.destroy_process_group()


class Ranks:
    """Rank 0's handle on the other ranks: starts them, joins the group (par), and announces each collective call."""

    def __init__(self, config):
        port = _free_port()
        ctx = torch.multiprocessing.get_context("spawn")
        self.workers = [ctx.Process(target=_worker, args=(config, r, port), daemon=True)
                        for r in range(1, config.tensor_parallel_size)]
        for p in self.workers:
            p.start()
        try:
            self.par = _init(config, 0, port)
        except BaseException:
            self.close()
            raise
        atexit.register(self.close)

    def wrap(self, model) -> "ParallelModel":
        return ParallelModel(model, self)

    def ready(self):
        """Every rank has loaded its share (rank 0 calls this once its own is loaded)."""
        dist.barrier()

    def announce(self, kind: str, args: tuple):
        dist.broadcast_object_list([(kind, _to(args, "cpu"))], src=0)

    def close(self):
        if not self.workers:
            return
        try:
            if dist.is_initialized():
                self.announce("stop", ())
                dist.destroy_process_group()
        except Exception as e:  # a rank that died already: nothing to tell it
            print(f"mla: closing the ranks: {e}", file=sys.stderr)
        for p in self.workers:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
        self.workers = []


class ParallelModel:
    """Rank 0's model: the same interface as DeepseekModel; its collective calls are announced to the other ranks."""

    def __init__(self, model, ranks: Ranks):
        self.model, self.ranks = model, ranks

    def __getattr__(self, name):
        return getattr(self.model, name)

    @torch.inference_mode()
    def forward(self, input_ids, meta, cache, layers=None):
        self.ranks.announce("forward", (input_ids, meta))
        return self.model.forward(input_ids, meta, cache, layers)

    @torch.inference_mode()
    def logits(self, hidden):
        self.ranks.announce("logits", (hidden,))
        return self.model.logits(hidden)
