"""OpenAI-compatible HTTP API on FastAPI: /v1/completions, /v1/chat/completions (SSE streaming
or not), /v1/models, /health, /metrics. Routes only translate HTTP into engine requests."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from miaotui.engine.engine import RequestOutput
from miaotui.errors import CapacityError, InvalidRequestError, MiaotuiError
from miaotui.sampling_params import SamplingParams
from miaotui.server.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions
DEFAULT_CHAT_TOKENS = 512


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind
        self.headers = headers or {}


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    kind: str = "invalid_request_error",
    headers: dict | None = None,
) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


@dataclass
class ServerConfig:
    model_name: str
    api_key: str | None = None


def create_app(engine, config: ServerConfig) -> FastAPI:
    """`engine` is an AsyncEngine (or anything with generate/abort/tokenizer/max_model_len)."""
    app = FastAPI(title="miaotui", version="0.1")
    app.state.engine, app.state.config = engine, config

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0]
        loc = [str(p) for p in err.get("loc", []) if p != "body"]
        param = ".".join(loc) or None
        msg = err.get("msg", "invalid request")
        if err.get("type") == "json_invalid":
            return error_response(400, f"malformed JSON body: {msg}")
        return error_response(400, f"{param}: {msg}" if param else msg, param)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.kind, exc.headers)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if config.api_key and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given, f"Bearer {config.api_key}"):
                return error_response(
                    401, "invalid or missing API key", kind="authentication_error"
                )
        return await call_next(request)

    @app.get("/health")
    async def health() -> Response:
        if getattr(engine, "error", None) is not None:
            return error_response(503, f"engine failed: {engine.error}", kind="server_error")
        return Response(status_code=200)

    @app.get("/v1/models")
    async def models() -> dict:
        card = {
            "id": config.model_name,
            "object": "model",
            "created": 0,
            "owned_by": "miaotui",
            "max_model_len": engine.max_model_len,
        }
        return {"object": "list", "data": [card]}

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
        return await _serve(engine, raw, req, [prompt], chat=True)

    return app


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
    requested = getattr(req, "max_completion_tokens", None) or req.max_tokens
    if requested is None:
        requested = min(
            DEFAULT_CHAT_TOKENS if chat else DEFAULT_COMPLETION_TOKENS, max(1, limit - prompt_len)
        )
    field = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) else "max_tokens"
    if prompt_len + requested > limit:
        raise APIError(
            400,
            f"this model's context is {limit} tokens, but the prompt has "
            f"{prompt_len} and {field}={requested} asks for {requested} more; "
            f"reduce the prompt or {field}",
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
            temperature=req.temperature,
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


async def _serve(engine, raw: Request, req: SamplingFields, prompts: list, chat: bool):
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    jobs = []
    for i, prompt in enumerate(prompts):
        ids = engine.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise APIError(400, "the prompt is empty", "prompt")
        params = _sampling_params(engine, req, len(ids), chat)
        for j in range(req.n):
            seed = None if req.seed is None else req.seed + j
            sub = SamplingParams(**{**params.__dict__, "seed": seed})
            jobs.append((i * req.n + j, ids, sub))
    streams = _start(engine, rid, jobs)
    first = await _first_outputs(streams)  # surfaces 400/429 before any byte is sent
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        body = _sse(raw, rid, req, streams, first, chat, include_usage, engine.tokenizer)
        return StreamingResponse(body, media_type="text/event-stream")
    return await _complete(raw, rid, req, streams, first, chat, engine.tokenizer)


def _start(engine, rid: str, jobs) -> list[tuple[int, AsyncIterator[RequestOutput]]]:
    return [(idx, engine.generate(ids, params, f"{rid}-{idx}")) for idx, ids, params in jobs]


async def _first_outputs(streams) -> dict[int, RequestOutput | None]:
    """Start every sub-request; a bad request or a full queue fails the whole call cleanly."""
    first: dict[int, RequestOutput | None] = {}
    tasks = {idx: asyncio.ensure_future(anext(gen, None)) for idx, gen in streams}
    try:
        for idx, task in tasks.items():
            first[idx] = await task
    except (InvalidRequestError, CapacityError) as e:
        for t in tasks.values():
            t.cancel()
        for _, gen in streams:
            await gen.aclose()
        if isinstance(e, CapacityError):
            raise APIError(
                429, f"server busy: {e}", kind="rate_limit_error", headers={"Retry-After": "1"}
            ) from e
        raise APIError(400, str(e), getattr(e, "param", None)) from e
    except BaseException:
        for _, gen in streams:
            await gen.aclose()
        raise
    return first


async def _merged(streams, first) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of all sub-requests as they come, tagged with their choice index."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(idx: int, gen) -> None:
        try:
            if first[idx] is not None:
                await queue.put((idx, first[idx]))
                if first[idx].finished:
                    return
            async for out in gen:
                await queue.put((idx, out))
        except BaseException as e:  # forward engine failures to the consumer
            await queue.put((idx, e))
        finally:
            await queue.put((idx, None))

    tasks = [asyncio.create_task(pump(idx, gen)) for idx, gen in streams]
    remaining = len(tasks)
    try:
        while remaining:
            idx, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield idx, item
    finally:
        for t in tasks:
            t.cancel()
        for _, gen in streams:
            await gen.aclose()


async def _complete(raw, rid, req, streams, first, chat, tokenizer) -> JSONResponse:
    finals: dict[int, RequestOutput] = {}
    async for idx, out in _merged(streams, first):
        if await raw.is_disconnected():
            return JSONResponse({}, status_code=499)  # generators close: requests aborted
        if out.finished:
            finals[idx] = out
    choices = [_choice(idx, finals[idx], chat, tokenizer, req) for idx in sorted(finals)]
    usage = _usage_for(finals, req.n)
    obj = "chat.completion" if chat else "text_completion"
    return JSONResponse(
        {
            "id": rid,
            "object": obj,
            "created": int(time.time()),
            "model": req.model or "default",
            "choices": choices,
            "usage": usage,
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


def _choice(idx: int, out: RequestOutput, chat: bool, tokenizer, req) -> dict[str, Any]:
    lp = _logprobs(out.logprobs, chat, tokenizer) if out.logprobs else None
    if chat:
        return {
            "index": idx,
            "message": {"role": "assistant", "content": out.text},
            "logprobs": lp,
            "finish_reason": out.finish_reason,
        }
    return {"index": idx, "text": out.text, "logprobs": lp, "finish_reason": out.finish_reason}


def _logprobs(tokens, chat: bool, tokenizer) -> dict[str, Any]:
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
    offsets, pos = [], 0
    for t in toks:
        offsets.append(pos)
        pos += len(t)
    return {
        "tokens": toks,
        "token_logprobs": [s.logprob for s in tokens],
        "top_logprobs": [{text(t): lp for t, lp in s.top_logprobs} for s in tokens],
        "text_offset": offsets,
    }


async def _sse(raw, rid, req, streams, first, chat, include_usage, tokenizer):
    created = int(time.time())
    obj = "chat.completion.chunk" if chat else "text_completion"
    model = req.model or "default"
    finals: dict[int, RequestOutput] = {}
    sent_lp: dict[int, int] = {}

    def chunk(choices: list[dict], usage: dict | None = None) -> str:
        body = {"id": rid, "object": obj, "created": created, "model": model, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    if chat:
        yield chunk(
            [
                {
                    "index": i,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
                for i in sorted(first)
            ]
        )
    async for idx, out in _merged(streams, first):
        new_lp = out.logprobs[sent_lp.get(idx, 0) :]
        sent_lp[idx] = len(out.logprobs)
        if not out.delta_text and not out.finished and not new_lp:
            continue
        lp = _logprobs(new_lp, chat, tokenizer) if new_lp else None
        reason = out.finish_reason if out.finished else None
        if chat:
            choice = {
                "index": idx,
                "delta": {"content": out.delta_text} if out.delta_text else {},
                "logprobs": lp,
                "finish_reason": reason,
            }
        else:
            choice = {"index": idx, "text": out.delta_text, "logprobs": lp, "finish_reason": reason}
        if out.finished:
            finals[idx] = out
        yield chunk([choice])
    if include_usage:
        yield chunk([], _usage_for(finals, req.n))
    yield "data: [DONE]\n\n"
