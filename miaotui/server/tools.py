"""Tool calling on /v1/chat/completions: the prompt that shows the tools to the model, the
constraint that makes a forced call valid, and the parse of the model's text into OpenAI
`tool_calls`.

Prompt: a chat template that reads `tools` renders them itself (with the history's `tool_calls`
and `tool` messages as transformers passes them). Otherwise the default prompt below is added to
the system message, and past calls are written back the way it asks for them:
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (the Hermes format).

tool_choice: "none" shows no tools; "auto" lets the model answer in text or with tagged calls,
which are parsed out; "required" and a named function constrain the whole answer to JSON calls
whose arguments match the function's parameters schema (an array of calls when
parallel_tool_calls, otherwise one), so the calls always parse and validate.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from miaotui.sampling_params import StructuredOutput
from miaotui.server.protocol import ChatCompletionRequest, ChatMessage, NamedToolChoice

DEFAULT_TOOL_PROMPT = (
    "You can call functions. To call one, answer with\n"
    '<tool_call>{{"name": <function name>, "arguments": <arguments as a JSON object>}}</tool_call>\n'
    "(one such line per call) and nothing else. The functions, as JSON schemas:\n{tools}"
)
MAX_PARALLEL_CALLS = 8
_TAGGED_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


@dataclass(frozen=True)
class ParsedAnswer:
    content: str | None
    tool_calls: list[dict[str, Any]]
    """OpenAI tool calls: {"id", "type": "function", "function": {"name", "arguments"}}."""


def uses_tools(req: ChatCompletionRequest) -> bool:
    return bool(req.tools) and req.tool_choice != "none"


def template_messages(req: ChatCompletionRequest, template: str | None) -> tuple[list, dict]:
    """The messages to render and the extra template variables (`tools` when the template
    renders them itself)."""
    native = template is not None and "tools" in template
    messages = [_message(m, native) for m in req.messages]
    if not uses_tools(req):
        return messages, {}
    tools = [t.model_dump(exclude_none=True) for t in req.tools or ()]
    if native:
        return messages, {"tools": tools}
    prompt = DEFAULT_TOOL_PROMPT.format(tools="\n".join(json.dumps(t["function"]) for t in tools))
    if messages and messages[0]["role"] in ("system", "developer"):
        messages[0] = {**messages[0], "content": messages[0]["content"] + "\n\n" + prompt}
    else:
        messages.insert(0, {"role": "system", "content": prompt})
    return messages, {}


def _message(m: ChatMessage, native: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"role": m.role, "content": m.text()}
    if m.tool_calls:
        calls = [
            {"name": c.function.name, "arguments": _arguments(c.function.arguments)}
            for c in m.tool_calls
        ]
        if native:
            out["tool_calls"] = [{"type": "function", "function": c} for c in calls]
        else:
            out["content"] += "".join(f"<tool_call>{json.dumps(c)}</tool_call>" for c in calls)
    if m.role == "tool" and native:
        out["tool_call_id"] = m.tool_call_id
    return out


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def forced_call_constraint(req: ChatCompletionRequest) -> StructuredOutput | None:
    """With tool_choice "required" or a named function: the JSON schema of the answer."""
    choice = req.tool_choice
    if not uses_tools(req) or choice in (None, "auto"):
        return None
    if isinstance(choice, NamedToolChoice):
        tool = next(t for t in req.tools or () if t.function.name == choice.function["name"])
        return StructuredOutput(json_schema=json.dumps(_call_schema(tool)))
    one = {"anyOf": [_call_schema(t) for t in req.tools or ()]}
    if not req.parallel_tool_calls:
        return StructuredOutput(json_schema=json.dumps(one))
    calls = {"type": "array", "items": one, "minItems": 1, "maxItems": MAX_PARALLEL_CALLS}
    return StructuredOutput(json_schema=json.dumps(calls))


def named_call_prefix(req: ChatCompletionRequest) -> tuple[str, str] | None:
    """With a named function: (its name, the fixed start of every answer). The constrained
    answer is compact JSON with its keys in schema order, `{"name":"f","arguments":{...}}`, so
    the arguments are the text between this prefix and the last `}` and can be streamed."""
    choice = req.tool_choice
    if not uses_tools(req) or not isinstance(choice, NamedToolChoice):
        return None
    name = choice.function["name"]
    return name, '{"name":' + json.dumps(name) + ',"arguments":'


def _call_schema(tool) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "name": {"const": tool.function.name},
            "arguments": tool.function.parameters,
        },
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def parse_answer(req: ChatCompletionRequest, text: str) -> ParsedAnswer:
    """The model's text -> content and tool calls. A forced answer is JSON by construction (a
    truncated one stays text); an "auto" answer's tagged calls with a known name are calls."""
    if not uses_tools(req):
        return ParsedAnswer(text, [])
    names = {t.function.name for t in req.tools or ()}
    named = named_call_prefix(req)
    if named is not None and text.startswith(named[1]) and text.endswith("}"):
        # The arguments exactly as generated (what a stream of them adds up to).
        call = _openai_call({"name": named[0], "arguments": text[len(named[1]) : -1]})
        return ParsedAnswer(None, [call])
    if forced_call_constraint(req) is not None:
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return ParsedAnswer(text, [])  # cut short by max_tokens (finish_reason "length")
        calls = value if isinstance(value, list) else [value]
        return ParsedAnswer(None, [_openai_call(c) for c in calls])
    calls, rest = [], text
    for match in _TAGGED_CALL.finditer(text):
        try:
            call = json.loads(match.group(1))
        except json.JSONDecodeError:
            continue
        if isinstance(call, dict) and call.get("name") in names:
            calls.append(_openai_call(call))
            rest = rest.replace(match.group(0), "")
    if not calls:
        return ParsedAnswer(text, [])
    return ParsedAnswer(rest.strip() or None, calls)


def _openai_call(call: dict[str, Any]) -> dict[str, Any]:
    arguments = call.get("arguments", {})
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {
            "name": call["name"],
            "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments),
        },
    }
