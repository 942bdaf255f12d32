"""``POST /v1/load_lora_adapter``, ``POST /v1/unload_lora_adapter`` (vLLM's dynamic LoRA routes)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends
from fastapi.responses import PlainTextResponse

from coserve_jax.engine import Engine
from coserve_jax.lora.manager import AdapterError
from coserve_jax.lora.peft_io import AdapterFormatError, read_peft
from coserve_jax.serve import protocol as P
from coserve_jax.serve.errors import APIError
from coserve_jax.serve.auth import SHARED, Principal
from coserve_jax.serve.routes.models import check_may_unload
from coserve_jax.serve.state import ServerState, principal, server_state

router = APIRouter()


@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(body: P.LoadLoRAAdapterRequest, state: ServerState = Depends(server_state),
                            who: Principal = Depends(principal)):
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
    await asyncio.to_thread(state.remember_adapter, name, body.lora_path, SHARED if who.admin else who.project)
    return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")


@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(body: P.UnloadLoRAAdapterRequest, state: ServerState = Depends(server_state),
                              who: Principal = Depends(principal)):
    name = body.lora_name
    if name in state.owners or state.jobs.project_of_model(name) is not None:
        try:
            check_may_unload(state, who, name)
        except APIError as e:
            if e.status == 404:  # vLLM's message for an unknown adapter
                raise APIError(404, f"The lora adapter '{name}' cannot be found.", "lora_name", "adapter_not_found") from None
            raise

    def unload(engine: Engine):
        if name not in engine.list_adapters():
            raise APIError(404, f"The lora adapter '{name}' cannot be found.", "lora_name", "adapter_not_found")
        engine.unload_adapter(name)

    try:
        await state.loop.call(unload)
    except AdapterError as e:
        raise APIError(400, str(e), "lora_name", "adapter_in_use") from None
    await asyncio.to_thread(state.forget_adapter, name)
    return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")
