"""OpenAI-compatible HTTP API on FastAPI: /v1/completions, /v1/chat/completions (SSE streaming
or not), /v1/models, /health, /metrics. Routes only translate HTTP into engine requests.

One API call becomes prompts x n engine requests (fanout.py). Each error is answered in OpenAI's
shape (errors.py). A client that leaves aborts its requests.
"""

from __future__ import annotations

import json
import re
import secrets
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from miaotui.engine.engine import RequestOutput
from miaotui.engine.request import check_prompt
from miaotui.errors import InvalidRequestError, MiaotuiError
from miaotui.sampling_params import SamplingParams
from miaotui.server.errors import APIError, api_error_for, error_body, error_response
from miaotui.server.fanout import ClientGone, FanOut, Job
from miaotui.server.lifecycle import install_lifecycle
from miaotui.server.page import install_page
from miaotui.server.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions
DEFAULT_CHAT_TOKENS = 512
GREEDY_BELOW = 1e-5  # temperatures this small are greedy (vLLM); dividing by them overflows


@dataclass
class ServerConfig:
    model_name: str
    api_key: str | None = None


class APIKeyAuth:
    """Pure ASGI middleware: /v1 routes need `Authorization: Bearer <key>` (streaming-safe,
    unlike BaseHTTPMiddleware)."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = dict(scope["headers"]).get(b"authorization", b"")
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
    install_lifecycle(app, engine)  # outermost: drain, dead engine and /health (lifecycle.py)
    _add_error_handlers(app)

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
            raise APIError(404, f"model {model_id!r} not found", "model", "model_not_found")
        return card()

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(engine.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, raw: Request):
        _check_model(req, config)
        prompts = _completion_prompts(req.prompt)
        return await _serve(engine, raw, req, prompts, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, raw: Request):
        _check_model(req, config)
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            prompt = engine.tokenizer.apply_chat_template(messages)
        except MiaotuiError as e:
            raise APIError(400, str(e), "messages") from e
        except Exception as e:  # a template that fails on these messages: still their fault
            raise APIError(
                400, f"the chat template failed on these messages: {e}", "messages"
            ) from e
        return await _serve(engine, raw, req, [prompt], chat=True)

    install_page(app, engine, config)  # the chat page, speech in, translation
    return app


# Union members and validator wrappers that pydantic puts in an error's location.
_TYPE_TAG = re.compile(r"^(str|int|float|bool|list\[.*\]|dict\[.*\]|function-.*|literal\[.*\])$")


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0]
        loc = [str(p) for p in err.get("loc", ()) if p != "body" and not _TYPE_TAG.match(str(p))]
        param = ".".join(loc) or None
        msg = err.get("msg", "invalid request").removeprefix("Value error, ")
        if err.get("type") == "json_invalid":
            return error_response(400, f"malformed JSON body: {msg}")
        if param is None:
            if err.get("type") == "missing":
                return error_response(400, "the request body is missing; send a JSON object")
            return error_response(400, f"the request body must be a JSON object: {msg}")
        return error_response(400, f"{param}: {msg}", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(exc.status_code, str(exc.detail), kind=kind, headers=exc.headers)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.kind, exc.headers)

    @app.exception_handler(MiaotuiError)
    async def _miaotui_error(_: Request, exc: MiaotuiError) -> JSONResponse:
        e = api_error_for(exc)
        return error_response(e.status, e.message, e.param, e.kind, e.headers)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        return error_response(500, f"internal error: {type(exc).__name__}", kind="server_error")


def _check_model(req: SamplingFields, config: ServerConfig) -> None:
    """Unknown model names are refused; responses then name the served model."""
    if req.model is not None and req.model not in (config.model_name, "default"):
        raise APIError(
            400,
            f"model {req.model!r} is not served here; available: {config.model_name!r}",
            "model",
            kind="model_not_found",
        )
    req.model = config.model_name


def _completion_prompts(prompt) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError(400, "prompt must not be empty", "prompt")
    if all(isinstance(p, int) for p in prompt):
        return [prompt]
    return list(prompt)


def _sampling_params(engine, req: SamplingFields, prompt_len: int, chat: bool) -> SamplingParams:
    limit = engine.max_model_len
    try:  # before the default max_tokens, which needs room left in the context
        check_prompt(prompt_len, limit, "messages" if chat else "prompt")
    except InvalidRequestError as e:
        raise APIError(400, str(e), e.param) from e
    requested = getattr(req, "max_completion_tokens", None) or req.max_tokens
    field = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) else "max_tokens"
    if requested is None:
        requested = min(
            DEFAULT_CHAT_TOKENS if chat else DEFAULT_COMPLETION_TOKENS, limit - prompt_len
        )
    if prompt_len + requested > limit:
        raise APIError(
            400,
            f"this model's context is {limit} tokens, but the prompt has "
            f"{prompt_len} and {field}={requested} asks for {requested} more; "
            f"reduce the prompt or {field} (at most {limit - prompt_len} here)",
            field,
        )
    if chat:
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
    else:
        logprobs = req.logprobs
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    try:
        return SamplingParams(
            max_tokens=requested,
            temperature=0.0 if req.temperature < GREEDY_BELOW else req.temperature,
            top_p=req.top_p,
            top_k=max(req.top_k, 0),
            min_p=req.min_p,
            seed=req.seed,
            stop=stop,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            repetition_penalty=req.repetition_penalty,
            logprobs=logprobs,
            n=1,
            ignore_eos=req.ignore_eos,
        )
    except InvalidRequestError as e:
        raise APIError(400, str(e), e.param) from e


# ---- one API call ----------------------------------------------------------------------------


async def _serve(engine, raw: Request, req: SamplingFields, prompts: list, chat: bool):
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    jobs = []
    for i, prompt in enumerate(prompts):
        ids = engine.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        params = _sampling_params(engine, req, len(ids), chat)
        for j in range(req.n):
            # The j-th of n completions: distinct but reproducible seeds (as LLM.generate).
            seed = None if req.seed is None else req.seed + j
            idx = i * req.n + j
            jobs.append(Job(idx, f"{rid}-{idx}", ids, replace(params, seed=seed)))
    fan = FanOut(engine, jobs, raw)
    try:
        await fan.start()
    except ClientGone:
        return Response(status_code=499)  # nobody is listening
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        body = _sse(fan, rid, req, chat, include_usage, engine.tokenizer)
        return StreamingResponse(
            body, media_type="text/event-stream", background=BackgroundTask(fan.close)
        )
    try:
        return await _complete(fan, rid, req, chat, engine.tokenizer)
    except ClientGone:
        return Response(status_code=499)
    finally:
        fan.close()


async def _complete(fan: FanOut, rid, req, chat, tokenizer) -> JSONResponse:
    finals: dict[int, RequestOutput] = {}
    try:
        async for idx, out in fan.outputs(check_disconnect=True):
            if out.finished:
                finals[idx] = out
    except (ClientGone, APIError):
        raise
    except Exception as e:
        raise api_error_for(e) from e
    choices = [_choice(idx, finals[idx], chat, tokenizer) for idx in sorted(finals)]
    obj = "chat.completion" if chat else "text_completion"
    return JSONResponse(
        {
            "id": rid,
            "object": obj,
            "created": int(time.time()),
            "model": req.model or "default",
            "choices": choices,
            "usage": _usage_for(finals, req.n),
        }
    )


def _usage_for(finals: dict[int, RequestOutput], n: int) -> dict[str, Any]:
    # Each prompt is counted once even when n completions share it.
    prompt = sum(len(o.prompt_token_ids) for idx, o in finals.items() if idx % n == 0)
    completion = sum(len(o.token_ids) for o in finals.values())
    cached = sum(o.num_cached_tokens for idx, o in finals.items() if idx % n == 0)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def _choice(idx: int, out: RequestOutput, chat: bool, tokenizer) -> dict[str, Any]:
    lp = _logprobs(out.logprobs, chat, tokenizer) if out.logprobs else None
    if chat:
        return {
            "index": idx,
            "message": {"role": "assistant", "content": out.text},
            "logprobs": lp,
            "finish_reason": out.finish_reason,
        }
    return {"index": idx, "text": out.text, "logprobs": lp, "finish_reason": out.finish_reason}


def _logprobs(tokens, chat: bool, tokenizer, offset: int = 0) -> dict[str, Any]:
    """OpenAI logprobs of sampled tokens; `offset` is where their text starts in the completion
    (completions' text_offset counts from the start of the whole completion)."""

    def text(t: int) -> str:
        return tokenizer.decode([t], skip_special=False)

    if chat:
        content = []
        for s in tokens:
            tops = [
                {"token": text(t), "logprob": lp, "bytes": list(text(t).encode())}
                for t, lp in s.top_logprobs
            ]
            content.append(
                {
                    "token": text(s.token_id),
                    "logprob": s.logprob,
                    "bytes": list(text(s.token_id).encode()),
                    "top_logprobs": tops,
                }
            )
        return {"content": content}
    toks = [text(s.token_id) for s in tokens]
    offsets, pos = [], offset
    for t in toks:
        offsets.append(pos)
        pos += len(t)
    return {
        "tokens": toks,
        "token_logprobs": [s.logprob for s in tokens],
        "top_logprobs": [{text(t): lp for t, lp in s.top_logprobs} for s in tokens],
        "text_offset": offsets,
    }


async def _sse(fan: FanOut, rid, req, chat, include_usage, tokenizer):
    created = int(time.time())
    obj = "chat.completion.chunk" if chat else "text_completion"
    model = req.model or "default"
    finals: dict[int, RequestOutput] = {}
    lp_offset: dict[int, int] = {}

    def chunk(choices: list[dict], usage: dict | None = None) -> str:
        body = {"id": rid, "object": obj, "created": created, "model": model, "choices": choices}
        if include_usage:  # OpenAI: null on every chunk but the last
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    try:
        if chat:
            first = [
                {
                    "index": job.index,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
                for job in fan.jobs
            ]
            yield chunk(first)
        async for idx, out in fan.outputs(check_disconnect=False):
            new_lp = out.delta_logprobs
            if not out.delta_text and not out.finished and not new_lp:
                continue
            lp = None
            if new_lp:
                lp = _logprobs(new_lp, chat, tokenizer, lp_offset.get(idx, 0))
                if not chat:
                    lp_offset[idx] = lp["text_offset"][-1] + len(lp["tokens"][-1])
            reason = out.finish_reason if out.finished else None
            if chat:
                delta = {"content": out.delta_text} if out.delta_text else {}
                choice = {"index": idx, "delta": delta, "logprobs": lp, "finish_reason": reason}
            else:
                choice = {"index": idx, "text": out.delta_text, "logprobs": lp}
                choice["finish_reason"] = reason
            if out.finished:
                finals[idx] = out
            yield chunk([choice])
        if include_usage:
            yield chunk([], _usage_for(finals, req.n))
    except Exception as e:  # headers are sent: report the failure in the stream (OpenAI style)
        err = api_error_for(e)
        yield f"data: {json.dumps(error_body(err.status, err.message, err.param, err.kind))}\n\n"
    finally:
        fan.close()
    yield "data: [DONE]\n\n"
