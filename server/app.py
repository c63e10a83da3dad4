"""The HTTP side of `mla serve`: OpenAI's routes on FastAPI. It parses, validates, queues and streams; the engine
loop (engine/async_engine.py) runs the model. Every refusal is an OpenAI error object; a client that leaves has
its requests aborted at once."""
import asyncio
import hmac
import json
import logging
import time
import uuid

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.async_engine import AsyncEngine, Output, QueueFull
from engine.async_engine import Request as EngineRequest
from engine.llm import LLM, load_tokenizer
from engine.sampling_params import SamplingParams

from .metrics import CONTENT_TYPE, Metrics
from .protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, Sampling, TokenizeRequest,
                       error_body)

log = logging.getLogger("mla.serve")
MAX_LOGPROBS = 20  # top-N per token (OpenAI's chat limit; vLLM's default max_logprobs)
RETRY_AFTER_S = 1


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, type_: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code

    def response(self, headers: dict | None = None) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.type, self.param, self.code), self.status, headers=headers)


class TextSide:
    """The HTTP side's own tokenizer: a fast tokenizer is not safe to use from two threads while the engine loop
    decodes with its own. The same encode / chat checks as LLM's."""
    encode = LLM.encode
    chat_prompt = LLM.chat_prompt

    def __init__(self, model_dir: str):
        self.tokenizer = load_tokenizer(model_dir)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids) if self.tokenizer is not None else ""


