"""Tool calling against a real `miaotui serve` (the `api_server` fixture) with the official
`openai` client: forced calls (`required`, a named function) parse and validate against their
function's schema with `jsonschema`, streamed (accumulated by the SDK's own stream state) and
not; parallel calls; `none`; tool results in the history; bad tool requests are 400."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

MODEL = "smollm2-135m"
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {
        "timezone": {"type": "string", "pattern": "^[A-Z][a-z]{2,12}/[A-Z][a-z]{2,12}$"}
    },
    "required": ["timezone"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather now", "parameters": WEATHER},
    },
    {
        "type": "function",
        "function": {"name": "get_time", "description": "Local time", "parameters": TIME},
    },
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
QUESTION = [{"role": "user", "content": "What is the weather in Paris, and the time there?"}]


@pytest.fixture(scope="module")
def client(api_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=api_server + "/v1", api_key="none", max_retries=0, timeout=180)


def assert_valid_calls(calls, names: set[str]) -> None:
    assert calls, "no tool call"
    assert len({c.id for c in calls}) == len(calls)
    for call in calls:
        assert call.type == "function" and call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("parallel", [True, False])
def test_required_calls_validate(client, parallel):
    r = client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=parallel,
        max_tokens=120,
        temperature=0,
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert_valid_calls(choice.message.tool_calls, set(SCHEMAS))
    if not parallel:
        assert len(choice.message.tool_calls) == 1


def test_named_function_is_called_streamed_and_not(client):
    kw = dict(
        model=MODEL,
        messages=QUESTION,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        max_tokens=60,
        temperature=0.8,
        seed=5,
    )
    whole = client.chat.completions.create(**kw)
    assert whole.choices[0].finish_reason == "tool_calls"
    assert_valid_calls(whole.choices[0].message.tool_calls, {"get_time"})
    assert len(whole.choices[0].message.tool_calls) == 1

    state, fragments = ChatCompletionStreamState(), []
    for chunk in client.chat.completions.create(**kw, stream=True):
        state.handle_chunk(chunk)
        for call in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            fragments.append(call.function.arguments)
    assert fragments[0] == "" and len([f for f in fragments if f]) >= 3  # streamed as it comes
    streamed = state.get_final_completion().choices[0]
    assert streamed.finish_reason == "tool_calls"
    assert_valid_calls(streamed.message.tool_calls, {"get_time"})
    same = [(c.function.name, c.function.arguments) for c in streamed.message.tool_calls]
    assert same == [
        (c.function.name, c.function.arguments) for c in whole.choices[0].message.tool_calls
    ]


def test_tool_choice_none_and_results_in_history(client):
    r = client.chat.completions.create(
        model=MODEL, messages=QUESTION, tools=TOOLS, tool_choice="none", max_tokens=8
    )
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content
    first = client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        tools=TOOLS,
        tool_choice="required",
        max_tokens=120,
        temperature=0,
    )
    call = first.choices[0].message.tool_calls[0]
    history = [
        *QUESTION,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "22 degrees, sunny"},
    ]
    follow = client.chat.completions.create(
        model=MODEL, messages=history, tools=TOOLS, max_tokens=20, temperature=0
    )
    # The history reached the model: its prompt holds the call and the result.
    assert follow.usage.prompt_tokens > first.usage.prompt_tokens + 10
    assert follow.choices[0].finish_reason in ("stop", "length", "tool_calls")


BAD_TOOL_REQUESTS = [
    ({"tool_choice": "required"}, "tool_choice"),  # no tools
    (
        {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        "tool_choice",
    ),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name"),
    ({"tools": [{"type": "retrieval"}]}, "tools.0.type"),
    (
        {
            "tools": [
                {"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}
            ],
            "tool_choice": "required",
        },
        "tools",
    ),
    (
        {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
        "tool_choice",
    ),
]


@pytest.mark.parametrize(
    ("extra", "param"), BAD_TOOL_REQUESTS, ids=[str(i) for i in range(len(BAD_TOOL_REQUESTS))]
)
def test_bad_tool_requests_are_400(api_server, extra, param):
    body = {"messages": QUESTION, "max_tokens": 5, **extra}
    r = httpx.post(api_server + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text


TOOL_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nTools:\n{% for t in tools %}{{ t | tojson }}\n"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>{{ c.function | tojson }}"
    "</tool_call>{% endfor %}{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_a_template_that_reads_tools_renders_them_as_transformers_does():
    """With a chat template that reads `tools`, the prompt is the template's own rendering of
    the tools and of the history's calls: the same text transformers' apply_chat_template
    makes from the same template, tools and messages."""
    from dataclasses import replace

    from transformers import PreTrainedTokenizerFast

    from miaotui.server.calls import chat_prompt
    from miaotui.server.protocol import ChatCompletionRequest
    from miaotui.tokenizer import TextTokenizer
    from tests.helpers import byte_tokenizer

    base = byte_tokenizer()
    tok = TextTokenizer(base.tok, replace(base.info, chat_template=TOOL_TEMPLATE))
    args = {"city": "Paris", "unit": "celsius"}
    history = [
        *QUESTION,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": json.dumps(args)},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "22 C"},
    ]
    req = ChatCompletionRequest(messages=history, tools=TOOLS)
    hf = PreTrainedTokenizerFast(tokenizer_object=base.tok, chat_template=TOOL_TEMPLATE)
    hf_history = [
        {
            **m,
            "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": args}}
            ],
        }
        if m.get("tool_calls")
        else {**m, "content": m["content"] or ""}
        for m in history
    ]
    want = hf.apply_chat_template(
        hf_history, tools=TOOLS, tokenize=False, add_generation_prompt=True
    )
    got = chat_prompt(tok, req)
    assert got == want
    assert "get_time" in got and '"arguments": {"city": "Paris"' in got
