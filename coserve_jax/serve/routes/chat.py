"""``POST /v1/chat/completions`` (the model's chat template renders the messages; ``stream:
true`` answers with ``chat.completion.chunk`` server-sent events ending in ``data: [DONE]``)."""

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
from coserve_jax.tokenizer import encode_chat

router = APIRouter()


@router.post("/v1/chat/completions")
async def chat_completions(body: P.ChatCompletionRequest, request: Request, state: ServerState = Depends(server_state),
                           who: Principal = Depends(principal)):
    arrival = time.monotonic()
    cfg = state.config
    body.check_supported(cfg.limits.max_n, cfg.limits.max_stop)
    if len(body.messages) > cfg.limits.max_messages:
        raise APIError(400, f"{len(body.messages)} messages: at most {cfg.limits.max_messages} per request", "messages", "invalid_value")
    adapter = await state.resolve_adapter(body.model, who)
    conversation = body.conversation()
    tok = state.tokenizer
    if tok is not None and not getattr(tok, "chat_template", None):
        raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions or start the server "
                       "with model.chat_template", "messages", "no_chat_template")
    kwargs = dict(body.chat_template_kwargs or {})

    def render(tok):
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
    params = prepare(state, body, [ids], max_tokens, logprobs)
    rid = P.new_id("chatcmpl")
    q, index = await submit(state, rid, [ids], params, adapter, arrival, who.project, body.priority)
    created = P.now()

    def logprobs_of(c: Choice, start: int):
        if not body.logprobs:
            return None
        top = c.top[start:] if body.top_logprobs else None
        return P.chat_logprobs(c.tokens[start:], c.logprobs[start:], top)

    if not body.stream:
        choices = await collect(request, state, q, index)
        if choices is None:
            return Response(status_code=CLIENT_CLOSED)
        return {
            "id": rid, "object": "chat.completion", "created": created, "model": body.model, "system_fingerprint": None,
            "choices": [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                         "logprobs": logprobs_of(c, 0), "finish_reason": openai_finish_reason(c.finish_reason)} for c in choices],
            "usage": P.usage(len(ids), sum(c.num_tokens for c in choices)),
        }

    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(c: Choice, delta: dict, logprobs=None, finish=None) -> str:
        obj = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": body.model,
               "system_fingerprint": None,
               "choices": [{"index": c.index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}
        if include_usage:
            obj["usage"] = None
        return sse(obj)

    async def events():
        total = 0
        async for c, d in stream(state, q, index):
            if not c.started:
                c.started = True
                yield chunk(c, {"role": "assistant", "content": ""})
            if d.text or d.logprobs:
                start = len(c.tokens) - len(d.logprobs or [])
                yield chunk(c, {"content": d.text}, logprobs_of(c, start))
            if d.finished:
                total += c.num_tokens
                yield chunk(c, {}, None, openai_finish_reason(c.finish_reason))
        if include_usage:
            yield sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": body.model,
                       "choices": [], "usage": P.usage(len(ids), total)})
        yield "data: [DONE]\n\n"

    return EventStream(events())
