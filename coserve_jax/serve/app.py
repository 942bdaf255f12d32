"""The HTTP API: a FastAPI app over an :class:`~coserve_jax.serve.engine_loop.EngineLoop`.

Endpoints (OpenAI's shapes; vLLM's for the adapter routes):

* ``GET /health`` (no key needed), ``GET /metrics`` (Prometheus text)
* ``GET /v1/models``, ``GET /v1/models/{model}``
* ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true`` answers with
  server-sent events ending in ``data: [DONE]``)
* ``POST /v1/files`` (multipart ``file`` + ``purpose``), ``GET /v1/files``, ``GET|DELETE
  /v1/files/{id}``, ``GET /v1/files/{id}/content``
* ``POST|GET /v1/fine_tuning/jobs``, ``GET /v1/fine_tuning/jobs/{id}``, ``.../events``,
  ``.../checkpoints``, ``POST .../cancel``
* ``POST /v1/load_lora_adapter``, ``POST /v1/unload_lora_adapter``

Handlers never touch the engine: they tokenize in worker threads, hand requests to the engine
loop and await its deltas. A client that disconnects (a closed stream, or a dropped connection
while a non-streaming request waits) has its requests aborted and their KV pages freed before
the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import os
import secrets
import time
from typing import Any, AsyncIterator

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from coserve_jax.engine import Engine
from coserve_jax.lora.manager import AdapterError
from coserve_jax.lora.peft_io import AdapterFormatError, read_peft
from coserve_jax.serve import protocol as P
from coserve_jax.serve.config import ServeConfig
from coserve_jax.serve.engine_loop import Delta, EngineLoop
from coserve_jax.serve.errors import (
    APIError, api_error_handler, http_error_handler, model_not_found, validation_error_handler,
)
from coserve_jax.serve.files import FileStore
from coserve_jax.serve.jobs import JobManager
from coserve_jax.serve.metrics import ServerMetrics
from coserve_jax.tokenizer import encode_chat

log = logging.getLogger("coserve_jax.serve")

DISCONNECT_POLL_S = 0.5
"""How often a waiting non-streaming request checks whether its client went away, seconds."""

CLIENT_CLOSED = 499
"""Status logged for a request whose client went away (nginx's convention; nobody receives it)."""


class ServerState:
    """What the handlers share: config, engine loop, a tokenizer of their own, files, jobs, metrics.

    Args:
        config: the server config.
        engine: a built engine; from :meth:`start` on only the engine loop's thread uses it.
        served_model_name: the base model's name in the API.
    """

    def __init__(self, config: ServeConfig, engine: Engine, served_model_name: str):
        self.config = config
        self.engine = engine
        self.model_name = served_model_name
        self.max_model_len = engine.max_model_len
        self.max_prompt_tokens = min(config.limits.max_prompt_tokens or engine.max_model_len - 1, engine.max_model_len - 1)
        self.vocab_size = engine.config.vocab_size
        self.max_logprobs = engine.max_logprobs
        # The engine thread detokenizes with engine.tokenizer; handlers' worker threads encode
        # with this copy (one Rust tokenizer must not be used from two threads at once).
        self.tokenizer = copy.deepcopy(engine.tokenizer) if engine.tokenizer is not None else None
        self._tok_lock = asyncio.Lock()
        self.metrics = ServerMetrics()
        self.metrics.watch(engine)
        out = os.path.abspath(config.output_dir)
        self.files = FileStore(os.path.join(out, "files"))
        layout = engine.finetune_layout
        self.jobs = JobManager(
            served_model_name, os.path.join(out, "jobs"), config.finetune,
            copy.deepcopy(engine.tokenizer) if engine.tokenizer is not None else None,
            layout.max_seq_len if layout is not None and engine.tokenizer is not None else 0,
            engine.model.lora.config if engine.model.lora is not None else None,
        )
        self.loop = EngineLoop(engine, on_step=self._on_step, on_idle=self.jobs.start_queued, on_finished=self._on_finished)
        self.shutting_down = False

    def _on_step(self, engine: Engine, outputs, seconds: float) -> None:
        self.metrics.observe_step(engine, seconds)
        self.jobs.sync(engine)
        self.jobs.start_queued(engine)

    def _on_finished(self, o) -> None:
        self.metrics.observe_finished(
            len(o.prompt_token_ids), len(o.token_ids), o.finish_reason, o.arrival_time, o.first_token_time,
            o.finish_time or o.arrival_time,
        )

    def start(self) -> None:
        self.loop.start()

    def stop(self) -> list[str]:
        """Checkpoint running jobs, abort open requests, stop the engine loop. Returns the
        checkpoint directories written."""
        self.shutting_down = True
        written: list[str] = []

        def before_exit(engine):
            written.extend(self.jobs.checkpoint_running(engine))

        self.loop.stop(before_exit)
        return written

    # ---- shared request helpers ------------------------------------------------------------------
    async def encode(self, fn, *args) -> Any:
        """Run a tokenizer function in a worker thread (one at a time on this tokenizer)."""
        if self.tokenizer is None:
            raise APIError(400, "this server has no tokenizer: send prompts as token ids", "prompt", "no_tokenizer")
        async with self._tok_lock:
            return await asyncio.to_thread(fn, *args)

    async def resolve_adapter(self, model: str) -> str | None:
        """``None`` for the base model, else the adapter name. Raises: APIError 404."""
        if model == self.model_name:
            return None
        names = await self.loop.call(lambda e: e.list_adapters())
        if model in names:
            return model
        raise model_not_found(model)


# ---- middleware ----------------------------------------------------------------------------------
class GuardMiddleware:
    """API key (``Authorization: Bearer``) on every path but ``/health``, and the body-size
    limits (413 above ``limits.max_body_bytes``, ``limits.max_upload_bytes`` for uploads)."""

    def __init__(self, app, state: ServerState):
        self.app = app
        self.state = state
        self.api_key = state.config.api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.api_key is not None and path != "/health":
            auth = headers.get("authorization", "")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not token:
                return await self._reject(scope, receive, send, APIError(
                    401, "You didn't provide an API key. Send it as 'Authorization: Bearer KEY'.", None, "missing_api_key"))
            if not secrets.compare_digest(token.strip().encode(), self.api_key.encode()):
                return await self._reject(scope, receive, send, APIError(401, "Incorrect API key provided.", None, "invalid_api_key"))
        limit = self.state.config.limits.max_upload_bytes if path == "/v1/files" else self.state.config.limits.max_body_bytes
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await self._reject(scope, receive, send, _too_large(limit))
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise StarletteHTTPException(413, _too_large(limit).message)
            return message

        await self.app(scope, limited_receive, send)

    async def _reject(self, scope, receive, send, err: APIError):
        self.state.metrics.http_errors.labels(str(err.status)).inc()
        await err.response()(scope, receive, send)


def _too_large(limit: int) -> APIError:
    return APIError(413, f"The request body is larger than this server's limit of {limit} bytes.", None, "request_too_large")


class _EventStream(StreamingResponse):
    """Server-sent events whose generator is always closed (so its ``finally`` aborts the
    engine requests) however the response ends, a client disconnect included."""

    media_type = "text/event-stream"

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


# ---- generation --------------------------------------------------------------------------------
class _Choice:
    """One choice's accumulated output."""

    __slots__ = ("index", "text", "tokens", "logprobs", "top", "finish_reason", "num_tokens", "started")

    def __init__(self, index: int):
        self.index = index
        self.text = ""
        self.tokens: list[str] = []
        self.logprobs: list[float] = []
        self.top: list[list[tuple[str, float]]] = []
        self.finish_reason: str | None = None
        self.num_tokens = 0
        self.started = False

    def add(self, d: Delta) -> None:
        self.text += d.text
        if d.logprobs is not None:
            self.tokens += d.tokens or []
            self.logprobs += d.logprobs
            self.top += d.top_logprobs or [[] for _ in d.logprobs]
        self.num_tokens = d.num_output_tokens
        if d.finished:
            self.finish_reason = d.finish_reason


def _finish_reason(reason: str | None) -> str | None:
    return None if reason is None else ("length" if reason == "length" else "stop")


def _prepare(state: ServerState, body: P._SamplingRequest, prompts: list[list[int]], max_tokens: int | None,
             logprobs: int | None) -> list[list]:
    """Check lengths and build every choice's sampling params (per prompt, per choice).

    Raises:
        APIError: 400 for a prompt over the limit, ``max_tokens`` over the limit or the context
            left, too many logprobs, token ids outside the vocabulary, bad sampling values.
    """
    lim = state.config.limits
    longest = max(len(p) for p in prompts)
    if longest > state.max_prompt_tokens:
        raise APIError(400, f"The prompt is {longest} tokens; this server's limit is {state.max_prompt_tokens} "
                       f"(context length {state.max_model_len}).", "messages" if isinstance(body, P.ChatCompletionRequest) else "prompt",
                       "context_length_exceeded")
    if max_tokens is None:  # chat without max_tokens: what the context leaves, capped by the limit
        max_tokens = max(1, min(lim.max_tokens, state.max_model_len - longest))
    elif max_tokens > lim.max_tokens:
        raise APIError(400, f"max_tokens={max_tokens} is above this server's limit of {lim.max_tokens}", "max_tokens", "invalid_value")
    if longest + max_tokens > state.max_model_len:
        raise APIError(400, f"This model's maximum context length is {state.max_model_len} tokens. However, you requested "
                       f"{longest + max_tokens} tokens ({longest} in the prompt, {max_tokens} in the completion).",
                       "max_tokens", "context_length_exceeded")
    if logprobs is not None and logprobs > state.max_logprobs:
        raise APIError(400, f"at most {state.max_logprobs} logprobs per token", "logprobs", "invalid_value")
    for p in prompts:
        bad = [t for t in p if not 0 <= t < state.vocab_size]
        if bad:
            raise APIError(400, f"prompt token ids {bad[:5]} are outside the vocabulary [0, {state.vocab_size})", "prompt", "invalid_value")
    try:
        params = [[body.sampling_params(max_tokens, logprobs, j) for j in range(body.n)] for _ in prompts]
    except ValueError as e:
        raise APIError(400, str(e), None, "invalid_value") from None
    return params


async def _submit(state: ServerState, request_id: str, prompts: list[list[int]], params: list[list], adapter: str | None,
                  arrival: float) -> tuple[asyncio.Queue, dict[str, int]]:
    """Queue every (prompt, choice) in the engine at once. Returns the delta queue and
    ``{engine request id: choice index}``."""
    index = {f"{request_id}-{i}-{j}": i * len(params[i]) + j for i in range(len(prompts)) for j in range(len(params[i]))}

    def add(engine: Engine) -> list[str]:
        if adapter is not None and adapter not in engine.list_adapters():
            raise model_not_found(adapter)
        added = []
        try:
            for i, ids in enumerate(prompts):
                for j, sp in enumerate(params[i]):
                    rid = f"{request_id}-{i}-{j}"
                    engine.add_request(ids, sp, adapter, request_id=rid, index=index[rid], arrival_time=arrival)
                    added.append(rid)
        except Exception:
            for rid in added:  # all or nothing
                engine.abort(rid)
            raise
        return added

    if state.shutting_down or not state.loop.alive:
        raise APIError(503, "the server is shutting down", None, "shutting_down")
    try:
        q = await state.loop.add(add)
    except AdapterError as e:
        raise APIError(404, str(e), "model", "model_not_found") from None
    except ValueError as e:
        raise APIError(400, str(e), None, "invalid_value") from None
    return q, index


async def _collect(request: Request, state: ServerState, q: asyncio.Queue, index: dict[str, int]) -> list[_Choice] | None:
    """Wait for every choice to finish. If the client goes away, abort them all and return ``None``."""
    choices = {rid: _Choice(i) for rid, i in index.items()}
    pending = set(index)
    next_check = time.monotonic() + DISCONNECT_POLL_S
    try:
        while pending:
            try:
                d = await asyncio.wait_for(q.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                d = None
            if time.monotonic() >= next_check:  # whether or not deltas keep coming
                if await request.is_disconnected():
                    return None  # the finally clause aborts what is pending
                next_check = time.monotonic() + DISCONNECT_POLL_S
            if d is None:
                continue
            choices[d.request_id].add(d)
            if d.finished:
                pending.discard(d.request_id)
    finally:
        if pending:
            state.loop.abort(pending)
    out = sorted(choices.values(), key=lambda c: c.index)
    if any(c.finish_reason == "abort" for c in out):
        raise APIError(503, "the request was aborted (the server is shutting down)", None, "aborted")
    return out


async def _stream(state: ServerState, q: asyncio.Queue, index: dict[str, int]) -> AsyncIterator[tuple[_Choice, Delta]]:
    """Yield ``(choice, delta)`` as deltas arrive; abort what is unfinished if closed early."""
    choices = {rid: _Choice(i) for rid, i in index.items()}
    pending = set(index)
    try:
        while pending:
            d = await q.get()
            c = choices[d.request_id]
            c.add(d)
            if d.finished:
                pending.discard(d.request_id)
            yield c, d
    finally:
        if pending:
            state.loop.abort(pending)


# ---- the app ------------------------------------------------------------------------------------
def create_app(state: ServerState) -> FastAPI:
    """The FastAPI app over ``state``; its lifespan starts the engine loop and, on shutdown,
    checkpoints running fine-tuning jobs and stops the loop."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        state.start()
        try:
            yield
        finally:
            written = await asyncio.to_thread(state.stop)
            for d in written:
                print(f"coserve-jax: fine-tuning checkpoint written to {d}", flush=True)

    app = FastAPI(title="coserve-jax", version="0.1.0", lifespan=lifespan)
    app.state.server = state

    def counted(handler):
        async def wrapped(request, exc):
            response = await handler(request, exc)
            state.metrics.http_errors.labels(str(response.status_code)).inc()
            return response
        return wrapped

    app.add_exception_handler(APIError, counted(api_error_handler))
    app.add_exception_handler(RequestValidationError, counted(validation_error_handler))
    app.add_exception_handler(StarletteHTTPException, counted(http_error_handler))
    app.add_middleware(GuardMiddleware, state=state)
    cfg = state.config

    # ---- health, metrics, models ---------------------------------------------------------------
    @app.get("/health")
    async def health():
        if not state.loop.alive:
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    def model_card(name: str, parent: str | None, **extra) -> dict:
        return {"id": name, "object": "model", "created": P.now(), "owned_by": "coserve-jax",
                "root": name if parent is None else parent, "parent": parent, "max_model_len": state.max_model_len, **extra}

    async def model_list() -> list[dict]:
        names = await state.loop.call(lambda e: e.list_adapters())
        jobs = {r.fine_tuned_model: r.id for r in state.jobs.list()}
        cards = [model_card(state.model_name, None)]
        cards += [model_card(n, state.model_name, **({"fine_tuning_job": jobs[n]} if n in jobs else {})) for n in names]
        return cards

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": await model_list()}

    @app.get("/v1/models/{model:path}")
    async def retrieve_model(model: str):
        for card in await model_list():
            if card["id"] == model:
                return card
        raise model_not_found(model)

    # ---- completions ---------------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(body: P.CompletionRequest, request: Request):
        arrival = time.monotonic()
        body.check_supported(cfg.limits.max_n, cfg.limits.max_stop)
        prompts = body.prompts()
        if len(prompts) > cfg.limits.max_n:
            raise APIError(400, f"at most {cfg.limits.max_n} prompts per request", "prompt", "invalid_value")
        adapter = await state.resolve_adapter(body.model)
        texts = [p for p in prompts if isinstance(p, str)]
        if texts:
            tok = state.tokenizer
            encoded = iter(await state.encode(lambda: [list(tok(t)["input_ids"]) for t in texts]))
            prompts = [next(encoded) if isinstance(p, str) else p for p in prompts]
        params = _prepare(state, body, prompts, body.max_tokens, body.logprobs)
        rid = P.new_id("cmpl")
        q, index = await _submit(state, rid, prompts, params, adapter, arrival)
        n_prompt = sum(len(p) for p in prompts)
        created = P.now()

        def logprobs_of(c: _Choice, start: int, offset: int):
            if body.logprobs is None:
                return None
            top = [dict(t) for t in c.top[start:]] if body.logprobs else None
            return P.completion_logprobs(c.tokens[start:], c.logprobs[start:], top, offset)

        if not body.stream:
            choices = await _collect(request, state, q, index)
            if choices is None:
                return Response(status_code=CLIENT_CLOSED)
            return {
                "id": rid, "object": "text_completion", "created": created, "model": body.model,
                "choices": [{"index": c.index, "text": c.text, "logprobs": logprobs_of(c, 0, 0),
                             "finish_reason": _finish_reason(c.finish_reason)} for c in choices],
                "usage": P.usage(n_prompt, sum(c.num_tokens for c in choices)),
            }

        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def events():
            total = 0
            async for c, d in _stream(state, q, index):
                if not (d.text or d.finished or d.logprobs):
                    continue
                start = len(c.tokens) - len(d.logprobs or [])
                chunk = {"id": rid, "object": "text_completion", "created": created, "model": body.model,
                         "choices": [{"index": c.index, "text": d.text,
                                      "logprobs": logprobs_of(c, start, len(c.text) - len(d.text)),
                                      "finish_reason": _finish_reason(c.finish_reason) if d.finished else None}]}
                if include_usage:
                    chunk["usage"] = None
                if d.finished:
                    total += c.num_tokens
                yield _sse(chunk)
            if include_usage:
                yield _sse({"id": rid, "object": "text_completion", "created": created, "model": body.model,
                            "choices": [], "usage": P.usage(n_prompt, total)})
            yield "data: [DONE]\n\n"

        return _EventStream(events())

    # ---- chat ----------------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(body: P.ChatCompletionRequest, request: Request):
        arrival = time.monotonic()
        body.check_supported(cfg.limits.max_n, cfg.limits.max_stop)
        adapter = await state.resolve_adapter(body.model)
        conversation = body.conversation()
        tok = state.tokenizer
        if tok is not None and not getattr(tok, "chat_template", None):
            raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions or start the server "
                           "with model.chat_template", "messages", "no_chat_template")
        kwargs = dict(body.chat_template_kwargs or {})

        def render():
            return encode_chat(tok, conversation, add_generation_prompt=body.add_generation_prompt, **kwargs)

        try:
            ids = await state.encode(render)
        except APIError:
            raise
        except Exception as e:  # a template that raises (e.g. roles out of order)
            raise APIError(400, f"cannot apply the chat template: {e}", "messages", "invalid_value") from None
        if not ids:
            raise APIError(400, "the conversation renders to an empty prompt", "messages", "invalid_value")
        max_tokens = body.max_completion_tokens or body.max_tokens
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        params = _prepare(state, body, [ids], max_tokens, logprobs)
        rid = P.new_id("chatcmpl")
        q, index = await _submit(state, rid, [ids], params, adapter, arrival)
        created = P.now()

        def logprobs_of(c: _Choice, start: int):
            if not body.logprobs:
                return None
            top = c.top[start:] if body.top_logprobs else None
            return P.chat_logprobs(c.tokens[start:], c.logprobs[start:], top)

        if not body.stream:
            choices = await _collect(request, state, q, index)
            if choices is None:
                return Response(status_code=CLIENT_CLOSED)
            return {
                "id": rid, "object": "chat.completion", "created": created, "model": body.model, "system_fingerprint": None,
                "choices": [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                             "logprobs": logprobs_of(c, 0), "finish_reason": _finish_reason(c.finish_reason)} for c in choices],
                "usage": P.usage(len(ids), sum(c.num_tokens for c in choices)),
            }

        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(c: _Choice, delta: dict, logprobs=None, finish=None) -> str:
            obj = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": body.model,
                   "system_fingerprint": None,
                   "choices": [{"index": c.index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}
            if include_usage:
                obj["usage"] = None
            return _sse(obj)

        async def events():
            total = 0
            async for c, d in _stream(state, q, index):
                if not c.started:
                    c.started = True
                    yield chunk(c, {"role": "assistant", "content": ""})
                if d.text or d.logprobs:
                    start = len(c.tokens) - len(d.logprobs or [])
                    yield chunk(c, {"content": d.text}, logprobs_of(c, start))
                if d.finished:
                    total += c.num_tokens
                    yield chunk(c, {}, None, _finish_reason(c.finish_reason))
            if include_usage:
                yield _sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": body.model,
                            "choices": [], "usage": P.usage(len(ids), total)})
            yield "data: [DONE]\n\n"

        return _EventStream(events())

    # ---- files ---------------------------------------------------------------------------------
    @app.post("/v1/files")
    async def upload_file(file: UploadFile = File(...), purpose: str = Form(...)):
        data = await file.read()
        return await asyncio.to_thread(state.files.create, data, file.filename or "upload.jsonl", purpose)

    @app.get("/v1/files")
    async def list_files():
        return {"object": "list", "data": state.files.list(), "has_more": False}

    @app.get("/v1/files/{file_id}")
    async def retrieve_file(file_id: str):
        return state.files.get(file_id)

    @app.delete("/v1/files/{file_id}")
    async def delete_file(file_id: str):
        return state.files.delete(file_id)

    @app.get("/v1/files/{file_id}/content")
    async def file_content(file_id: str):
        state.files.get(file_id)
        data = await asyncio.to_thread(_read_bytes, state.files.path(file_id))
        return Response(data, media_type="application/octet-stream")

    # ---- fine-tuning jobs ----------------------------------------------------------------------
    @app.post("/v1/fine_tuning/jobs")
    async def create_job(body: P.FinetuneJobCreate):
        if body.model != state.model_name:
            names = await state.loop.call(lambda e: e.list_adapters())
            if body.model in names:
                raise APIError(400, f"fine-tuning starts from the base model {state.model_name!r}, not an adapter", "model", "invalid_value")
            raise model_not_found(body.model)
        try:
            f = state.files.get(body.training_file)
        except APIError:
            raise APIError(400, f"invalid training_file: no file {body.training_file!r}", "training_file", "invalid_training_file") from None
        valid = None
        if body.validation_file:
            try:
                v = state.files.get(body.validation_file)
            except APIError:
                raise APIError(400, f"invalid validation_file: no file {body.validation_file!r}", "validation_file",
                               "invalid_validation_file") from None
            valid = (state.files.path(v["id"]), v["filename"])
        rec = await asyncio.to_thread(state.jobs.prepare, body, state.files.path(f["id"]), f["filename"], valid)
        if state.shutting_down:
            raise APIError(503, "the server is shutting down", None, "shutting_down")
        state.jobs.add(rec)
        await state.loop.call(state.jobs.start_queued)
        return rec.to_openai()

    def page(items: list[dict], after: str | None, limit: int) -> dict:
        if after is not None:
            ids = [x["id"] for x in items]
            if after not in ids:
                raise APIError(400, f"after={after!r} is not in the list", "after", "invalid_value")
            items = items[ids.index(after) + 1:]
        if not 1 <= limit <= 100:
            raise APIError(400, "limit must be in [1, 100]", "limit", "invalid_value")
        return {"object": "list", "data": items[:limit], "has_more": len(items) > limit}

    @app.get("/v1/fine_tuning/jobs")
    async def list_jobs(after: str | None = None, limit: int = 20):
        return page([r.to_openai() for r in state.jobs.list()], after, limit)

    @app.get("/v1/fine_tuning/jobs/{job_id}")
    async def retrieve_job(job_id: str):
        return state.jobs.get(job_id).to_openai()

    @app.get("/v1/fine_tuning/jobs/{job_id}/events")
    async def job_events(job_id: str, after: str | None = None, limit: int = 20):
        rec = state.jobs.get(job_id)
        return page(list(reversed(list(rec.events))), after, limit)  # newest first, as OpenAI

    @app.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
    async def job_checkpoints(job_id: str, after: str | None = None, limit: int = 10):
        rec = state.jobs.get(job_id)
        return page(await asyncio.to_thread(state.jobs.checkpoints, rec), after, limit)

    @app.post("/v1/fine_tuning/jobs/{job_id}/cancel")
    async def cancel_job(job_id: str):
        rec = await state.loop.call(lambda e: state.jobs.cancel(e, job_id))
        return rec.to_openai()

    # ---- adapters (vLLM) -----------------------------------------------------------------------
    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: P.LoadLoRAAdapterRequest):
        name = body.lora_name
        if name == state.model_name:
            raise APIError(400, f"{name!r} is the base model's name", "lora_name", "invalid_value")
        try:
            weights = await asyncio.to_thread(read_peft, body.lora_path)
        except (FileNotFoundError, AdapterFormatError, OSError) as e:
            raise APIError(400, f"cannot load LoRA adapter {name!r} from {body.lora_path!r}: {e}", "lora_path", "invalid_value") from None
        try:
            await state.loop.call(lambda e: e.load_adapter(name, weights))
        except AdapterError as e:
            raise APIError(400, str(e), "lora_name", "invalid_value") from None
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: P.UnloadLoRAAdapterRequest):
        name = body.lora_name

        def unload(engine: Engine):
            if name not in engine.list_adapters():
                raise APIError(404, f"The lora adapter '{name}' cannot be found.", "lora_name", "adapter_not_found")
            engine.unload_adapter(name)

        try:
            await state.loop.call(unload)
        except AdapterError as e:
            raise APIError(400, str(e), "lora_name", "adapter_in_use") from None
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    return app


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()
