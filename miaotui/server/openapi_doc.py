"""The served /openapi.json says what the routes do: validation errors are 400 (not FastAPI's
default 422) in OpenAI's error shape, unknown models 404, a full queue 429, a dead engine 503;
/health answers an empty 200 (or 503) and /metrics Prometheus text."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
ANTHROPIC_ERROR_SCHEMA = {
    "type": "object",
    "required": ["type", "error"],
    "properties": {
        "type": {"const": "error"},
        "error": {
            "type": "object",
            "required": ["type", "message"],
            "properties": {"type": {"type": "string"}, "message": {"type": "string"}},
        },
    },
}
ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}
ANTHROPIC_ERROR_REF = {"$ref": "#/components/schemas/AnthropicError"}
API_ERRORS = {
    "400": "Invalid request (a field is named in error.param)",
    "401": "Missing or wrong API key (when the server has one)",
    "404": "Unknown model",
    "429": "Queue full; retry after the Retry-After header's seconds",
    "500": "Internal error",
    "503": "The engine is not running",
}


def _error(description: str, ref: dict[str, str] = ERROR_REF) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": ref}}}


def document_errors(app: FastAPI) -> None:
    """Replace app.openapi with one that documents what the routes really answer."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
            doc.setdefault("components", {}).setdefault("schemas", {})
            doc["components"]["schemas"]["ErrorResponse"] = ERROR_SCHEMA
            doc["components"]["schemas"]["AnthropicError"] = ANTHROPIC_ERROR_SCHEMA
            for schema in ("HTTPValidationError", "ValidationError"):
                doc["components"]["schemas"].pop(schema, None)
            for path, ops in doc.get("paths", {}).items():
                for op in ops.values():
                    _document(path, op["responses"])
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi


def _document(path: str, responses: dict[str, Any]) -> None:
    responses.pop("422", None)
    if path == "/health":
        responses["200"] = {"description": "The engine is serving (empty body)"}
        responses["503"] = {"description": "The engine is down or the server is draining"}
    elif path == "/metrics":
        responses["200"] = {
            "description": "Prometheus metrics",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        }
    else:
        ref = ANTHROPIC_ERROR_REF if path.startswith("/v1/messages") else ERROR_REF
        for status, description in API_ERRORS.items():
            if status != "401" or path.startswith("/v1"):  # the API key guards /v1 only
                responses.setdefault(status, _error(description, ref))
