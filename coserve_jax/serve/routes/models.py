"""``GET /health``, ``GET /metrics`` (Prometheus text), ``GET /v1/models``, ``GET /v1/models/{model}``."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from coserve_jax.serve import protocol as P
from coserve_jax.serve.errors import model_not_found
from coserve_jax.serve.state import ServerState, server_state

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


async def model_list(state: ServerState) -> list[dict]:
    """The base model, then every loaded adapter (a fine-tuning job's names its job)."""
    names = await state.loop.call(lambda e: e.list_adapters())
    jobs = {r.fine_tuned_model: r.id for r in state.jobs.list()}
    cards = [model_card(state, state.model_name, None)]
    cards += [model_card(state, n, state.model_name, **({"fine_tuning_job": jobs[n]} if n in jobs else {})) for n in names]
    return cards


@router.get("/v1/models")
async def list_models(state: ServerState = Depends(server_state)):
    return {"object": "list", "data": await model_list(state)}


@router.get("/v1/models/{model:path}")
async def retrieve_model(model: str, state: ServerState = Depends(server_state)):
    for card in await model_list(state):
        if card["id"] == model:
            return card
    raise model_not_found(model)
