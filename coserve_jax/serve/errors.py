"""OpenAI-style API errors: ``{"error": {"message", "type", "param", "code"}}`` with a 4xx status.

Every failure a client causes ends in one of these, raised as :class:`APIError` in a handler or
converted from FastAPI's request validation (malformed JSON, wrong types, out-of-range values:
400, as OpenAI answers them). Only the request that failed is affected.
"""

from __future__ import annotations

import json

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    500: "server_error",
    503: "server_error",
}


class APIError(Exception):
    """An error returned to the client.

    Args:
        status: HTTP status (400 bad input, 401 no or wrong API key, 404 unknown model / file /
            job, 409 a state conflict, 413 too large, 503 shutting down).
        message: what was wrong, for a person.
        param: the request field at fault (``"max_tokens"``, ``"messages.0.content"``), if any.
        code: a machine-readable code (``"model_not_found"``, ``"invalid_api_key"``,
            ``"context_length_exceeded"`` ...), if any.
    """

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return SafeJSONResponse(self.body(), status_code=self.status)


class SafeJSONResponse(JSONResponse):
    """A JSON response written in ASCII (``\\uXXXX`` escapes), so text that is not valid
    Unicode (a lone surrogate a client sent, echoed in an error message) cannot fail to encode."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def model_not_found(name: str) -> APIError:
    return APIError(404, f"The model `{name}` does not exist.", "model", "model_not_found")


async def api_error_handler(request: Request, exc: APIError) -> JSONResponse:
    return exc.response()


async def validation_error_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        message = f"The request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}"
        return APIError(400, message, None, "invalid_json").response()
    param = ".".join(loc) or None
    message = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}" for e in errors[:5])
    return APIError(400, message, param, "invalid_value").response()


async def http_error_handler(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status_code)
    return APIError(exc.status_code, str(exc.detail), None, code).response()
