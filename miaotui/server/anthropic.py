"""Anthropic's Messages API on the chat route: POST /v1/messages (streaming events or not) and
/v1/messages/count_tokens, so that the official `anthropic` client works. A request becomes an
OpenAI chat request (system prompt, text blocks, tool_use / tool_result blocks, tools and
tool_choice) and runs through the same pipeline; errors come back in Anthropic's shape
{"type": "error", "error": {"type", "message"}}."""

from __future__ import annotations

import json
import uuid
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.background import BackgroundTask

from miaotui.engine.engine import RequestOutput
from miaotui.server import calls, tools
from miaotui.server.errors import APIError, api_error_for
from miaotui.server.fanout import ClientGone
from miaotui.server.protocol import ChatCompletionRequest

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    503: "overloaded_error",
}


BLOCK_TYPES = ("text", "tool_use", "tool_result")


class Message(BaseModel):
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class CountTokensRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[Message] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(strict=True, ge=1)
    stop_sequences: list[str] | None = None
    temperature: float = Field(1.0, strict=True, ge=0.0, le=1.0)
    top_p: float | None = Field(None, strict=True, gt=0.0, le=1.0)
    top_k: int | None = Field(None, strict=True, ge=0)
    stream: bool = Field(False, strict=True)


def error_response(e: APIError) -> JSONResponse:
    kind = ERROR_TYPES.get(e.status, "api_error")
    body = {"type": "error", "error": {"type": kind, "message": e.message}}
    return JSONResponse(body, e.status, headers=e.headers)


def install_messages(app: FastAPI, engine, config) -> None:
    @app.post("/v1/messages")
    async def messages(req: MessagesRequest, raw: Request):
        chat = _chat_request(req, config)
        call = calls.chat_call(engine, chat, f"msg_{uuid.uuid4().hex[:24]}")
        try:
            fan = await calls.start_call(
                engine, raw, call, [calls.chat_prompt(engine.tokenizer, chat)]
            )
        except ClientGone:
            return Response(status_code=499)
        if req.stream:
            body = _events(fan, call, req, engine.tokenizer)
            return StreamingResponse(
                body, media_type="text/event-stream", background=BackgroundTask(fan.close)
            )
        try:
            final = None
            async for _, out in fan.outputs(check_disconnect=True):
                final = out if out.finished else final
        except ClientGone:
            return Response(status_code=499)
        except APIError:
            raise
        except Exception as e:
            raise api_error_for(e) from e
        finally:
            fan.close()
        return JSONResponse(_message(call, req, final, engine.tokenizer))

    @app.post("/v1/messages/count_tokens")
    async def count_tokens(req: CountTokensRequest) -> dict:
        chat = _chat_request(req, config)
        return {
            "input_tokens": len(engine.tokenizer.encode(calls.chat_prompt(engine.tokenizer, chat)))
        }


def _chat_request(req: CountTokensRequest, config) -> ChatCompletionRequest:
    if req.model not in (config.model_name, "default"):
        raise APIError(404, f"model: {req.model} (served here: {config.model_name})", "model")
    body: dict[str, Any] = {"model": config.model_name, "messages": _messages(req)}
    if isinstance(req, MessagesRequest):
        body.update(max_tokens=req.max_tokens, temperature=req.temperature, stop=req.stop_sequences)
        body.update(
            {k: v for k, v in (("top_p", req.top_p), ("top_k", req.top_k)) if v is not None}
        )
    if req.tools:
        body["tools"] = [
            {
                "type": "function",
                "function": {
                    "name": t.get("name"),
                    "description": t.get("description"),
                    "parameters": t.get("input_schema", {"type": "object"}),
                },
            }
            for t in req.tools
        ]
        body["tool_choice"] = _tool_choice(req.tool_choice)
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        raise APIError(400, f"{param}: {err['msg']}", param) from e


def _tool_choice(choice: dict[str, Any] | None) -> Any:
    kind = (choice or {}).get("type", "auto")
    if kind == "tool":
        return {"type": "function", "function": {"name": choice.get("name", "")}}
    return {"auto": "auto", "any": "required", "none": "none"}.get(kind, kind)


def _messages(req: CountTokensRequest) -> list[dict[str, Any]]:
    out = []
    if req.system:
        out.append({"role": "system", "content": _text(req.system)})
    for i, m in enumerate(req.messages):
        blocks = [{"type": "text", "text": m.content}] if isinstance(m.content, str) else m.content
        unknown = [b.get("type") for b in blocks if b.get("type") not in BLOCK_TYPES]
        if unknown:
            raise APIError(
                400,
                f"messages.{i}.content: block type {unknown[0]!r} is not supported "
                f"(supported: {', '.join(BLOCK_TYPES)})",
                f"messages.{i}.content",
            )
        results = [b for b in blocks if b.get("type") == "tool_result"]
        for b in results:
            out.append(
                {
                    "role": "tool",
                    "tool_call_id": b.get("tool_use_id"),
                    "content": _text(b.get("content", "")),
                }
            )
        calls = [
            {
                "id": b.get("id"),
                "type": "function",
                "function": {"name": b.get("name"), "arguments": json.dumps(b.get("input", {}))},
            }
            for b in blocks
            if b.get("type") == "tool_use"
        ]
        text = _text([b for b in blocks if b.get("type") == "text"])
        if calls:
            out.append({"role": "assistant", "content": text or None, "tool_calls": calls})
        elif text or not results:
            out.append({"role": m.role, "content": text})
    return out


