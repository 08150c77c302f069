"""OpenAI response bodies of one call: the whole JSON answer (choices, usage, logprobs, tool
calls, best_of's pick, echo) or its server-sent events."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from fastapi.responses import JSONResponse

from miaotui.engine.engine import RequestOutput
from miaotui.engine.sampler import SampledToken
from miaotui.server import tools
from miaotui.server.errors import APIError, api_error_for, error_body
from miaotui.server.fanout import ClientGone, FanOut
from miaotui.server.protocol import SamplingFields

SYSTEM_FINGERPRINT = "fp_miaotui_0.1"


@dataclass(frozen=True)
class Call:
    """What one API call asked for, beyond its sampling parameters."""

    rid: str
    req: SamplingFields
    chat: bool
    per_prompt: int
    """Engine requests per prompt: n, or best_of (the n most likely of them are returned)."""
    echo_texts: tuple[str, ...] = ()
    """Completions with echo: each prompt's text, returned before its completion."""
    echo_logprobs: tuple[list[SampledToken], ...] = ()
    """With echo and logprobs: each prompt's token log-probabilities (the first has none)."""


def envelope(call: Call, obj: str, choices: list, usage: dict | None) -> dict[str, Any]:
    return {
        "id": call.rid,
        "object": obj,
        "created": int(time.time()),
        "model": call.req.model or "default",
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "choices": choices,
        "usage": usage,
    }


async def complete(fan: FanOut, call: Call, tokenizer) -> JSONResponse:
    finals: dict[int, RequestOutput] = {}
    try:
        async for idx, out in fan.outputs(check_disconnect=True):
            if out.finished:
                finals[idx] = out
    except (ClientGone, APIError):
        raise
    except Exception as e:
        raise api_error_for(e) from e
    usage = _usage_for(finals, call.per_prompt)
    kept = _best(finals, call)
    choices = [_choice(idx, kept[idx], call, tokenizer) for idx in sorted(kept)]
    obj = "chat.completion" if call.chat else "text_completion"
    return JSONResponse(envelope(call, obj, choices, usage))


