"""vLLM's utility routes: ``POST /tokenize``, ``POST /detokenize``, ``GET /version``,
``GET|POST /ping`` (a liveness probe, as ``/health``).

``/tokenize`` takes a ``prompt`` (special tokens added unless ``add_special_tokens`` is false)
or chat ``messages`` (the model's chat template, no special tokens added beyond the template's
unless asked) and answers ``{count, max_model_len, tokens}`` (and ``token_strs`` when
``return_token_strs``); ``/detokenize`` takes ``tokens`` and answers ``{prompt}``.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends

import coserve_jax
from coserve_jax.serve import protocol as P
from coserve_jax.serve.errors import APIError
from coserve_jax.serve.routes.models import health
from coserve_jax.serve.auth import Principal
from coserve_jax.serve.state import ServerState, principal, server_state
from coserve_jax.tokenizer import render_chat

router = APIRouter()


@router.get("/version")
async def version():
    return {"version": coserve_jax.__version__}


@router.api_route("/ping", methods=["GET", "POST"])
async def ping(state: ServerState = Depends(server_state)):
    return await health(state)


@router.post("/tokenize")
async def tokenize(body: P.TokenizeRequest, state: ServerState = Depends(server_state), who: Principal = Depends(principal)):
    body.check()
    if body.model is not None:
        await state.resolve_adapter(body.model, who)  # an unknown model is a 404, as elsewhere
    if body.messages is not None and len(body.messages) > state.config.limits.max_messages:
        raise APIError(400, f"at most {state.config.limits.max_messages} messages per request", "messages", "invalid_value")
    tok = state.tokenizer
    if body.messages is not None:
        if tok is not None and not getattr(tok, "chat_template", None):
            raise APIError(400, "this model's tokenizer has no chat template", "messages", "no_chat_template")
        conversation = [{"role": m.role, "content": m.text(i)} for i, m in enumerate(body.messages)]
        kwargs = dict(body.chat_template_kwargs or {})
        special = bool(body.add_special_tokens)

        def encode(tok):
            text = render_chat(tok, conversation, add_generation_prompt=body.add_generation_prompt, **kwargs)
            return text, tok.encode(text, add_special_tokens=special)
    else:
        special = body.add_special_tokens is not False

        def encode(tok):
            return body.prompt, tok.encode(body.prompt, add_special_tokens=special)

    def run(tok):
        _, ids = encode(tok)
        return ids, (tok.convert_ids_to_tokens(ids) if body.return_token_strs else None)

    try:
        ids, strs = await state.encode(run)
    except APIError:
        raise
    except Exception as e:  # a template that raises (e.g. roles out of order)
        raise APIError(400, f"cannot tokenize: {e}", "messages" if body.messages is not None else "prompt", "invalid_value") from None
    out = {"count": len(ids), "max_model_len": state.max_model_len, "tokens": ids}
    if strs is not None:
        out["token_strs"] = strs
    return out


@router.post("/detokenize")
async def detokenize(body: P.DetokenizeRequest, state: ServerState = Depends(server_state), who: Principal = Depends(principal)):
    if body.model is not None:
        await state.resolve_adapter(body.model, who)
    bad = [t for t in body.tokens if not 0 <= t < state.vocab_size]
    if bad:
        raise APIError(400, f"token ids {bad[:5]} are outside the vocabulary [0, {state.vocab_size})", "tokens", "invalid_value")
    text = await state.encode(lambda tok: tok.decode(body.tokens))
    return {"prompt": text}
