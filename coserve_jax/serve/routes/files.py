"""``POST /v1/files`` (multipart ``file`` + ``purpose``), ``GET /v1/files``, ``GET|DELETE
/v1/files/{id}``, ``GET /v1/files/{id}/content`` (OpenAI's Files API)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, File, Form, UploadFile
from fastapi.responses import Response

from coserve_jax.serve import protocol as P
from coserve_jax.serve.errors import APIError
from coserve_jax.serve.auth import Principal
from coserve_jax.serve.state import ServerState, principal, server_state

router = APIRouter()


@router.post("/v1/files")
async def upload_file(file: UploadFile = File(...), purpose: str = Form(...), state: ServerState = Depends(server_state),
                      who: Principal = Depends(principal)):
    # the upload is already spooled to a temporary file by the multipart parser: copy it in chunks
    return await asyncio.to_thread(state.files.create, file.file, file.filename or "upload.jsonl", purpose, who.project)


@router.get("/v1/files")
async def list_files(purpose: str | None = None, limit: int = 10000, order: str = "desc", after: str | None = None,
                     state: ServerState = Depends(server_state), who: Principal = Depends(principal)):
    """OpenAI's query: ``purpose`` filter, ``order`` by ``created_at`` (``desc`` newest first, or
    ``asc``), a cursor ``after`` a file id and ``limit`` (1..10000)."""
    if order not in ("asc", "desc"):
        raise APIError(400, f"order must be 'asc' or 'desc', got {order!r}", "order", "invalid_value")
    items = await asyncio.to_thread(state.files.list, who.project)  # newest first
    if purpose is not None:
        items = [f for f in items if f["purpose"] == purpose]
    if order == "asc":
        items.reverse()
    return P.cursor_page(items, after, limit, max_limit=10000)


@router.get("/v1/files/{file_id}")
async def retrieve_file(file_id: str, state: ServerState = Depends(server_state), who: Principal = Depends(principal)):
    return await asyncio.to_thread(state.files.get, file_id, who.project)


@router.delete("/v1/files/{file_id}")
async def delete_file(file_id: str, state: ServerState = Depends(server_state), who: Principal = Depends(principal)):
    return await asyncio.to_thread(state.files.delete, file_id, who.project)


@router.get("/v1/files/{file_id}/content")
async def file_content(file_id: str, state: ServerState = Depends(server_state), who: Principal = Depends(principal)):
    await asyncio.to_thread(state.files.get, file_id, who.project)
    data = await asyncio.to_thread(_read_bytes, state.files.path(file_id))
    return Response(data, media_type="application/octet-stream")


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()
