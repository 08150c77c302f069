"""OpenAI's exact error semantics and response fields, against a real `miaotui serve` (the
`api_server` fixture), with the official `openai` client (which maps statuses to exception
classes) and raw HTTP (which shows the exact bodies). The reference is OpenAI's documented
behaviour: unknown model 404 `model_not_found`; over-long prompts 400 `context_length_exceeded`
with "maximum context length" in the message (what litellm and LangChain match); `error.code` a
string or null; the served /openapi.json says 400 (not 422) and documents what it serves."""

from __future__ import annotations

import httpx
import jsonschema
import openai
import pytest

from tests.helpers import API_MAX_MODEL_LEN, API_ORIGIN

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

MODEL = "smollm2-135m"
USER = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def client(api_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=api_server + "/v1", api_key="none", max_retries=0, timeout=120)


def post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=120)


def test_unknown_model_is_404_model_not_found(api_server, client):
    for call in (
        lambda: client.completions.create(model="gpt-5", prompt="hi", max_tokens=1),
        lambda: client.chat.completions.create(model="gpt-5", messages=USER, max_tokens=1),
        lambda: client.models.retrieve("gpt-5"),
    ):
        with pytest.raises(openai.NotFoundError) as e:
            call()
        assert e.value.status_code == 404
        assert e.value.code == "model_not_found"
        assert e.value.body["param"] == "model"
        assert "`gpt-5` does not exist" in e.value.body["message"]


def test_context_length_exceeded(api_server, client):
    long_text = "hello " * (API_MAX_MODEL_LEN + 10)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=long_text, max_tokens=1)
    assert e.value.code == "context_length_exceeded"
    assert e.value.body["message"].startswith(
        f"This model's maximum context length is {API_MAX_MODEL_LEN} tokens. However, your "
        "prompt resulted in "
    )
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": long_text}], max_tokens=1
        )
    assert e.value.code == "context_length_exceeded" and e.value.body["param"] == "messages"
    # A prompt that fits, with a completion that does not.
    prompt_tokens = client.completions.create(model=MODEL, prompt="hello " * 100, max_tokens=1)
    n = prompt_tokens.usage.prompt_tokens
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="hello " * 100, max_tokens=API_MAX_MODEL_LEN)
    assert e.value.code == "context_length_exceeded" and e.value.body["param"] == "max_tokens"
    assert e.value.body["message"] == (
        f"This model's maximum context length is {API_MAX_MODEL_LEN} tokens. However, you "
        f"requested {n + API_MAX_MODEL_LEN} tokens ({n} in the prompt, {API_MAX_MODEL_LEN} for "
        "the completion). Please reduce the length of the prompt or max_tokens."
    )


# (route, body, the field error.param names)
INVALID = [
    ("completions", {"prompt": "hi", "stream_options": {"include_usage": True}}, "stream_options"),
    (
        "completions",
        {"prompt": "hi", "stream": False, "stream_options": {"include_usage": True}},
        "stream_options",
    ),
    ("chat/completions", {"messages": USER, "top_logprobs": 2}, "top_logprobs"),
    ("chat/completions", {"messages": USER, "logprobs": False, "top_logprobs": 1}, "top_logprobs"),
    ("completions", {"prompt": [True, False]}, "prompt"),
    ("completions", {"prompt": [1.0, 2.0]}, "prompt"),
    ("completions", {"prompt": [[1, 2], [3, 4.0]]}, "prompt"),
    ("chat/completions", {"messages": [{"role": "user"}]}, "messages.0.content"),
    ("chat/completions", {"messages": [{"role": "user", "content": None}]}, "messages.0.content"),
    (
        "chat/completions",
        {"messages": [*USER, {"role": "tool", "content": "22 C"}]},
        "messages.1.tool_call_id",
    ),
    ("completions", {"prompt": "hi", "temperature": 3}, "temperature"),
    ("completions", {"prompt": "hi", "suffix": "!"}, "suffix"),
]


@pytest.mark.parametrize(("route", "body", "param"), INVALID, ids=[p for _, _, p in INVALID])
def test_invalid_requests_are_400_with_a_string_or_null_code(api_server, route, body, param):
    r = post(api_server, "/v1/" + route, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["param"], err["type"], err["code"]) == (param, "invalid_request_error", None)
    assert err["message"].startswith(param + ": "), err


def test_integer_token_prompts_still_work(client):
    r = client.completions.create(model=MODEL, prompt=[1, 2, 3], max_tokens=2)
    assert r.usage.prompt_tokens == 3
    r = client.completions.create(model=MODEL, prompt=[[1, 2], [3]], max_tokens=2)
    assert [c.index for c in r.choices] == [0, 1]


def test_system_fingerprint_on_every_response(client):
    completion = client.completions.create(model=MODEL, prompt="hi", max_tokens=2)
    chat = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=2)
    stream = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=2, stream=True)
    fingerprints = {completion.system_fingerprint, chat.system_fingerprint}
    fingerprints |= {c.system_fingerprint for c in stream}
    assert len(fingerprints) == 1 and fingerprints.pop().startswith("fp_")


def test_openapi_document_matches_behaviour(api_server):
    doc = httpx.get(api_server + "/openapi.json").json()
    statuses = {
        (path, method): set(op["responses"])
        for path, ops in doc["paths"].items()
        for method, op in ops.items()
    }
    assert not [k for k, v in statuses.items() if "422" in v], statuses
    for route in ("/v1/completions", "/v1/chat/completions"):
        assert {"200", "400", "404", "429", "503"} <= statuses[(route, "post")]
    health = doc["paths"]["/health"]["get"]["responses"]
    assert set(health) == {"200", "503"} and "content" not in health["200"]
    metrics = doc["paths"]["/metrics"]["get"]["responses"]["200"]
    assert list(metrics["content"]) == ["text/plain"]
    # Behaviour against the document: a validation error and a 404 have the documented shape.
    schema = {**doc["components"]["schemas"]["ErrorResponse"], "components": doc["components"]}
    bad = post(api_server, "/v1/completions", {"prompt": "hi", "n": "two"})
    missing = post(api_server, "/v1/completions", {"prompt": "hi", "model": "nope"})
    assert (bad.status_code, missing.status_code) == (400, 404)
    for r in (bad, missing):
        jsonschema.validate(r.json(), schema)
    assert httpx.get(api_server + "/health").text == ""
    assert httpx.get(api_server + "/metrics").headers["content-type"].startswith("text/plain")


def test_cors_only_for_allowed_origins(api_server):
    preflight = {"Access-Control-Request-Method": "POST"}
    ok = httpx.options(api_server + "/v1/completions", headers={"Origin": API_ORIGIN, **preflight})
    assert ok.status_code == 200
    assert ok.headers["access-control-allow-origin"] == API_ORIGIN
    other = httpx.options(
        api_server + "/v1/completions", headers={"Origin": "http://evil.example", **preflight}
    )
    assert "access-control-allow-origin" not in other.headers
    r = httpx.get(api_server + "/v1/models", headers={"Origin": API_ORIGIN})
    assert r.headers["access-control-allow-origin"] == API_ORIGIN