def _best(finals: dict[int, RequestOutput], call: Call) -> dict[int, RequestOutput]:
    """best_of: per prompt, the n completions of highest cumulative logprob, renumbered."""
    n, per = call.req.n, call.per_prompt
    if per == n:
        return finals
    kept = {}
    for i in range(len(finals) // per):
        group = [finals[i * per + j] for j in range(per)]
        group.sort(key=lambda o: -sum(s.logprob for s in o.logprobs))
        kept.update({i * n + k: o for k, o in enumerate(group[:n])})
    return kept


def _usage_for(finals: dict[int, RequestOutput], per_prompt: int) -> dict[str, Any]:
    # Each prompt is counted once even when n completions share it.
    prompt = sum(len(o.prompt_token_ids) for idx, o in finals.items() if idx % per_prompt == 0)
    completion = sum(len(o.token_ids) for o in finals.values())
    cached = sum(o.num_cached_tokens for idx, o in finals.items() if idx % per_prompt == 0)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def _finish_reason(out: RequestOutput, calls: list) -> str | None:
    return "tool_calls" if calls and out.finish_reason == "stop" else out.finish_reason


def _choice(idx: int, out: RequestOutput, call: Call, tokenizer) -> dict[str, Any]:
    asked_logprobs = call.req.logprobs is not None and call.req.logprobs is not False
    tokens = out.logprobs
    if call.echo_logprobs:
        tokens = call.echo_logprobs[idx // call.req.n] + tokens
    lp = logprobs_json(tokens, call.chat, tokenizer) if tokens and asked_logprobs else None
    if call.chat:
        answer = tools.parse_answer(call.req, out.text)
        message: dict[str, Any] = {"role": "assistant", "content": answer.content}
        if answer.tool_calls:
            message["tool_calls"] = answer.tool_calls
        return {
            "index": idx,
            "message": message,
            "logprobs": lp,
            "finish_reason": _finish_reason(out, answer.tool_calls),
        }
    text = out.text
    if call.echo_texts:
        text = call.echo_texts[idx // call.req.n] + text
    return {"index": idx, "text": text, "logprobs": lp, "finish_reason": out.finish_reason}


def logprobs_json(tokens, chat: bool, tokenizer, offset: int = 0) -> dict[str, Any]:
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
        "top_logprobs": [
            None if s.logprob is None else {text(t): lp for t, lp in s.top_logprobs} for s in tokens
        ],
        "text_offset": offsets,
    }


async def sse(fan: FanOut, call: Call, include_usage: bool, tokenizer):
    """Server-sent events. A chat answer that may hold tool calls is sent whole at its end (its
    text decides whether it is content or calls)."""
    created = int(time.time())
    chat, req = call.chat, call.req
    obj = "chat.completion.chunk" if chat else "text_completion"
    held = chat and tools.uses_tools(req)
    named = tools.named_call_prefix(req) if chat else None
    streams: dict[int, _ArgumentStream] = {}
    finals: dict[int, RequestOutput] = {}
    lp_offset: dict[int, int] = {}

    def chunk(choices: list[dict], usage: dict | None = None) -> str:
        body = {
            "id": call.rid,
            "object": obj,
            "created": created,
            "model": req.model or "default",
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": choices,
        }
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
            if out.finished:
                finals[idx] = out
            if named is not None:
                delta = streams.setdefault(idx, _ArgumentStream(*named)).feed(out)
                if delta is not None:
                    yield chunk([{"index": idx, "logprobs": None, **delta}])
                continue
            if held:
                if out.finished:
                    yield chunk([_held_answer(idx, out, req)])
                continue
            new_lp = out.delta_logprobs
            if not out.delta_text and not out.finished and not new_lp:
                continue
            lp = None
            if new_lp:
                lp = logprobs_json(new_lp, chat, tokenizer, lp_offset.get(idx, 0))
                if not chat:
                    lp_offset[idx] = lp["text_offset"][-1] + len(lp["tokens"][-1])
            reason = out.finish_reason if out.finished else None
            if chat:
                delta = {"content": out.delta_text} if out.delta_text else {}
                choice = {"index": idx, "delta": delta, "logprobs": lp, "finish_reason": reason}
            else:
                choice = {"index": idx, "text": out.delta_text, "logprobs": lp}
                choice["finish_reason"] = reason
            yield chunk([choice])
        if include_usage:
            yield chunk([], _usage_for(finals, call.per_prompt))
    except Exception as e:  # headers are sent: report the failure in the stream (OpenAI style)
        err = api_error_for(e)
        yield f"data: {json.dumps(error_body(err.message, err.param, err.kind, err.code))}\n\n"
    finally:
        fan.close()
    yield "data: [DONE]\n\n"


def _held_answer(idx: int, out: RequestOutput, req) -> dict[str, Any]:
    """The one delta of a held chat answer: its content or its tool calls (OpenAI's shape,
    each call with its index, id, type, name and whole arguments)."""
    answer = tools.parse_answer(req, out.text)
    delta: dict[str, Any] = {}
    if answer.content:
        delta["content"] = answer.content
    if answer.tool_calls:
        delta["tool_calls"] = [{"index": k, **c} for k, c in enumerate(answer.tool_calls)]
    reason = _finish_reason(out, answer.tool_calls)
    return {"index": idx, "delta": delta, "logprobs": None, "finish_reason": reason}


class _ArgumentStream:
    """A forced call of one named function, streamed as OpenAI does: a first delta with the
    call's id, type, name and empty arguments, then argument fragments as they are generated
    (the last character held back: it may be the answer's closing brace)."""

    def __init__(self, name: str, prefix: str):
        self.name, self.prefix = name, prefix
        self.call_id = f"call_{uuid.uuid4().hex[:24]}"
        self.started = False
        self.sent = 0

    def feed(self, out: RequestOutput) -> dict[str, Any] | None:
        text = out.text
        calls: list[dict[str, Any]] = []
        if not self.started and text.startswith(self.prefix):
            self.started = True
            function = {"name": self.name, "arguments": ""}
            calls.append({"index": 0, "id": self.call_id, "type": "function", "function": function})
        if self.started:
            arguments = text[len(self.prefix) :]
            end = len(arguments) - 1 if not out.finished or arguments.endswith("}") else None
            end = len(arguments) if end is None else end
            if end > self.sent:
                calls.append({"index": 0, "function": {"arguments": arguments[self.sent : end]}})
                self.sent = end
        reason = None
        if out.finished:
            reason = (
                "tool_calls" if self.started and out.finish_reason == "stop" else out.finish_reason
            )
        if not calls and reason is None:
            return None
        delta: dict[str, Any] = {"tool_calls": calls} if calls else {}
        if not self.started and out.finished:
            delta = {"content": text}
        return {"delta": delta, "finish_reason": reason}
