"""OpenAI-compatible HTTP API on FastAPI: /v1/completions, /v1/chat/completions (SSE streaming
or not; structured outputs, tool calls), /v1/models, /health, /metrics. Routes only translate HTTP
into engine requests.

One API call becomes prompts x n (or best_of) engine requests (fanout.py). Each error is answered
in OpenAI's shape (errors.py). A client that leaves aborts its requests. Structured outputs are
in structured.py, tool calling in tools.py, the served OpenAPI document in openapi_doc.py.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from miaotui.errors import MiaotuiError
from miaotui.server.calls import build_call, chat_prompt, context_exceeded, start_call
from miaotui.server.errors import APIError, api_error_for, error_response, respond
from miaotui.server.fanout import ClientGone
from miaotui.server.forward import ServerForward
from miaotui.server.lifecycle import install_lifecycle
from miaotui.server.openapi_doc import document_errors
from miaotui.server.page import install_page
from miaotui.server.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields
from miaotui.server.responses import Call, complete, envelope, logprobs_json, sse


@dataclass
class ServerConfig:
    model_name: str
    api_key: str | None = None
    allowed_origins: tuple[str, ...] = field(default_factory=tuple)
    """Origins allowed by CORS (browsers); empty: no CORS headers at all (the default)."""
    model_path: str | None = None
    """The served checkpoint, for embeddings when the engine's model gives only logits."""


