"""``GET /health``, ``GET /metrics`` (Prometheus text), ``GET /v1/models``, ``GET|DELETE /v1/models/{model}``.

Deleting a model (OpenAI's ``models.delete``) unloads a fine-tuned model's or a loaded adapter's
slot; the base model cannot be deleted, nor an adapter a running job trains or a request uses.
A fine-tuning job keeps its record and its exported adapter on disk.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from coserve_jax.engine import Engine
from coserve_jax.lora.manager import AdapterError
from coserve_jax.serve import protocol as P
from coserve_jax.serve.errors import APIError, model_not_found
from coserve_jax.serve.auth import SHARED, Principal
from coserve_jax.serve.state import ServerState, principal, server_state

router = APIRouter()


@router.get("/health")
async def health(state: ServerState = Depends(server_state)):
    if not state.loop.alive:
        return JSONResponse({"status": "unavailable"}, status_code=503)
    return {"status": "ok"}


@router.get("/metrics")
async def metrics(state: ServerState = Depends(server_state)):
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


def model_card(state: ServerState, name: str, parent: str | None, **extra) -> dict:
    """OpenAI's model object (with vLLM's ``root``, ``parent`` and ``max_model_len``)."""
    return {"id": name, "object": "model", "created": P.now(), "owned_by": "coserve-jax",
            "root": name if parent is None else parent, "parent": parent, "max_model_len": state.max_model_len, **extra}


async def model_list(state: ServerState, who: Principal) -> list[dict]:
    """The base model, then every loaded adapter ``who`` may use (a fine-tuning job's names its job)."""
    names = await state.visible_adapters(who)
    jobs = {r.fine_tuned_model: r.id for r in state.jobs.list(who.project)}
    cards = [model_card(state, state.model_name, None)]
    cards += [model_card(state, n, state.model_name, **({"fine_tuning_job": jobs[n]} if n in jobs else {})) for n in names]
    return cards


@router.get("/v1/models")
async def list_models(state: ServerState = Depends(server_state), who: Principal = Depends(principal)):
    return {"object": "list", "data": await model_list(state, who)}


@router.get("/v1/models/{model:path}")
async def retrieve_model(model: str, state: ServerState = Depends(server_state), who: Principal = Depends(principal)):
    for card in await model_list(state, who):
        if card["id"] == model:
            return card
    raise model_not_found(model)


@router.delete("/v1/models/{model:path}")
async def delete_model(model: str, state: ServerState = Depends(server_state), who: Principal = Depends(principal)):
    if model == state.model_name:
        raise APIError(400, f"{model!r} is the base model; it cannot be deleted", "model", "invalid_value")
    check_may_unload(state, who, model)

    def unload(engine: Engine):
        if model not in engine.list_adapters():
            raise model_not_found(model)
        engine.unload_adapter(model)

    try:
        await state.loop.call(unload)
    except AdapterError as e:
        raise APIError(400, str(e), "model", "model_in_use") from None
    await asyncio.to_thread(state.forget_adapter, model)
    return {"id": model, "object": "model", "deleted": True}


def check_may_unload(state: ServerState, who: Principal, name: str) -> None:
    """Another project's adapter is unknown to ``who`` (404); a shared one needs an admin key (403).

    Raises:
        APIError: 404 or 403.
    """
    owner = state.owner_of(name)
    if not who.sees(owner):
        raise model_not_found(name)
    if owner == SHARED and not who.admin:
        raise APIError(403, f"{name!r} is shared by every project: only an admin key may unload it", "model", "permission_denied")
