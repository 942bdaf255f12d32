"""The one generate path of the completions and chat routes: check limits and build sampling
params (:func:`prepare`), queue every (prompt, choice) in the engine at once (:func:`submit`),
then wait for the whole answer (:func:`collect`) or yield deltas as they come (:func:`stream`).
A client that goes away has its requests aborted and their KV pages freed before the next step.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import StreamingResponse

from coserve_jax.engine import Engine
from coserve_jax.lora.manager import AdapterError
from coserve_jax.serve import protocol as P
from coserve_jax.serve.engine_loop import Delta
from coserve_jax.serve.auth import DEFAULT_PROJECT
from coserve_jax.serve.errors import APIError, model_not_found
from coserve_jax.serve.state import ServerState

DISCONNECT_POLL_S = 0.5
"""How often a waiting non-streaming request checks whether its client went away, seconds."""

CLIENT_CLOSED = 499
"""Status logged for a request whose client went away (nginx's convention; nobody receives it)."""


class EventStream(StreamingResponse):
    """Server-sent events whose generator is always closed (so its ``finally`` aborts the
    engine requests) however the response ends, a client disconnect included."""

    media_type = "text/event-stream"

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


# ---- generation --------------------------------------------------------------------------------
class Choice:
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


def openai_finish_reason(reason: str | None) -> str | None:
    """OpenAI's ``finish_reason``: ``stop``, ``length``, or vLLM's ``abort`` for a request the
    server ended (shutdown)."""
    if reason is None:
        return None
    return reason if reason in ("length", "abort") else "stop"


def prepare(state: ServerState, body: P._SamplingRequest, prompts: list[list[int]], max_tokens: int | None,
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
    limit = state.memory_context_limit
    if limit is not None and longest + max_tokens > limit:
        raise APIError(400, f"This request needs {longest + max_tokens} tokens of context ({longest} in the prompt, "
                       f"{max_tokens} in the completion); this server's memory for attention scratch fits {limit} "
                       "(limits.step_memory_bytes).", "max_tokens", "insufficient_memory")
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


async def submit(state: ServerState, request_id: str, prompts: list[list[int]], params: list[list], adapter: str | None,
                  arrival: float, project: str = DEFAULT_PROJECT, priority: int = 0) -> tuple[asyncio.Queue, dict[str, int]]:
    """Queue every (prompt, choice) in the engine as ``project`` may (:meth:`ServerState.admit`):
    up to ``max_seqs_per_project`` at once, the rest as earlier ones finish (a task that
    :func:`collect` and :func:`stream` cancel when they end), at vLLM's request ``priority``
    (lower first). Returns the delta queue and ``{engine request id: choice index}``.

    Raises:
        APIError: 503 shutting down, 404 an adapter gone, 400 a request the engine refuses.
    """
    seqs = [(f"{request_id}-{i}-{j}", i * len(params[i]) + j, ids, sp)
            for i, ids in enumerate(prompts) for j, sp in enumerate(params[i])]
    index = {rid: k for rid, k, _, _ in seqs}

    def adder(batch):
        def add(engine: Engine) -> list[str]:
            if adapter is not None and adapter not in engine.list_adapters():
                raise model_not_found(adapter)
            added = []
            try:
                for rid, k, ids, sp in batch:
                    engine.add_request(ids, sp, adapter, request_id=rid, index=k, arrival_time=arrival, priority=priority)
                    added.append(rid)
            except Exception:
                for rid in added:  # all or nothing
                    engine.abort(rid)
                raise
            return added
        return add

    async def add_batch(batch, q=None) -> asyncio.Queue:
        ids = [rid for rid, _, _, _ in batch]
        await state.admit(project, ids, priority)
        try:
            if state.shutting_down:
                raise APIError(503, "the server is shutting down", None, "shutting_down")
            return await state.loop.add(adder(batch), q)
        except AdapterError as e:
            state.release(ids)
            raise APIError(404, str(e), "model", "model_not_found") from None
        except ValueError as e:
            state.release(ids)
            raise APIError(400, str(e), None, "invalid_value") from None
        except BaseException:
            state.release(ids)
            raise

    if state.shutting_down or not state.loop.alive:
        raise APIError(503, "the server is shutting down", None, "shutting_down")
    cap = state.max_seqs_per_project
    q = await add_batch(seqs[:cap])
    if len(seqs) > cap:
        async def feed():
            for at in range(cap, len(seqs), cap):
                batch = seqs[at:at + cap]
                try:
                    await add_batch(batch, q)
                except APIError:  # (shutting down, the adapter unloaded) the rest end at once, as aborted
                    for rid, _, ids, _ in seqs[at:]:
                        q.put_nowait(Delta(rid, [], "", None, None, None, True, "abort", len(ids), 0))
                    return

        q.feeder = asyncio.get_running_loop().create_task(feed())
    return q, index


def _stop_feeding(q: asyncio.Queue) -> None:
    feeder = getattr(q, "feeder", None)
    if feeder is not None:
        feeder.cancel()


async def collect(request: Request, state: ServerState, q: asyncio.Queue, index: dict[str, int]) -> list[Choice] | None:
    """Wait for every choice to finish. If the client goes away, abort them all and return ``None``."""
    choices = {rid: Choice(i) for rid, i in index.items()}
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
        _stop_feeding(q)
        if pending:
            state.loop.abort(pending)
    out = sorted(choices.values(), key=lambda c: c.index)
    if any(c.finish_reason == "abort" for c in out):
        raise APIError(503, "the request was aborted (the server is shutting down)", None, "aborted")
    return out


async def stream(state: ServerState, q: asyncio.Queue, index: dict[str, int]) -> AsyncIterator[tuple[Choice, Delta]]:
    """Yield ``(choice, delta)`` as deltas arrive; abort what is unfinished if closed early."""
    choices = {rid: Choice(i) for rid, i in index.items()}
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
        _stop_feeding(q)
        if pending:
            state.loop.abort(pending)