class APIKeyAuth:
    """Pure ASGI middleware: /v1 routes need `Authorization: Bearer <key>` (streaming-safe,
    unlike BaseHTTPMiddleware)."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            headers = dict(scope["headers"])
            given = headers.get(b"authorization", b"")
            if b"x-api-key" in headers:  # Anthropic's clients send the key this way
                given = b"Bearer " + headers[b"x-api-key"]
            if not secrets.compare_digest(given, self.expected):
                response = error_response(
                    401, "invalid or missing API key", kind="authentication_error"
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(engine, config: ServerConfig) -> FastAPI:
    """`engine` is an AsyncEngine (or anything with generate/abort/tokenizer/max_model_len/
    metrics)."""
    app = FastAPI(title="miaotui", version="0.1")
    app.state.engine, app.state.config = engine, config
    if config.api_key:
        app.add_middleware(APIKeyAuth, api_key=config.api_key)
    if config.allowed_origins:  # added last: outermost, so preflights skip the API key
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.allowed_origins),
            allow_methods=["*"],
            allow_headers=["*"],
        )
    install_lifecycle(app, engine)  # outermost: drain, dead engine and /health (lifecycle.py)
    _add_error_handlers(app)
    document_errors(app)
    forward = ServerForward(config.model_path)  # embeddings, prompt logprobs

    @app.get("/health")
    async def health() -> Response:
        if getattr(engine, "error", None) is not None:
            return error_response(503, f"engine failed: {engine.error}", kind="server_error")
        return Response(status_code=200)

    def card() -> dict[str, Any]:
        return {
            "id": config.model_name,
            "object": "model",
            "created": 0,
            "owned_by": "miaotui",
            "max_model_len": engine.max_model_len,
        }

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict:
        if model_id not in (config.model_name, "default"):
            raise _model_not_found(model_id, config)
        return card()

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(engine.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, raw: Request):
        _check_model(req, config)
        prompts = _completion_prompts(req.prompt)
        return await _serve(engine, raw, req, prompts, chat=False, forward=forward)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, raw: Request):
        _check_model(req, config)
        return await _serve(engine, raw, req, [chat_prompt(engine.tokenizer, req)], chat=True)

    _install_more_endpoints(app, engine, config, forward)

    install_page(app, engine, config)  # the chat page, speech in, translation
    return app


def _install_more_endpoints(app: FastAPI, engine, config: ServerConfig, forward) -> None:
    """Anthropic Messages, embeddings, tokenize / detokenize (their own modules)."""
    from miaotui.server.anthropic import install_messages
    from miaotui.server.embeddings import install_embeddings
    from miaotui.server.tokens import install_tokens

    def check_model(req) -> None:
        _check_model(req, config)

    install_messages(app, engine, config)
    install_embeddings(app, engine, forward, check_model)
    install_tokens(app, engine, check_model)


def _model_not_found(name: str, config: ServerConfig) -> APIError:
    return APIError(
        404,
        f"The model `{name}` does not exist or you do not have access to it "
        f"(served here: {config.model_name!r}).",
        "model",
        code="model_not_found",
    )


# Union members and validator wrappers that pydantic puts in an error's location.
_TYPE_TAG = re.compile(r"^(str|int|float|bool|list\[.*\]|dict\[.*\]|function-.*|literal\[.*\])$")


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(raw: Request, exc: RequestValidationError) -> JSONResponse:
        return _reply(raw, _validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(raw: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _reply(raw, APIError(exc.status_code, str(exc.detail), None, kind, exc.headers))

    @app.exception_handler(APIError)
    async def _api_error(raw: Request, exc: APIError) -> JSONResponse:
        return _reply(raw, exc)

    @app.exception_handler(MiaotuiError)
    async def _miaotui_error(raw: Request, exc: MiaotuiError) -> JSONResponse:
        return _reply(raw, api_error_for(exc))

    @app.exception_handler(Exception)
    async def _unexpected(raw: Request, exc: Exception) -> JSONResponse:
        error = APIError(500, f"internal error: {type(exc).__name__}", kind="server_error")
        return _reply(raw, error)


def _reply(raw: Request, e: APIError) -> JSONResponse:
    """OpenAI's error shape, or Anthropic's on its Messages routes."""
    if raw.url.path.startswith("/v1/messages"):
        from miaotui.server.anthropic import error_response as anthropic_error

        return anthropic_error(e)
    return respond(e)


def _validation_error(exc: RequestValidationError) -> APIError:
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body" and not _TYPE_TAG.match(str(p))]
    msg = err.get("msg", "invalid request").removeprefix("Value error, ")
    named = _FIELD_PREFIX.match(msg) if err.get("type") == "value_error" else None
    if named:  # a model-level check names its field: "stream_options: only allowed when"
        loc, msg = loc + [named.group(1)], msg[named.end() :]
    param = ".".join(loc) or None
    if err.get("type") == "json_invalid":
        return APIError(400, f"malformed JSON body: {msg}")
    if param is None:
        if err.get("type") == "missing":
            return APIError(400, "the request body is missing; send a JSON object")
        return APIError(400, f"the request body must be a JSON object: {msg}")
    return APIError(400, f"{param}: {msg}", param)


_FIELD_PREFIX = re.compile(r"^([a-z_]+): ")


def _check_model(req: SamplingFields, config: ServerConfig) -> None:
    """Unknown model names are refused; responses then name the served model."""
    if req.model is not None and req.model not in (config.model_name, "default"):
        raise _model_not_found(req.model, config)
    req.model = config.model_name


def _completion_prompts(prompt) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError(400, "prompt must not be empty", "prompt")
    if all(isinstance(p, int) for p in prompt):
        return [prompt]
    return list(prompt)


# ---- one API call ----------------------------------------------------------------------------


async def _serve(
    engine,
    raw: Request,
    req: SamplingFields,
    prompts: list,
    chat: bool,
    forward: ServerForward | None = None,
):
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    call = build_call(engine, req, prompts, chat, rid)
    if call.echo_texts and req.logprobs is not None and forward is not None:
        echo_logprobs = await _prompt_logprobs(engine, forward, prompts, req.logprobs)
        call = replace(call, echo_logprobs=echo_logprobs)
    if call.echo_texts and req.max_tokens == 0:
        return _echo_only(engine, call, prompts)
    try:
        fan = await start_call(engine, raw, call, prompts)
    except ClientGone:
        return Response(status_code=499)  # nobody is listening
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        body = sse(fan, call, include_usage, engine.tokenizer)
        return StreamingResponse(
            body, media_type="text/event-stream", background=BackgroundTask(fan.close)
        )
    try:
        return await complete(fan, call, engine.tokenizer)
    except ClientGone:
        return Response(status_code=499)
    finally:
        fan.close()


def _prompt_ids(engine, prompts: list) -> list[list[int]]:
    ids = [engine.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
    for p in ids:
        if len(p) > engine.max_model_len:
            raise context_exceeded(engine.max_model_len, len(p), None, "prompt")
        if not p or not all(0 <= t < engine.tokenizer.vocab_size for t in p):
            raise APIError(400, "prompt: empty, or token ids outside the vocabulary", "prompt")
    return ids


async def _prompt_logprobs(engine, forward: ServerForward, prompts: list, top: int) -> tuple:
    """echo with logprobs: every prompt token's log-probability (the server's own pass)."""
    ids = _prompt_ids(engine, prompts)
    return tuple([await asyncio.to_thread(forward.prompt_logprobs, p, top) for p in ids])


def _echo_only(engine, call: Call, prompts: list) -> JSONResponse:
    """echo with max_tokens 0: the prompts themselves (and their logprobs), nothing generated."""
    ids = _prompt_ids(engine, prompts)
    choices = [
        {
            "index": i * call.req.n + j,
            "text": text,
            "logprobs": logprobs_json(call.echo_logprobs[i], False, engine.tokenizer)
            if call.echo_logprobs
            else None,
            "finish_reason": "length",
        }
        for i, text in enumerate(call.echo_texts)
        for j in range(call.req.n)
    ]
    num_prompt = sum(len(p) for p in ids)
    usage = {"prompt_tokens": num_prompt, "completion_tokens": 0, "total_tokens": num_prompt}
    return JSONResponse(envelope(call, "text_completion", choices, usage))