def _text(content: str | list[dict[str, Any]]) -> str:
    if isinstance(content, str):
        return content
    return "".join(b.get("text", "") for b in content if b.get("type") == "text")


def _blocks(chat: ChatCompletionRequest, out: RequestOutput) -> list[dict[str, Any]]:
    answer = tools.parse_answer(chat, out.text)
    blocks: list[dict[str, Any]] = []
    if answer.content:
        blocks.append({"type": "text", "text": answer.content})
    for call in answer.tool_calls:
        fn = call["function"]
        blocks.append(
            {
                "type": "tool_use",
                "id": "toolu_" + call["id"].removeprefix("call_"),
                "name": fn["name"],
                "input": json.loads(fn["arguments"]),
            }
        )
    return blocks


def _stop(req: MessagesRequest, out: RequestOutput, blocks: list, tokenizer) -> tuple[str, Any]:
    """Anthropic's stop_reason and stop_sequence."""
    if any(b["type"] == "tool_use" for b in blocks):
        return "tool_use", None
    if out.finish_reason == "length":
        return "max_tokens", None
    if out.token_ids and out.token_ids[-1] not in tokenizer.stop_ids and req.stop_sequences:
        full = tokenizer.decode(out.token_ids)
        start = max(0, len(out.text) - 1)
        hits = [(full.find(s, start), s) for s in req.stop_sequences if full.find(s, start) >= 0]
        if hits:
            return "stop_sequence", min(hits)[1]
    return "end_turn", None


def _message(call, req: MessagesRequest, out: RequestOutput, tokenizer) -> dict[str, Any]:
    blocks = _blocks(call.req, out)
    stop_reason, stop_sequence = _stop(req, out, blocks, tokenizer)
    return {
        "id": call.rid,
        "type": "message",
        "role": "assistant",
        "model": call.req.model,
        "content": blocks,
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "usage": {"input_tokens": len(out.prompt_token_ids), "output_tokens": len(out.token_ids)},
    }


def _event(kind: str, data: dict[str, Any]) -> str:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n"


async def _events(fan, call, req: MessagesRequest, tokenizer):
    """message_start, then text deltas as they come (a reply that may hold tool calls is sent
    whole at its end, as blocks), message_delta with the stop reason, message_stop."""
    held = tools.uses_tools(call.req)
    started = opened = False
    try:
        async for _, out in fan.outputs(check_disconnect=False):
            if not started:
                started = True
                message = {
                    "id": call.rid,
                    "type": "message",
                    "role": "assistant",
                    "model": call.req.model,
                    "content": [],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": {"input_tokens": len(out.prompt_token_ids), "output_tokens": 0},
                }
                yield _event("message_start", {"message": message})
            if not held and out.delta_text:
                if not opened:
                    opened = True
                    yield _event(
                        "content_block_start",
                        {"index": 0, "content_block": {"type": "text", "text": ""}},
                    )
                delta = {"type": "text_delta", "text": out.delta_text}
                yield _event("content_block_delta", {"index": 0, "delta": delta})
            if out.finished:
                blocks = _blocks(call.req, out)
                if held:
                    for chunk in _whole_blocks(blocks):
                        yield chunk
                elif opened:
                    yield _event("content_block_stop", {"index": 0})
                stop_reason, stop_sequence = _stop(req, out, blocks, tokenizer)
                delta = {"stop_reason": stop_reason, "stop_sequence": stop_sequence}
                yield _event(
                    "message_delta",
                    {"delta": delta, "usage": {"output_tokens": len(out.token_ids)}},
                )
        yield _event("message_stop", {})
    except Exception as e:  # headers are sent: an error event (Anthropic style)
        err = api_error_for(e)
        kind = ERROR_TYPES.get(err.status, "api_error")
        yield _event("error", {"error": {"type": kind, "message": err.message}})
    finally:
        fan.close()


def _whole_blocks(blocks: list[dict[str, Any]]):
    for i, block in enumerate(blocks):
        if block["type"] == "text":
            yield _event(
                "content_block_start", {"index": i, "content_block": {"type": "text", "text": ""}}
            )
            yield _event(
                "content_block_delta",
                {"index": i, "delta": {"type": "text_delta", "text": block["text"]}},
            )
        else:
            start = {**block, "input": {}}
            yield _event("content_block_start", {"index": i, "content_block": start})
            delta = {"type": "input_json_delta", "partial_json": json.dumps(block["input"])}
            yield _event("content_block_delta", {"index": i, "delta": delta})
        yield _event("content_block_stop", {"index": i})
