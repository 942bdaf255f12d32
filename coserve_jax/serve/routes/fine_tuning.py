"""``POST|GET /v1/fine_tuning/jobs``, ``GET /v1/fine_tuning/jobs/{id}``, ``.../events``,
``.../checkpoints``, ``POST .../cancel``, ``.../pause``, ``.../resume`` (OpenAI's fine-tuning API)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends

from coserve_jax.serve import protocol as P
from coserve_jax.serve.errors import APIError, model_not_found
from coserve_jax.serve.auth import Principal
from coserve_jax.serve.state import ServerState, principal, server_state

router = APIRouter()


@router.post("/v1/fine_tuning/jobs")
async def create_job(body: P.FinetuneJobCreate, state: ServerState = Depends(server_state),
                     who: Principal = Depends(principal)):
    if body.model != state.model_name:
        if body.model in await state.visible_adapters(who):
            raise APIError(400, f"fine-tuning starts from the base model {state.model_name!r}, not an adapter", "model", "invalid_value")
        raise model_not_found(body.model)
    try:
        f = await asyncio.to_thread(state.files.get, body.training_file, who.project)
    except APIError:
        raise APIError(400, f"invalid training_file: no file {body.training_file!r}", "training_file", "invalid_training_file") from None
    valid = None
    if body.validation_file:
        try:
            v = await asyncio.to_thread(state.files.get, body.validation_file, who.project)
        except APIError:
            raise APIError(400, f"invalid validation_file: no file {body.validation_file!r}", "validation_file",
                           "invalid_validation_file") from None
        valid = (state.files.path(v["id"]), v["filename"])
    rec = await asyncio.to_thread(state.jobs.prepare, body, state.files.path(f["id"]), f["filename"], valid, who.project)
    if state.shutting_down:
        raise APIError(503, "the server is shutting down", None, "shutting_down")
    await asyncio.to_thread(state.jobs.add, rec)
    await state.loop.call(state.jobs.start_queued)
    return rec.to_openai()


@router.get("/v1/fine_tuning/jobs")
async def list_jobs(after: str | None = None, limit: int = 20, state: ServerState = Depends(server_state),
                    who: Principal = Depends(principal)):
    return P.cursor_page([r.to_openai() for r in state.jobs.list(who.project)], after, limit)


@router.get("/v1/fine_tuning/jobs/{job_id}")
async def retrieve_job(job_id: str, state: ServerState = Depends(server_state),
                       who: Principal = Depends(principal)):
    return state.jobs.get(job_id, who.project).to_openai()


@router.get("/v1/fine_tuning/jobs/{job_id}/events")
async def job_events(job_id: str, after: str | None = None, limit: int = 20, state: ServerState = Depends(server_state),
                     who: Principal = Depends(principal)):
    rec = state.jobs.get(job_id, who.project)
    return P.cursor_page(list(reversed(list(rec.events))), after, limit)  # newest first, as OpenAI


@router.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
async def job_checkpoints(job_id: str, after: str | None = None, limit: int = 10, state: ServerState = Depends(server_state),
                          who: Principal = Depends(principal)):
    rec = state.jobs.get(job_id, who.project)
    return P.cursor_page(await asyncio.to_thread(state.jobs.checkpoints, rec), after, limit)


@router.post("/v1/fine_tuning/jobs/{job_id}/cancel")
async def cancel_job(job_id: str, state: ServerState = Depends(server_state),
                     who: Principal = Depends(principal)):
    state.jobs.get(job_id, who.project)  # another project's job: 404
    rec = await state.loop.call(lambda e: state.jobs.cancel(e, job_id))
    return rec.to_openai()


@router.post("/v1/fine_tuning/jobs/{job_id}/pause")
async def pause_job(job_id: str, state: ServerState = Depends(server_state),
                    who: Principal = Depends(principal)):
    state.jobs.get(job_id, who.project)  # another project's job: 404
    rec = await state.loop.call(lambda e: state.jobs.pause(e, job_id))
    return rec.to_openai()


@router.post("/v1/fine_tuning/jobs/{job_id}/resume")
async def resume_job(job_id: str, state: ServerState = Depends(server_state),
                     who: Principal = Depends(principal)):
    state.jobs.get(job_id, who.project)  # another project's job: 404
    rec = await state.loop.call(lambda e: state.jobs.resume(e, job_id))
    return rec.to_openai()
