"""The HTTP API: a FastAPI app over an :class:`~coserve_jax.serve.engine_loop.EngineLoop`.

Endpoints (OpenAI's shapes; vLLM's for the adapter routes), one module each under
:mod:`coserve_jax.serve.routes`:

* ``models``: ``GET /health`` (no key needed), ``GET /metrics`` (Prometheus text),
  ``GET /v1/models``, ``GET /v1/models/{model}``
* ``completions``: ``POST /v1/completions``; ``chat``: ``POST /v1/chat/completions``
  (``stream: true`` answers with server-sent events ending in ``data: [DONE]``); both go through
  the one generate path of :mod:`coserve_jax.serve.generate`
* ``files``: ``POST /v1/files`` (multipart ``file`` + ``purpose``), ``GET /v1/files``,
  ``GET|DELETE /v1/files/{id}``, ``GET /v1/files/{id}/content``
* ``fine_tuning``: ``POST|GET /v1/fine_tuning/jobs``, ``GET /v1/fine_tuning/jobs/{id}``,
  ``.../events``, ``.../checkpoints``, ``POST .../cancel``
* ``adapters``: ``POST /v1/load_lora_adapter``, ``POST /v1/unload_lora_adapter``
* ``tokenize`` (vLLM's): ``POST /tokenize``, ``POST /detokenize``, ``GET /version``,
  ``GET|POST /ping`` (no key needed for the last two)

Handlers never touch the engine: they tokenize in worker threads, hand requests to the engine
loop and await its deltas. A client that disconnects (a closed stream, or a dropped connection
while a non-streaming request waits) has its requests aborted and their KV pages freed before
the next step.
"""

from __future__ import annotations

import asyncio
import contextlib

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from coserve_jax.serve.errors import APIError, api_error_handler, http_error_handler, validation_error_handler
from coserve_jax.serve.middleware import GuardMiddleware
from coserve_jax.serve.routes import ROUTERS
from coserve_jax.serve.state import ServerState

__all__ = ["ServerState", "create_app"]


def create_app(state: ServerState) -> FastAPI:
    """The FastAPI app over ``state``; its lifespan starts the engine loop and, on shutdown,
    checkpoints running fine-tuning jobs and stops the loop."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        state.start()
        try:
            yield
        finally:
            written = await asyncio.to_thread(state.stop)
            for d in written:
                print(f"coserve-jax: fine-tuning checkpoint written to {d}", flush=True)

    app = FastAPI(title="coserve-jax", version="0.1.0", lifespan=lifespan)
    app.state.server = state

    def counted(handler):
        async def wrapped(request, exc):
            response = await handler(request, exc)
            state.metrics.http_error(response.status_code)
            return response
        return wrapped

    app.add_exception_handler(APIError, counted(api_error_handler))
    app.add_exception_handler(RequestValidationError, counted(validation_error_handler))
    app.add_exception_handler(StarletteHTTPException, counted(http_error_handler))
    app.add_middleware(GuardMiddleware, state=state)
    for router in ROUTERS:
        app.include_router(router)
    return app
