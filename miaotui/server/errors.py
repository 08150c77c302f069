"""HTTP errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}, and the map
from engine-side errors to them (bad input 400, a full queue 429 + Retry-After, a dead engine or
rank 503, anything else 500). `code` is OpenAI's string code ("model_not_found",
"context_length_exceeded", ...) or null, never the HTTP status."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

from miaotui.engine.async_engine import EngineDeadError
from miaotui.errors import CapacityError, DistributedError, InvalidRequestError

RETRY_AFTER_S = "1"


class APIError(Exception):
    """Raised in a route: answered as an OpenAI-style error with this status and headers."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind
        self.headers = headers or {}
        self.code = code


def error_body(message: str, param: str | None, kind: str, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    kind: str = "invalid_request_error",
    headers: dict | None = None,
    code: str | None = None,
) -> JSONResponse:
    return JSONResponse(error_body(message, param, kind, code), status, headers=headers)


def respond(e: APIError) -> JSONResponse:
    return error_response(e.status, e.message, e.param, e.kind, e.headers, e.code)


def api_error_for(e: BaseException) -> APIError:
    """An engine-side error -> the HTTP error a client should see."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, CapacityError):
        return APIError(
            429,
            f"server busy: {e}",
            kind="rate_limit_error",
            headers={"Retry-After": RETRY_AFTER_S},
            code="rate_limit_exceeded",
        )
    if isinstance(e, InvalidRequestError):
        return APIError(400, str(e), e.param)
    if isinstance(e, (EngineDeadError, DistributedError)):  # the engine (or a rank) is down
        return APIError(503, str(e), kind="server_error")
    return APIError(500, f"{type(e).__name__}: {e}", kind="server_error")
