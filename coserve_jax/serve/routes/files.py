"""``POST /v1/files`` (multipart ``file`` + ``purpose``), ``GET /v1/files``, ``GET|DELETE
/v1/files/{id}``, ``GET /v1/files/{id}/content`` (OpenAI's Files API)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, File, Form, UploadFile
from fastapi.responses import Response

from coserve_jax.serve.state import ServerState, server_state

router = APIRouter()


@router.post("/v1/files")
async def upload_file(file: UploadFile = File(...), purpose: str = Form(...), state: ServerState = Depends(server_state)):
    data = await file.read()
    return await asyncio.to_thread(state.files.create, data, file.filename or "upload.jsonl", purpose)


@router.get("/v1/files")
async def list_files(state: ServerState = Depends(server_state)):
    return {"object": "list", "data": state.files.list(), "has_more": False}


@router.get("/v1/files/{file_id}")
async def retrieve_file(file_id: str, state: ServerState = Depends(server_state)):
    return state.files.get(file_id)


@router.delete("/v1/files/{file_id}")
async def delete_file(file_id: str, state: ServerState = Depends(server_state)):
    return state.files.delete(file_id)


@router.get("/v1/files/{file_id}/content")
async def file_content(file_id: str, state: ServerState = Depends(server_state)):
    state.files.get(file_id)
    data = await asyncio.to_thread(_read_bytes, state.files.path(file_id))
    return Response(data, media_type="application/octet-stream")


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()
