"""The ASGI guard in front of every route: API key (which sets the request's project) and
body-size limits."""

from __future__ import annotations

from starlette.exceptions import HTTPException as StarletteHTTPException

from coserve_jax.serve.auth import OPEN
from coserve_jax.serve.errors import APIError
from coserve_jax.serve.state import ServerState


OPEN_PATHS = frozenset({"/health", "/ping", "/version", "/api/v1/healthz"})
"""Paths served without an API key (liveness probes and the version, as vLLM serves them)."""

OPEN_PREFIXES = ("/api/v1/weights_download/",)
"""Path prefixes served without an API key: signed download URLs (the route checks the signature)."""


class GuardMiddleware:
    """API key (``Authorization: Bearer``, or the tinker client's ``X-API-Key: tml-KEY``) on every
    path but :data:`OPEN_PATHS` whenever a key is configured (:class:`~coserve_jax.serve.auth.KeyRing`); the key's
    :class:`~coserve_jax.serve.auth.Principal` goes into the request's state. Body-size limits:
    413 above ``limits.max_body_bytes`` (``limits.max_upload_bytes`` for uploads)."""

    def __init__(self, app, state: ServerState):
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        who = OPEN
        if path not in OPEN_PATHS and not path.startswith(OPEN_PREFIXES) and self.state.keys.required:
            auth = headers.get("authorization", "")
            scheme, _, token = auth.partition(" ")
            if "x-api-key" in headers and not auth:  # the tinker client's header, its key prefixed "tml-"
                scheme, token = "bearer", headers["x-api-key"].strip().removeprefix("tml-")
            if scheme.lower() != "bearer" or not token.strip():
                return await self._reject(scope, receive, send, APIError(
                    401, "You didn't provide an API key. Send it as 'Authorization: Bearer KEY'.", None, "missing_api_key"))
            who = self.state.keys.authenticate(token.strip())
            if who is None:
                return await self._reject(scope, receive, send, APIError(401, "Incorrect API key provided.", None, "invalid_api_key"))
        scope.setdefault("state", {})["principal"] = who
        limit = self.state.config.limits.max_upload_bytes if path == "/v1/files" else self.state.config.limits.max_body_bytes
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await self._reject(scope, receive, send, _too_large(limit))
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise StarletteHTTPException(413, _too_large(limit).message)
            return message

        await self.app(scope, limited_receive, send)

    async def _reject(self, scope, receive, send, err: APIError):
        self.state.metrics.http_error(err.status)
        await err.response()(scope, receive, send)


def _too_large(limit: int) -> APIError:
    return APIError(413, f"The request body is larger than this server's limit of {limit} bytes.", None, "request_too_large")
