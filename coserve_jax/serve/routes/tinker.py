"""The Tinker training API (``/api/v1/...``) as the official ``tinker`` client speaks it:
client config, sessions and heartbeats, ``create_model`` (a LoRA training run), ``get_info``,
``forward_backward`` (protobuf body; ``forward`` is its ``forward_only`` form), ``optim_step``,
``save_weights_for_sampler``, sampling sessions and ``asample``, ``retrieve_future``,
``get_server_capabilities``. Request bodies are validated with the client's own request types.

The client authenticates with ``X-API-Key: tml-<key>`` (it requires the ``tml-`` prefix): the
guard accepts the server's API keys that way; runs, futures and sampler weights belong to the
key's project.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pydantic
from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse
from tinker import types as T

from coserve_jax.serve import tinker_wire
from coserve_jax.serve.auth import Principal
from coserve_jax.serve.errors import APIError
from coserve_jax.serve.state import ServerState, principal, server_state
from coserve_jax.serve.tinker_service import DOWNLOAD_PREFIX

router = APIRouter()


def _validate(model: type, body: Any):
    try:
        return model.model_validate(body)
    except pydantic.ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first.get("loc", ()))
        raise APIError(400, f"{model.__name__}: {where}: {first.get('msg')}", where or None, "invalid_value") from None


async def _json(request: Request) -> Any:
    try:
        return await request.json()
    except ValueError:
        raise APIError(400, "the body is not JSON", None, "invalid_json") from None


def _service(state: ServerState):
    if state.tinker is None:
        raise APIError(404, "this server has no training runs (max_finetune_jobs=0 or no LoRA pool)", None, "not_found")
    return state.tinker


@router.get("/api/v1/healthz")
async def healthz():
    return {"status": "ok"}


@router.post("/api/v1/client/config")
async def client_config():
    # Plain API keys, the default HTTP transport, one forward_backward chunk at a time (the
    # server orders calls by seq_id anyway), results by retrieve_future.
    return {"pjwt_auth_enabled": False, "credential_default_source": "api_key", "use_pyqwest_transport": False,
            "parallel_fwdbwd_chunks": False, "proto_compress_fwdbwd": False, "sample_use_retrieve_futures": False,
            "custom_loss_server_side": False, "sample_join_sampling_session": False}


@router.post("/api/v1/client/dynamic_config")
async def client_dynamic_config():
    return {"refresh_interval_sec": 300, "sample_cancel_enabled": False}


@router.post("/api/v1/telemetry")
async def telemetry():
    return {"status": "accepted"}


@router.get("/api/v1/get_server_capabilities")
async def capabilities(state: ServerState = Depends(server_state)):
    return {"supported_models": [{"model_name": state.model_name, "max_context_length": state.max_model_len,
                                  "trainable": state.tinker is not None, "sampleable": True}]}


@router.post("/api/v1/create_session")
async def create_session(request: Request, state: ServerState = Depends(server_state),
                         who: Principal = Depends(principal)):
    req = _validate(T.CreateSessionRequest, await _json(request))
    sid = _service(state).create_session(who.project, req.tags, req.user_metadata)
    return {"type": "create_session", "session_id": sid}


@router.post("/api/v1/session_heartbeat")
async def session_heartbeat(request: Request, state: ServerState = Depends(server_state),
                            who: Principal = Depends(principal)):
    req = _validate(T.SessionHeartbeatRequest, await _json(request))
    _service(state).heartbeat(who.project, req.session_id)
    return {"type": "session_heartbeat"}


@router.post("/api/v1/sessions/{session_id}/finish")
async def finish_session(session_id: str, state: ServerState = Depends(server_state), who: Principal = Depends(principal)):
    svc = _service(state)
    svc.heartbeat(who.project, session_id)  # (404 for another project's session)
    await svc.end_session(session_id)
    return None


@router.post("/api/v1/create_model")
async def create_model(request: Request, state: ServerState = Depends(server_state),
                       who: Principal = Depends(principal)):
    req = _validate(T.CreateModelRequest, await _json(request))
    if req.optimizer_config.type != "adamw":
        raise APIError(400, f"optimizer {req.optimizer_config.type!r} is not supported (adamw only)", "optimizer_config", "invalid_value")
    lora = req.lora_config.model_dump() if req.lora_config is not None else None
    return await _service(state).create_model(who.project, req.session_id, req.base_model, lora, req.user_metadata,
                                              req.model_seq_id)


@router.post("/api/v1/unload_model")
async def unload_model(request: Request, state: ServerState = Depends(server_state), who: Principal = Depends(principal)):
    req = _validate(T.UnloadModelRequest, await _json(request))
    await _service(state).unload_model(who.project, req.model_id)
    return {"type": "unload_model", "model_id": req.model_id}


@router.get("/api/v1/samplers/{sampler_id}")
async def get_sampler(sampler_id: str, state: ServerState = Depends(server_state), who: Principal = Depends(principal)):
    return _service(state).sampler(who.project, sampler_id)


@router.post("/api/v1/get_info")
async def get_info(request: Request, state: ServerState = Depends(server_state), who: Principal = Depends(principal)):
    req = _validate(T.GetInfoRequest, await _json(request))
    return _service(state).get_info(who.project, req.model_id)


@router.post("/api/v1/forward_backward")
async def forward_backward(request: Request, state: ServerState = Depends(server_state),
                           who: Principal = Depends(principal)):
    if request.headers.get("content-encoding"):
        raise APIError(415, "compressed bodies are not accepted (proto_compress_fwdbwd is off)", None, "unsupported_media_type")
    try:
        req = tinker_wire.parse_forward_backward(await request.body())
    except tinker_wire.WireError as e:
        raise APIError(400, str(e), None, "invalid_value") from None
    return await _service(state).forward_backward(who.project, req)


@router.post("/api/v1/optim_step")
async def optim_step(request: Request, state: ServerState = Depends(server_state), who: Principal = Depends(principal)):
    body = await _json(request)
    adam = body.get("adam_params") if isinstance(body, dict) else None
    if not isinstance(adam, dict) or body.get("optimizer_params") is not None:
        raise APIError(400, "optim_step needs adam_params (the only optimizer here)", "adam_params", "invalid_value")
    req = _validate(T.OptimStepRequest, body)
    return await _service(state).optim_step(who.project, req.model_id, req.seq_id, adam)


@router.post("/api/v1/save_weights_for_sampler")
async def save_weights_for_sampler(request: Request, state: ServerState = Depends(server_state),
                                   who: Principal = Depends(principal)):
    req = _validate(T.SaveWeightsForSamplerRequest, await _json(request))
    return await _service(state).save_weights(who.project, req.model_id, req.seq_id, req.path, "sampler_weights",
                                              sampling_session=req.sampling_session_seq_id is not None and req.path is None)


@router.post("/api/v1/save_weights")
async def save_weights(request: Request, state: ServerState = Depends(server_state), who: Principal = Depends(principal)):
    req = _validate(T.SaveWeightsRequest, await _json(request))
    return await _service(state).save_weights(who.project, req.model_id, req.seq_id, req.path, "weights")


@router.post("/api/v1/load_weights")
async def load_weights(request: Request, state: ServerState = Depends(server_state), who: Principal = Depends(principal)):
    req = _validate(T.LoadWeightsRequest, await _json(request))
    if req.weights_access_token:
        raise APIError(400, "weights_access_token is not supported: load your own project's checkpoints",
                       "weights_access_token", "invalid_value")
    return await _service(state).load_weights(who.project, req.path, req.optimizer, req.model_id, req.seq_id,
                                              req.session_id, req.model_seq_id, req.user_metadata)


@router.post("/api/v1/save_weights_external")
async def save_weights_external(request: Request, state: ServerState = Depends(server_state),
                                who: Principal = Depends(principal)):
    req = _validate(T.SaveWeightsExternalRequest, await _json(request))
    if req.age_encryption_recipients:
        raise APIError(400, "age encryption of exported weights is not supported", "age_encryption_recipients", "invalid_value")
    return await _service(state).save_weights(who.project, req.model_id, req.seq_id, req.path, "external_weights")


@router.get("/api/v1/training_runs/{model_id}/checkpoints/external_weights/{name}/external_weights_urls")
async def external_weights_urls(model_id: str, name: str, request: Request, state: ServerState = Depends(server_state),
                                who: Principal = Depends(principal)):
    return _service(state).external_urls(who.project, model_id, name, str(request.base_url))


@router.get("/api/v1/training_runs")
async def list_training_runs(limit: int = 20, offset: int = 0, state: ServerState = Depends(server_state),
                             who: Principal = Depends(principal)):
    if not (1 <= limit <= 1000 and offset >= 0):
        raise APIError(400, "limit must be 1..1000 and offset >= 0", "limit", "invalid_value")
    return await asyncio.to_thread(_service(state).list_runs, who.project, limit, offset)


@router.get("/api/v1/training_runs/{run_id}")
async def get_training_run(run_id: str, state: ServerState = Depends(server_state), who: Principal = Depends(principal)):
    return await asyncio.to_thread(_service(state).get_run, who.project, run_id)


@router.get("/api/v1/training_runs/{run_id}/checkpoints")
async def list_checkpoints(run_id: str, state: ServerState = Depends(server_state), who: Principal = Depends(principal)):
    return await asyncio.to_thread(_service(state).list_checkpoints, who.project, run_id)


@router.get(DOWNLOAD_PREFIX + "{rel:path}")
async def download(rel: str, expires: int, signature: str, state: ServerState = Depends(server_state)):
    return FileResponse(_service(state).download_path(rel, expires, signature))


@router.post("/api/v1/create_sampling_session")
async def create_sampling_session(request: Request, state: ServerState = Depends(server_state),
                                  who: Principal = Depends(principal)):
    req = _validate(T.CreateSamplingSessionRequest, await _json(request))
    sid = _service(state).create_sampling_session(who.project, req.session_id, req.model_path, req.base_model)
    return {"type": "create_sampling_session", "sampling_session_id": sid}


@router.post("/api/v1/asample")
async def asample(request: Request, state: ServerState = Depends(server_state), who: Principal = Depends(principal)):
    body = await _json(request)
    _validate(T.SampleRequest, body)
    return await _service(state).sample(who.project, body)


@router.post("/api/v1/retrieve_future")
async def retrieve_future(request: Request, state: ServerState = Depends(server_state),
                          who: Principal = Depends(principal)):
    req = _validate(T.FutureRetrieveRequest, await _json(request))
    return await _service(state).retrieve(who.project, req.request_id)


@router.post("/api/v1/cancel_future")
async def cancel_future():
    return {}
