"""``POST /v1/completions`` (OpenAI's legacy completions; ``stream: true`` answers with
server-sent events ending in ``data: [DONE]``)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from coserve_jax.serve import protocol as P
from coserve_jax.serve.errors import APIError
from coserve_jax.serve.generate import (
    CLIENT_CLOSED, Choice, EventStream, collect, openai_finish_reason, prepare, sse, stream, submit,
)
from coserve_jax.serve.auth import Principal
from coserve_jax.serve.state import ServerState, principal, server_state

router = APIRouter()


@router.post("/v1/completions")
async def completions(body: P.CompletionRequest, request: Request, state: ServerState = Depends(server_state),
                      who: Principal = Depends(principal)):
    arrival = time.monotonic()
    cfg = state.config
    body.check_supported(cfg.limits.max_n, cfg.limits.max_stop)
    prompts = body.prompts()
    if len(prompts) > cfg.limits.max_n:
        raise APIError(400, f"at most {cfg.limits.max_n} prompts per request", "prompt", "invalid_value")
    if len(prompts) * body.n > cfg.limits.max_seqs_per_request:
        raise APIError(400, f"{len(prompts)} prompts x n={body.n} make {len(prompts) * body.n} sequences: at most "
                       f"{cfg.limits.max_seqs_per_request} per request", "n", "invalid_value")
    adapter = await state.resolve_adapter(body.model, who)
    texts = [p for p in prompts if isinstance(p, str)]
    if texts:
        encoded = iter(await state.encode(lambda tok: [list(tok(t)["input_ids"]) for t in texts]))
        prompts = [next(encoded) if isinstance(p, str) else p for p in prompts]
    # OpenAI's completions default is 16 tokens, for an omitted max_tokens and for null alike (within the limit)
    max_tokens = min(16, cfg.limits.max_tokens) if body.max_tokens is None else body.max_tokens
    params = prepare(state, body, prompts, max_tokens, body.logprobs)
    rid = P.new_id("cmpl")
    q, index = await submit(state, rid, prompts, params, adapter, arrival, who.project, body.priority)
    n_prompt = sum(len(p) for p in prompts)
    created = P.now()

    def logprobs_of(c: Choice, start: int, offset: int):
        if body.logprobs is None:
            return None
        top = [dict(t) for t in c.top[start:]] if body.logprobs else None
        return P.completion_logprobs(c.tokens[start:], c.logprobs[start:], top, offset)

    if not body.stream:
        choices = await collect(request, state, q, index)
        if choices is None:
            return Response(status_code=CLIENT_CLOSED)
        return {
            "id": rid, "object": "text_completion", "created": created, "model": body.model,
            "choices": [{"index": c.index, "text": c.text, "logprobs": logprobs_of(c, 0, 0),
                         "finish_reason": openai_finish_reason(c.finish_reason)} for c in choices],
            "usage": P.usage(n_prompt, sum(c.num_tokens for c in choices)),
        }

    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def events():
        total = 0
        async for c, d in stream(state, q, index):
            if not (d.text or d.finished or d.logprobs):
                continue
            start = len(c.tokens) - len(d.logprobs or [])
            chunk = {"id": rid, "object": "text_completion", "created": created, "model": body.model,
                     "choices": [{"index": c.index, "text": d.text,
                                  "logprobs": logprobs_of(c, start, len(c.text) - len(d.text)),
                                  "finish_reason": openai_finish_reason(c.finish_reason) if d.finished else None}]}
            if include_usage:
                chunk["usage"] = None
            if d.finished:
                total += c.num_tokens
            yield sse(chunk)
        if include_usage:
            yield sse({"id": rid, "object": "text_completion", "created": created, "model": body.model,
                       "choices": [], "usage": P.usage(n_prompt, total)})
        yield "data: [DONE]\n\n"

    return EventStream(events())
