"""Structured outputs against a real `miaotui serve` (the `api_server` fixture, the default
SmolLM2-135M) with the official `openai` client. The independent references: pydantic (the
SDK's `.parse()`), `jsonschema` for 20 varied schemas, Python's `re` for regexes, the choice list
itself. Requests run concurrently, so the constrained rows share batches (continuous batching,
n > 1, streaming)."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from enum import Enum
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

MODEL = "smollm2-135m"


@pytest.fixture(scope="module")
def client(api_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=api_server + "/v1", api_key="none", max_retries=0, timeout=180)


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


class City(BaseModel):
    name: str = Field(max_length=24)
    country: str = Field(max_length=24)
    population_millions: float = Field(ge=0, le=50)
    kind: Literal["capital", "port", "village"]


def test_parse_with_a_pydantic_model(client):
    r = client.chat.completions.parse(
        model=MODEL,
        messages=ask("Describe Paris as JSON."),
        response_format=City,
        max_tokens=80,
        temperature=0,
    )
    message = r.choices[0].message
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(message.parsed, City)
    assert City.model_validate_json(message.content) == message.parsed


class Color(str, Enum):
    RED = "red"
    BLUE = "blue"


class Pet(BaseModel):
    name: str = Field(max_length=12)
    color: Color


class Owner(BaseModel):
    name: str = Field(max_length=16)
    pets: list[Pet] = Field(max_length=3)
    favourite: Pet | None


def test_parse_with_nested_models_and_refs(client):
    """Nested models, an enum and an optional become $defs / $ref / anyOf in the SDK's strict
    schema; the answer still parses into the model."""
    r = client.chat.completions.parse(
        model=MODEL,
        messages=ask("Describe Ann and her two cats as JSON."),
        response_format=Owner,
        max_tokens=120,
        temperature=0.8,
        seed=4,
    )
    message = r.choices[0].message
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(message.parsed, Owner)
    assert Owner.model_validate_json(message.content) == message.parsed


def _obj(properties: dict, **extra) -> dict:
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
        **extra,
    }


WORD = {"type": "string", "maxLength": 12}
INT = {"type": "integer", "minimum": -99, "maximum": 99}  # unbounded, a small model rambles
NUM = {"type": "number", "minimum": -1000, "maximum": 1000}
SCHEMAS = [
    _obj({"name": WORD}),
    _obj({"age": {"type": "integer", "minimum": 0, "maximum": 120}}),
    _obj({"ok": {"type": "boolean"}}),
    _obj({"color": {"enum": ["red", "green", "blue"]}}),
    _obj({"score": {"type": "number", "minimum": -1, "maximum": 1}}),
    _obj({"tags": {"type": "array", "items": WORD, "minItems": 1, "maxItems": 3}}),
    _obj({"point": _obj({"x": INT, "y": INT})}),
    _obj({"user": _obj({"name": WORD, "admin": {"type": "boolean"}})}),
    _obj({"level": {"type": "integer", "enum": [1, 2, 3]}}),
    _obj({"id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"}}),
    _obj({"n": {"type": "integer", "exclusiveMinimum": 10, "maximum": 20}}),
    _obj(
        {
            "xs": {
                "type": "array",
                "items": {"type": "integer", "minimum": 0, "maximum": 9},
                "maxItems": 4,
            }
        }
    ),
    _obj({"maybe": {"anyOf": [{"type": "null"}, INT]}}),
    _obj({"kind": {"const": "event"}, "when": WORD}),
    _obj({"a": NUM, "b": NUM}),
    {"type": "array", "items": _obj({"k": WORD}), "minItems": 1, "maxItems": 2},
    _obj({"rows": {"type": "array", "items": _obj({"v": INT}), "maxItems": 2}}),
    _obj({"deep": _obj({"deeper": _obj({"deepest": {"type": "boolean"}})})}),
    _obj({"name": WORD, "email": {"type": "string", "format": "email", "maxLength": 30}}),
    {"type": "integer", "minimum": 1000, "maximum": 9999},
]


def test_twenty_json_schemas_validate(client):
    def run(i_schema):
        i, schema = i_schema
        return client.chat.completions.create(
            model=MODEL,
            messages=ask(f"Answer with JSON. Item {i}."),
            response_format={
                "type": "json_schema",
                "json_schema": {"name": f"s{i}", "schema": schema, "strict": True},
            },
            max_tokens=100,
            temperature=0.7,
            seed=i,
        )

    with ThreadPoolExecutor(len(SCHEMAS)) as pool:
        results = list(pool.map(run, enumerate(SCHEMAS)))
    for schema, r in zip(SCHEMAS, results):
        choice = r.choices[0]
        assert choice.finish_reason == "stop", (schema, choice.message.content)
        jsonschema.validate(json.loads(choice.message.content), schema)


def test_json_object_on_both_endpoints_streamed_and_n2(client):
    fmt = {"type": "json_object"}
    r = client.chat.completions.create(
        model=MODEL,
        messages=ask('Give a JSON object with a "name" key for a cat.'),
        response_format=fmt,
        max_tokens=100,
        n=2,
        temperature=0,
    )
    for choice in r.choices:
        assert choice.finish_reason == "stop", choice.message.content
        assert isinstance(json.loads(choice.message.content), dict)
    schema = _obj({"answer": {"enum": ["yes", "no"]}})
    texts = {0: "", 1: ""}
    for chunk in client.completions.create(
        model=MODEL,
        prompt="Is the sky blue? JSON:",
        max_tokens=30,
        n=2,
        stream=True,
        temperature=1.0,
        extra_body={"guided_json": schema},
    ):
        for c in chunk.choices:
            texts[c.index] += c.text
    for text in texts.values():
        jsonschema.validate(json.loads(text), schema)


def test_regex_choice_and_grammar(client):
    regex = r"[0-9]{3}-[a-z]{2,5}"
    grammar = 'start: "The answer is " NUMBER "."\nNUMBER: /[1-9][0-9]?/'
    bodies = [
        ({"guided_regex": regex}, lambda t: re.fullmatch(regex, t)),
        ({"guided_choice": ["alpha", "beta", "gamma"]}, lambda t: t in ("alpha", "beta", "gamma")),
        ({"guided_grammar": grammar}, lambda t: re.fullmatch(r"The answer is [1-9][0-9]?\.", t)),
    ]
    for extra, ok in bodies:
        for temperature in (0.0, 1.0):
            r = client.completions.create(
                model=MODEL,
                prompt="Write something:",
                max_tokens=20,
                temperature=temperature,
                seed=1,
                extra_body=extra,
            )
            text = r.choices[0].text
            assert r.choices[0].finish_reason == "stop" and ok(text), (extra, text)


BAD_CONSTRAINTS = [
    (
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "objekt"}},
            }
        },
        "response_format",
        "objekt",
    ),
    ({"response_format": {"type": "yaml"}}, "response_format", "yaml"),
    ({"guided_regex": "[a-"}, "guided_regex", "regex"),
    ({"guided_grammar": "start: undefined_rule"}, "guided_grammar", "undefined_rule"),
    ({"guided_choice": []}, "guided_choice", "choice"),
    ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice", "at most one"),
    ({"guided_json": {"type": "integer", "minimum": 5, "maximum": 1}}, "guided_json", "minimum"),
]


@pytest.mark.parametrize(
    ("extra", "param", "named"),
    BAD_CONSTRAINTS,
    ids=[b[1] + str(i) for i, b in enumerate(BAD_CONSTRAINTS)],
)
def test_bad_constraint_is_400_before_generation(api_server, extra, param, named):
    before = _generated(api_server)
    body = {"messages": ask("hi"), "max_tokens": 5, **extra}
    r = httpx.post(api_server + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and named in err["message"], err
    assert _generated(api_server) == before  # nothing ran


def _generated(url: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("miaotui_generation_tokens_total"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no generation counter")