# ---- guards before any route: API key, body size ----------------------------------------------------------------
class Guard:
    """ASGI middleware: the API key (bearer token, compared in constant time) on /v1, /tokenize and /detokenize, and
    the body size bound, checked while the body is read and before anything parses it."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app, self.max_body_bytes = app, max_body_bytes
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if self.expected is not None and (path.startswith("/v1/") or path in ("/tokenize", "/detokenize")):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                return await ApiError(401, "a missing or wrong API key: send Authorization: Bearer <key>",
                                      code="invalid_api_key").response()(scope, receive, send)
        too_big = ApiError(413, f"the request body is larger than {self.max_body_bytes} bytes", code="request_too_large")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            return await too_big.response({"Connection": "close"})(scope, receive, send)
        body, more = [], True
        size = 0
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            size += len(message.get("body", b""))
            if size > self.max_body_bytes:
                return await too_big.response({"Connection": "close"})(scope, receive, send)
            body.append(message.get("body", b""))
            more = message.get("more_body", False)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(body), "more_body": False}
            return await receive()
        await self.app(scope, replay, send)


# ---- helpers ---------------------------------------------------------------------------------------------------
def _parse(model: type[BaseModel], raw: bytes):
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        err = e.errors()[0]
        if err["type"] == "json_invalid":
            raise ApiError(400, f"the body is not valid JSON ({err['msg'].removeprefix('Invalid JSON: ')})") from None
        loc = [str(x) for x in err["loc"] if isinstance(x, (str, int))]
        param = loc[0] if loc else None
        # a union's errors name its members (str, list[int], ...): the path up to the first of those
        path = ".".join(x for x in loc if "[" not in x and x not in ("str", "int", "float", "bool"))
        raise ApiError(400, f"{path or 'body'}: {err['msg']}", param) from None


def _params(fields: dict, llm: LLM) -> SamplingParams:
    """SamplingParams from the request's fields over the checkpoint's defaults; a bad value is a 400 naming it."""
    try:
        return llm.sampling_params(**{k: v for k, v in fields.items() if v is not None})
    except ValueError as e:
        name = str(e).split()[0].split("=")[0]
        raise ApiError(400, str(e), name if name in fields else None) from None


def _sampling_fields(r: Sampling) -> dict:
    return dict(temperature=r.temperature, top_p=r.top_p, seed=r.seed, stop=r.stop, n=r.n,
                presence_penalty=r.presence_penalty, frequency_penalty=r.frequency_penalty, top_k=r.top_k,
                min_p=r.min_p, repetition_penalty=r.repetition_penalty, ignore_eos=r.ignore_eos,
                stop_token_ids=r.stop_token_ids, skip_special_tokens=r.skip_special_tokens)


def _usage(prompt_tokens: int, completion_tokens: int, reqs: list, n: int) -> dict:
    """cached_tokens: the prompt tokens the prefix cache held when each prompt (its first completion) started."""
    cached = sum(q.seq.num_prefix_cached or 0 for q in reqs if q.index % n == 0 and q.seq is not None)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens, "prompt_tokens_details": {"cached_tokens": cached}}


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _listen_for_disconnect(receive):
    while True:
        if (await receive())["type"] == "http.disconnect":
            return


async def _unless_disconnected(request: Request, coro):
    """(result, False), or (None, True) when the client went away first (the coroutine is cancelled)."""
    work = asyncio.ensure_future(coro)
    gone = asyncio.ensure_future(_listen_for_disconnect(request.receive))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
    if work.done() and not work.cancelled():
        return work.result(), False
    return None, True


class SSEResponse(StreamingResponse):
    """Server-sent events that end (and so abort their requests, in the body's finally) as soon as the client
    disconnects, whether or not a send is under way."""

    def __init__(self, content, **kw):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}, **kw)

    async def __call__(self, scope, receive, send):
        try:
            async with anyio.create_task_group() as tg:
                async def stream():
                    try:
                        await self.stream_response(send)
                    except OSError:  # the client went away mid-send
                        pass
                    tg.cancel_scope.cancel()
                tg.start_soon(stream)
                await _listen_for_disconnect(receive)
                tg.cancel_scope.cancel()
        finally:
            await self.body_iterator.aclose()


# ---- logprobs in OpenAI's two shapes ---------------------------------------------------------------------------
def _token_str(entries: dict, token: int) -> str:
    s = entries[token].decoded_token
    return s if s is not None else str(token)


def _completion_logprobs(token_ids, entries, offset: int) -> dict:
    """Completions style: parallel lists; top_logprobs maps token text -> logprob (the sampled one included)."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for t, e in zip(token_ids, entries):
        s = _token_str(e, t)
        out["tokens"].append(s)
        out["token_logprobs"].append(float(e[t]))
        out["top_logprobs"].append({_token_str(e, k): float(v) for k, v in e.items()})
        out["text_offset"].append(offset)
        offset += len(s)
    return out


def _chat_logprobs(token_ids, entries, n: int) -> list[dict]:
    def item(s, v):
        return {"token": s, "logprob": float(v), "bytes": list(s.encode("utf-8"))}
    out = []
    for t, e in zip(token_ids, entries):
        top = sorted(e.items(), key=lambda kv: kv[1].rank)[:n]
        out.append({**item(_token_str(e, t), e[t]), "top_logprobs": [item(_token_str(e, k), v) for k, v in top]})
    return out


# ---- the app ---------------------------------------------------------------------------------------------------
class Server:
    def __init__(self, engine: AsyncEngine, metrics: Metrics, model_name: str):
        self.engine, self.llm, self.metrics, self.model_name = engine, engine.llm, metrics, model_name
        self.text = TextSide(self.llm.config.model)
        self.created = int(time.time())

    @property
    def max_model_len(self) -> int:
        return self.llm.config.max_model_len

    def check_model(self, name: str | None):
        if name is not None and name != self.model_name:
            raise ApiError(404, f"The model `{name}` does not exist (this server has `{self.model_name}`)", "model",
                           code="model_not_found")

    def encode(self, text: str) -> list[int]:
        try:
            return self.text.encode(text)
        except ValueError as e:
            raise ApiError(400, str(e), "prompt") from None

    def max_tokens(self, ids: list[int], asked: int | None, param: str, prompt_param: str) -> int:
        """The asked max_tokens, checked against the context; None: what is left of it (and of the cache)."""
        if len(ids) > self.max_model_len - 1:
            raise ApiError(400, f"This model's maximum context length is {self.max_model_len} tokens; the prompt has "
                           f"{len(ids)}, leaving no room to generate", prompt_param)
        if asked is None:
            room = min(self.max_model_len, self.llm.blocks.num_blocks * self.llm.blocks.block_size) - len(ids)
            if room < 1:
                raise ApiError(400, f"the prompt has {len(ids)} tokens, which leaves no room to generate in the KV "
                               "cache", prompt_param)
            return room
        if isinstance(asked, int) and asked >= 1 and len(ids) + asked > self.max_model_len:
            raise ApiError(400, f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                           f"requested {len(ids) + asked} tokens ({len(ids)} in the prompt, {asked} in the "
                           "completion). Please reduce the prompt or max_tokens.", param)
        return asked

    def submit(self, prompts: list[list[int]], params: list[SamplingParams]) -> tuple[list[EngineRequest], asyncio.Queue]:
        """Check every sequence, then queue all of them (index i * n + j) or none."""
        for ids, p in zip(prompts, params):
            try:
                self.engine.check(ids, p)
            except ValueError as e:
                raise ApiError(400, str(e), "max_tokens" if "KV cache" in str(e) else "prompt") from None
        queue, loop = asyncio.Queue(), asyncio.get_running_loop()
        reqs = [EngineRequest(i * p.n + j, ids, copy, None, queue, loop)
                for i, (ids, p) in enumerate(zip(prompts, params)) for j, copy in enumerate(p.copies())]
        try:
            self.engine.add(reqs)
        except QueueFull as e:
            raise ApiError(503, f"the server is busy: {e}; retry later", type_="server_error",
                           code="overloaded") from None
        return reqs, queue

    async def first_output(self, request: Request, reqs, queue) -> Output | None:
        """Wait for the first output (a refusal from the engine is a 400); None if the client left meanwhile."""
        first, gone = await _unless_disconnected(request, queue.get())
        if gone:
            self.engine.abort(reqs)
            return None
        if first.error is not None:
            self.engine.abort(reqs)
            raise ApiError(400, first.error)
        return first

    async def collect(self, request: Request, reqs, queue, first: Output) -> list[Output] | None:
        """Every sequence's last output (None if the client left)."""
        async def rest():
            results, out = {}, first
            while True:
                if out.error is not None:
                    raise RuntimeError(out.error)
                if out.result is not None:
                    results[out.index] = out
                    if len(results) == len(reqs):
                        return [results[i] for i in range(len(reqs))]
                out = await queue.get()
        try:
            results, gone = await _unless_disconnected(request, rest())
        finally:
            self.engine.abort(reqs)  # a no-op for the finished ones
        return None if gone else results


def build_app(engine: AsyncEngine, metrics: Metrics, model_name: str, api_key: str | None = None,
              max_body_bytes: int = 16 * 2**20) -> FastAPI:
    s = Server(engine, metrics, model_name)
    llm = s.llm
    app = FastAPI(title="mla-engine", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        headers = {"Retry-After": str(RETRY_AFTER_S)} if e.status == 503 else None
        return e.response(headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        message = f"no route {request.method} {request.url.path}" if e.status_code in (404, 405) else str(e.detail)
        return JSONResponse(error_body(message, "invalid_request_error", None, e.status_code), e.status_code)

    @app.exception_handler(Exception)
    async def server_error(request, e: Exception):  # our bug, not the client's: logged with its traceback
        log.exception("internal error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body(f"internal server error ({type(e).__name__})", "server_error", None, 500), 500)

    @app.get("/health")
    async def health():
        if not engine.alive:
            return JSONResponse(error_body(f"the engine loop stopped: {engine.error}", "server_error"), 503)
        return Response(status_code=200)

    @app.get("/metrics")
    async def get_metrics():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": s.created,
                                            "owned_by": "mla-engine", "root": llm.config.model,
                                            "max_model_len": s.max_model_len}]}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        r = _parse(TokenizeRequest, await request.body())
        s.check_model(r.model)
        if (r.prompt is None) == (r.messages is None):
            raise ApiError(400, "give either prompt or messages", "prompt")
        if r.prompt is not None:
            if s.text.tokenizer is None:
                raise ApiError(400, "this checkpoint has no tokenizer", "prompt")
            ids = s.text.tokenizer(r.prompt, add_special_tokens=r.add_special_tokens).input_ids
        else:
            ids = _chat_ids(s, r.messages)
        return {"count": len(ids), "max_model_len": s.max_model_len, "tokens": ids, "token_strs": None}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        r = _parse(DetokenizeRequest, await request.body())
        s.check_model(r.model)
        vocab = llm.model_config.vocab_size
        bad = [t for t in r.tokens if not 0 <= t < vocab]
        if bad:
            raise ApiError(400, f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", "tokens")
        return {"prompt": s.text.decode(r.tokens)}

    @app.post("/v1/completions")
    async def completions(request: Request):
        r = _parse(CompletionRequest, await request.body())
        s.check_model(r.model)
        p = r.prompt
        if isinstance(p, str):
            prompts, texts = [s.encode(p)], [p]
        elif not p or (isinstance(p[0], list) and not all(p)):
            raise ApiError(400, "prompt must not be empty", "prompt")
        elif isinstance(p[0], str):
            prompts, texts = [s.encode(x) for x in p], list(p)
        elif isinstance(p[0], int):
            prompts, texts = [list(p)], [None]
        else:
            prompts, texts = [list(x) for x in p], [None] * len(p)
        if r.logprobs is not None and not 0 <= r.logprobs <= MAX_LOGPROBS:
            raise ApiError(400, f"logprobs must be in 0..{MAX_LOGPROBS}, got {r.logprobs}", "logprobs")
        params = []
        for ids in prompts:
            fields = dict(_sampling_fields(r), max_tokens=s.max_tokens(ids, r.max_tokens, "max_tokens", "prompt"),
                          logprobs=r.logprobs, prompt_logprobs=r.logprobs if r.echo else None)
            params.append(_params(fields, llm))
        if r.echo:  # the prompt's text as the tokenizer gives it back, for token prompts
            texts = [t if t is not None else s.text.decode(ids) for t, ids in zip(texts, prompts)]
        reqs, queue = s.submit(prompts, params)
        first = await s.first_output(request, reqs, queue)
        if first is None:
            return Response(status_code=499)
        rid, n = f"cmpl-{uuid.uuid4().hex}", r.n
        head = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model_name}
        num_prompt = sum(len(x) for x in prompts)
        if not r.stream:
            outs = await s.collect(request, reqs, queue, first)
            if outs is None:
                return Response(status_code=499)
            choices = []
            for out in outs:
                res, i = out.result, out.index // n
                text, logprobs = res.text, None
                if r.echo:
                    text = texts[i] + text
                if r.logprobs is not None:
                    logprobs = _completion_logprobs(res.token_ids, res.logprobs, len(texts[i]) if r.echo else 0)
                    if r.echo:
                        pl = res.prompt_logprobs
                        echo = _completion_logprobs(prompts[i][1:], pl[1:], 0)
                        first_tok = s.text.decode(prompts[i][:1])
                        logprobs = {"tokens": [first_tok] + echo["tokens"] + logprobs["tokens"],
                                    "token_logprobs": [None] + echo["token_logprobs"] + logprobs["token_logprobs"],
                                    "top_logprobs": [None] + echo["top_logprobs"] + logprobs["top_logprobs"],
                                    "text_offset": [0] + [o + len(first_tok) for o in echo["text_offset"]]
                                    + logprobs["text_offset"]}
                choices.append({"index": out.index, "text": text, "logprobs": logprobs,
                                "finish_reason": res.finish_reason})
            completion = sum(len(o.result.token_ids) for o in outs)
            return {**head, "choices": choices, "usage": _usage(num_prompt, completion, reqs, n),
                    "system_fingerprint": None}

        include_usage = bool(r.stream_options and r.stream_options.include_usage)

        async def events():
            offsets = [len(texts[k // n]) if r.echo else 0 for k in range(len(reqs))]
            completion, done, out = 0, 0, first
            try:
                if r.echo:
                    for k in range(len(reqs)):
                        yield _sse({**head, "choices": [{"index": k, "text": texts[k // n], "logprobs": None,
                                                         "finish_reason": None}]})
                while True:
                    if out.error is not None:
                        yield _sse(error_body(out.error, "server_error"))
                        break
                    completion += len(out.token_ids)
                    logprobs = None
                    if r.logprobs is not None:
                        logprobs = _completion_logprobs(out.token_ids, out.logprobs, offsets[out.index])
                    offsets[out.index] += len(out.text)
                    # a chunk per step, text or not (held-back text, a partial character): clients see progress
                    if out.token_ids or out.finish_reason is not None:
                        yield _sse({**head, "choices": [{"index": out.index, "text": out.text, "logprobs": logprobs,
                                                         "finish_reason": out.finish_reason}]})
                    if out.finish_reason is not None:
                        done += 1
                        if done == len(reqs):
                            break
                    out = await queue.get()
                if include_usage:
                    yield _sse({**head, "choices": [], "usage": _usage(num_prompt, completion, reqs, n)})
                yield "data: [DONE]\n\n"
            finally:
                engine.abort(reqs)
        return SSEResponse(events())

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        r = _parse(ChatCompletionRequest, await request.body())
        s.check_model(r.model)
        ids = _chat_ids(s, r.messages)
        if r.top_logprobs is not None and not r.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        if r.top_logprobs is not None and not 0 <= r.top_logprobs <= MAX_LOGPROBS:
            raise ApiError(400, f"top_logprobs must be in 0..{MAX_LOGPROBS}, got {r.top_logprobs}", "top_logprobs")
        asked, param = ((r.max_completion_tokens, "max_completion_tokens") if r.max_completion_tokens is not None
                        else (r.max_tokens, "max_tokens"))
        top_n = r.top_logprobs or 0
        fields = dict(_sampling_fields(r), max_tokens=s.max_tokens(ids, asked, param, "messages"),
                      logprobs=top_n if r.logprobs else None)
        params = _params(fields, llm)
        reqs, queue = s.submit([ids], [params])
        first = await s.first_output(request, reqs, queue)
        if first is None:
            return Response(status_code=499)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        head = {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model_name}
        if not r.stream:
            outs = await s.collect(request, reqs, queue, first)
            if outs is None:
                return Response(status_code=499)
            choices = [{"index": o.index, "message": {"role": "assistant", "content": o.result.text},
                        "logprobs": {"content": _chat_logprobs(o.result.token_ids, o.result.logprobs, top_n)}
                        if r.logprobs else None, "finish_reason": o.result.finish_reason} for o in outs]
            completion = sum(len(o.result.token_ids) for o in outs)
            return {**head, "choices": choices, "usage": _usage(len(ids), completion, reqs, r.n),
                    "system_fingerprint": None}

        include_usage = bool(r.stream_options and r.stream_options.include_usage)
        head["object"] = "chat.completion.chunk"

        def chunk(index, delta, logprobs=None, finish_reason=None):
            return _sse({**head, "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                              "finish_reason": finish_reason}]})

        async def events():
            completion, done, out = 0, 0, first
            try:
                for k in range(len(reqs)):
                    yield chunk(k, {"role": "assistant", "content": ""})
                while True:
                    if out.error is not None:
                        yield _sse(error_body(out.error, "server_error"))
                        break
                    completion += len(out.token_ids)
                    logprobs = ({"content": _chat_logprobs(out.token_ids, out.logprobs, top_n)} if r.logprobs
                                else None)
                    if out.token_ids:
                        yield chunk(out.index, {"content": out.text}, logprobs)
                    if out.finish_reason is not None:
                        yield chunk(out.index, {}, None, out.finish_reason)
                        done += 1
                        if done == len(reqs):
                            break
                    out = await queue.get()
                if include_usage:
                    yield _sse({**head, "choices": [], "usage": _usage(len(ids), completion, reqs, r.n)})
                yield "data: [DONE]\n\n"
            finally:
                engine.abort(reqs)
        return SSEResponse(events())

    return Guard(app, api_key, max_body_bytes)


def _chat_ids(s: Server, messages) -> list[int]:
    try:
        return s.text.chat_prompt([{"role": m.role, "content": m.text()} for m in messages])
    except ValueError as e:
        raise ApiError(400, str(e), "messages") from None
    except Exception as e:  # the template itself refused the conversation (e.g. roles out of order)
        raise ApiError(400, f"the chat template cannot render these messages ({' '.join(str(e).split())})",
                       "messages") from None
