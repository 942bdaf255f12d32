"""``POST /v1/load_lora_adapter``, ``POST /v1/unload_lora_adapter`` (vLLM's dynamic LoRA routes)."""

from __future__ import annotations

import asyncio
import os

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
    path = allowed_path(state.config.lora_roots, who, body.lora_path)
    try:
        weights = await asyncio.to_thread(read_peft, path, state.peft_limits)
    except (FileNotFoundError, AdapterFormatError, OSError, ValueError) as e:
        raise APIError(400, f"cannot load LoRA adapter {name!r} from {body.lora_path!r}: {e}", "lora_path", "invalid_value") from None
    try:
        await state.loop.call(lambda e: e.load_adapter(name, weights))
    except AdapterError as e:
        raise APIError(400, str(e), "lora_name", "invalid_value") from None
    await asyncio.to_thread(state.remember_adapter, name, path, SHARED if who.admin else who.project)
    return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")


def allowed_path(roots: list[str] | None, who: Principal, path: str) -> str:
    """``path`` resolved (symbolic links followed), if ``who`` may read it: inside one of
    ``roots``, or anywhere for an admin key when no roots are configured.

    Raises:
        APIError: 403 outside the roots (after following links, so ``..`` and links cannot
            escape), or no roots and not an admin key.
    """
    if "\0" in path:
        raise APIError(400, "lora_path holds a NUL character", "lora_path", "invalid_value")
    if not roots:
        if not who.admin:
            raise APIError(403, "loading an adapter from a path needs an admin key or a server started with --lora-root",
                           "lora_path", "permission_denied")
        return os.path.realpath(path)
    real = os.path.realpath(path)
    for root in roots:
        r = os.path.realpath(root)
        if real == r or real.startswith(r.rstrip(os.sep) + os.sep):
            return real
    raise APIError(403, f"lora_path {path!r} is outside this server's --lora-root directories", "lora_path", "permission_denied")


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
