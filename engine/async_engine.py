"""The engine loop for a server: one thread owns the LLM and runs steps while there is work; other threads (an
asyncio event loop) only add and abort requests, and read what the loop sends to each request's asyncio queue.

Adds and aborts are queued and applied by the loop between steps, so nothing but the loop thread touches the LLM,
and a client, fast or slow, never holds up a step: outputs are handed over with loop.call_soon_threadsafe."""
import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from . import memory
from .llm import LLM, EngineStats
from .sampling_params import SamplingParams
from .sequence import RequestOutput, Sequence


# A loop idle this long after a step gives the heap's kept workspace back (engine/memory.py): a server's memory
# falls back to its weights and cache between bursts, and a steady stream of requests never pays the page faults.
IDLE_TRIM_S = 10.0


class QueueFull(Exception):
    """More requests are waiting than the server takes (--max-queued-requests)."""


@dataclass
class Output:
    """What one step (or the end) of a request gives its reader."""
    index: int  # the request's place in its HTTP request (prompt i, completion j -> i * n + j)
    text: str  # text added since the last output
    token_ids: list[int]  # tokens added since the last output
    logprobs: list | None  # their logprobs entries (when asked for)
    finish_reason: str | None = None
    result: RequestOutput | None = None  # the whole request, on its last output
    error: str | None = None  # the request could not run (a client's mistake when it comes before any token)


@dataclass(eq=False)
class Request:
    """One sequence of an HTTP request, as the loop sees it."""
    index: int
    token_ids: list[int]
    params: SamplingParams
    prompt: str | None
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    arrival: float = field(default_factory=time.perf_counter)
    seq: Sequence | None = None
    sent_tokens: int = 0
    first_token: float | None = None
    last_token: float | None = None
    done: bool = False


class StatsObserver:
    """What the loop reports (server/metrics.py records it); this one records nothing."""

    def first_token(self, seconds: float): ...

    def next_token(self, seconds: float): ...

    def finished(self, num_prompt_tokens: int, num_output_tokens: int, seconds: float): ...


class AsyncEngine:
    def __init__(self, llm: LLM, max_queued_requests: int | None = None, observer: StatsObserver | None = None):
        self.llm = llm
        self.max_queued_requests = max_queued_requests
        self.observer = observer or StatsObserver()
        self.stats: EngineStats = llm.stats()  # refreshed by the loop after every change
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._adds: deque[Request] = deque()
        self._aborts: deque[Request] = deque()
        self._requests: dict[int, Request] = {}  # seq_id -> request, for the ones in the engine
        self._stopping = False
        self.error: str | None = None  # set if the loop itself died (then /health fails)
        self._thread = threading.Thread(target=self._run, name="mla-engine-loop", daemon=True)

    def start(self):
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def stop(self, timeout: float = 5.0):
        """Abort what is in flight and end the loop (it finishes the step it is in)."""
        with self._lock:
            self._stopping = True
        self._wake.set()
        self._thread.join(timeout)

    # ---- the HTTP side (any thread) ----------------------------------------------------------------------------
    def check(self, token_ids: list[int], params: SamplingParams):
        """What add_request would refuse, said before anything is queued (ValueError). Reads only settings."""
        self.llm.check_request(token_ids, params)
        capacity = self.llm.blocks.num_blocks * self.llm.blocks.block_size
        need = min(len(token_ids) + params.max_tokens, self.llm.config.max_model_len)
        if need > capacity:
            raise ValueError(f"the request needs {need} tokens of KV cache but the cache holds {capacity}; "
                             "lower max_tokens")

    def add(self, requests: list[Request]):
        """Queue the sequences of one HTTP request (all or none: QueueFull when the waiting queue is full)."""
        with self._lock:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            waiting = len(self._adds) + self.stats.num_waiting
            if self.max_queued_requests is not None and waiting + len(requests) > self.max_queued_requests:
                raise QueueFull(f"{waiting} requests are waiting (--max-queued-requests {self.max_queued_requests})")
            self._adds.extend(requests)
        self._wake.set()

    def abort(self, requests: list[Request]):
        """Stop these sequences and free their cache (a client left); finished ones are left alone."""
        with self._lock:
            self._aborts.extend(r for r in requests if not r.done)
        self._wake.set()

    # ---- the loop thread ------------------------------------------------------------------------------------------
    def _send(self, r: Request, out: Output):
        try:
            r.loop.call_soon_threadsafe(r.queue.put_nowait, out)
        except RuntimeError:  # its event loop has closed (the server is stopping): nobody is left to read it
            pass

    def _finish(self, r: Request, now: float):
        r.done = True
        seq = r.seq
        self._requests.pop(seq.seq_id, None)
        self.observer.finished(min(seq.num_cached_tokens, seq.num_prompt_tokens), len(seq.output_token_ids),
                               now - r.arrival)

    def _apply_queued(self):
        with self._lock:
            adds, aborts = list(self._adds), list(self._aborts)
            self._adds.clear()
            self._aborts.clear()
            stopping = self._stopping
        for r in adds:
            try:
                r.seq = self.llm.add_request(r.token_ids, r.params, r.prompt)
            except ValueError as e:
                r.done = True
                self._send(r, Output(r.index, "", [], None, error=str(e)))
                continue
            self._requests[r.seq.seq_id] = r
        if stopping:
            aborts = list(self._requests.values())
        now = time.perf_counter()
        for r in aborts:
            if r.done or r.seq is None:
                continue
            self.llm.abort(r.seq, free=True)
            self._finish(r, now)
            self._send(r, Output(r.index, "", [], None, finish_reason="abort", result=r.seq.output()))
        return stopping

    def _run(self):
        stepped = False  # since the heap was last trimmed
        try:
            while True:
                self._wake.clear()
                stopping = self._apply_queued()
                self.stats = self.llm.stats()
                if stopping:
                    return
                if self.llm.scheduler.idle:
                    if not stepped:
                        self._wake.wait()
                    elif not self._wake.wait(IDLE_TRIM_S):
                        memory.trim_heap()
                        stepped = False
                    continue
                stepped = True
                self._step()
        except BaseException as e:  # the loop cannot go on: every open request is told, /health reports it
            self.error = f"{type(e).__name__}: {e}"
            for r in list(self._requests.values()) + list(self._adds):
                self._send(r, Output(r.index, "", [], None, error=f"the engine stopped ({self.error})"))
            raise

    def _step(self):
        try:
            events = self.llm.step()
        except Exception as e:  # the step's requests were aborted by the engine, which stays usable
            now = time.perf_counter()
            for r in list(self._requests.values()):
                if r.seq.finished:
                    self._finish(r, now)
                    self._send(r, Output(r.index, "", [], None, error=f"the step failed ({type(e).__name__}: {e})"))
            return
        now = time.perf_counter()
        for seq, text in events:
            r = self._requests.get(seq.seq_id)
            if r is None:  # not ours (cannot happen: the loop owns the engine)
                continue
            if r.first_token is None:
                self.observer.first_token(now - r.arrival)
                r.first_token = now
            else:
                self.observer.next_token(now - r.last_token)
            r.last_token = now
            new = seq.output_token_ids[r.sent_tokens:]
            logprobs = seq.logprobs[r.sent_tokens:] if seq.params.logprobs is not None else None
            r.sent_tokens += len(new)
            out = Output(r.index, text, new, logprobs, finish_reason=seq.finish_reason)
            if seq.finished:
                self._finish(r, now)
                out.result = seq.output()
            self._send(r, out)
