"""The endpoints beyond chat and completions, each against an independent reference:
Anthropic's /v1/messages through the official `anthropic` client against our OpenAI chat route
on the same messages (greedy, so the same text); /v1/embeddings against transformers' hidden
states of the tiny model's twin, mean-pooled and normalized here; /tokenize and /detokenize
against the token counts the completion routes report."""

from __future__ import annotations

import base64

import anthropic
import httpx
import jsonschema
import numpy as np
import openai
import pytest
import torch

from tests.helpers import tiny_chat_hf_model

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

MODEL = "smollm2-135m"
MESSAGES = [{"role": "user", "content": "Name three colors."}]
GREEDY = {"temperature": 0}  # this anthropic client has no temperature argument any more


@pytest.fixture(scope="module")
def oai(api_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=api_server + "/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def claude(api_server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=api_server, api_key="none", max_retries=0, timeout=120)


# ---- Anthropic Messages -----------------------------------------------------------------------


def test_messages_create_equals_chat_completion(oai, claude):
    system = "You are terse."
    ref = oai.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": system}, *MESSAGES],
        max_tokens=12,
        temperature=0,
    )
    msg = claude.messages.create(
        model=MODEL, system=system, messages=MESSAGES, max_tokens=12, extra_body=GREEDY
    )
    assert msg.type == "message" and msg.role == "assistant" and msg.model == MODEL
    assert [b.type for b in msg.content] == ["text"]
    assert msg.content[0].text == ref.choices[0].message.content
    want = {"length": "max_tokens", "stop": "end_turn"}[ref.choices[0].finish_reason]
    assert msg.stop_reason == want
    assert msg.usage.input_tokens == ref.usage.prompt_tokens
    assert msg.usage.output_tokens == ref.usage.completion_tokens
    count = claude.messages.count_tokens(model=MODEL, system=system, messages=MESSAGES)
    assert count.input_tokens == ref.usage.prompt_tokens


def test_messages_stream_equals_create(claude):
    kw = dict(model=MODEL, messages=MESSAGES, max_tokens=10, extra_body=GREEDY)
    whole = claude.messages.create(**kw)
    with claude.messages.stream(**kw) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == whole.content[0].text == final.content[0].text
    assert final.stop_reason == whole.stop_reason
    assert final.usage.output_tokens == whole.usage.output_tokens


def test_messages_stop_sequence(oai, claude):
    full = claude.messages.create(model=MODEL, messages=MESSAGES, max_tokens=16, extra_body=GREEDY)
    text = full.content[0].text
    stop = next(text[i : i + 2] for i in range(1, len(text) - 2) if text.find(text[i : i + 2]) == i)
    msg = claude.messages.create(
        model=MODEL, messages=MESSAGES, max_tokens=16, extra_body=GREEDY, stop_sequences=[stop]
    )
    assert msg.content[0].text == text[: text.find(stop)]
    assert (msg.stop_reason, msg.stop_sequence) == ("stop_sequence", stop)


def test_messages_forced_tool_use(claude):
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20}, "days": {"enum": [1, 2, 3]}},
        "required": ["city", "days"],
        "additionalProperties": False,
    }
    tools = [{"name": "forecast", "description": "Weather forecast", "input_schema": schema}]
    kw = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "Forecast for Rome?"}],
        tools=tools,
        tool_choice={"type": "tool", "name": "forecast"},
        max_tokens=60,
        extra_body=GREEDY,
    )
    msg = claude.messages.create(**kw)
    assert msg.stop_reason == "tool_use"
    (use,) = [b for b in msg.content if b.type == "tool_use"]
    assert use.name == "forecast" and use.id.startswith("toolu_")
    jsonschema.validate(use.input, schema)
    with claude.messages.stream(**kw) as stream:
        final = stream.get_final_message()
    (streamed,) = [b for b in final.content if b.type == "tool_use"]
    assert streamed.input == use.input and final.stop_reason == "tool_use"
    # The result goes back in the history as a tool_result block.
    history = kw["messages"] + [
        {"role": "assistant", "content": [use.model_dump()]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sun"}],
        },
    ]
    follow = claude.messages.create(model=MODEL, messages=history, tools=tools, max_tokens=5)
    assert follow.usage.input_tokens > msg.usage.input_tokens


def test_messages_errors_in_anthropic_shape(api_server, claude):
    with pytest.raises(anthropic.NotFoundError):
        claude.messages.create(model="claude-x", messages=MESSAGES, max_tokens=5)
    with pytest.raises(anthropic.BadRequestError) as e:
        claude.messages.create(model=MODEL, messages=MESSAGES, max_tokens=0)
    assert e.value.body["type"] == "error"
    assert e.value.body["error"]["type"] == "invalid_request_error"
    r = httpx.post(api_server + "/v1/messages", json={"model": MODEL, "messages": MESSAGES})
    assert r.status_code == 400 and "max_tokens" in r.json()["error"]["message"]
    image = [{"role": "user", "content": [{"type": "image", "source": {"data": "x"}}]}]
    with pytest.raises(anthropic.BadRequestError, match="block type 'image'"):
        claude.messages.create(model=MODEL, messages=image, max_tokens=5)


# ---- tokenize / detokenize --------------------------------------------------------------------


def test_tokenize_detokenize(api_server, oai):
    text = "The quick brown fox, 1234 times."
    r = httpx.post(api_server + "/tokenize", json={"prompt": text}).json()
    usage = oai.completions.create(model=MODEL, prompt=text, max_tokens=1).usage
    assert r["count"] == len(r["tokens"]) == usage.prompt_tokens
    back = httpx.post(api_server + "/detokenize", json={"tokens": r["tokens"]}).json()
    assert back["prompt"] == text
    info = httpx.get(api_server + "/tokenizer_info").json()  # what lm-eval's remote tokenizer reads
    eos = httpx.post(api_server + "/tokenize", json={"prompt": info["eos_token"]}).json()
    assert eos["count"] == 1 and ref_stop(oai) == eos["tokens"][0]
    assert info["model_max_length"] == 512 and "<|im_start|>" in info["chat_template"]
    chat = httpx.post(api_server + "/tokenize", json={"messages": MESSAGES}).json()
    ref = oai.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1)
    assert chat["count"] == ref.usage.prompt_tokens
    for path, body, param in [
        ("/tokenize", {}, "prompt"),
        ("/detokenize", {"tokens": [1, 10**8]}, "tokens"),
        ("/detokenize", {"tokens": [1.0]}, "tokens.0"),
        ("/tokenize", {"prompt": "x", "model": "nope"}, "model"),
    ]:
        bad = httpx.post(api_server + path, json=body)
        assert bad.status_code in (400, 404) and bad.json()["error"]["param"] == param, bad.text


def ref_stop(oai) -> int:
    """The token a chat answer that ends by itself ends with (its last logprob's token id)."""
    r = oai.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=64, temperature=0, logprobs=True
    )
    assert r.choices[0].finish_reason == "stop"
    ids = httpx.post(
        str(oai.base_url).removesuffix("/v1/") + "/tokenize",
        json={"prompt": r.choices[0].logprobs.content[-1].token, "add_special_tokens": False},
    ).json()["tokens"]
    return ids[-1]


# ---- embeddings -------------------------------------------------------------------------------


def reference_embeddings(hf, ids: list[int]) -> np.ndarray:
    """transformers' final hidden state (after the last norm), mean-pooled and normalized."""
    with torch.no_grad():
        hidden = hf.model(torch.tensor([ids])).last_hidden_state[0].double().numpy()
    pooled = hidden.mean(0)
    return pooled / np.linalg.norm(pooled)


def test_embeddings_equal_the_float_reference(tiny_api_server):
    client = openai.OpenAI(base_url=tiny_api_server + "/v1", api_key="none", max_retries=0)
    hf = tiny_chat_hf_model()
    texts = ["Hello world", "A longer sentence about embeddings and pooling.", "x"]
    tokens = [
        httpx.post(tiny_api_server + "/tokenize", json={"prompt": t}).json()["tokens"]
        for t in texts
    ]
    batch = client.embeddings.create(model="default", input=texts)
    assert [d.index for d in batch.data] == [0, 1, 2]
    assert batch.usage.prompt_tokens == sum(len(t) for t in tokens)
    for ids, d in zip(tokens, batch.data):
        np.testing.assert_allclose(d.embedding, reference_embeddings(hf, ids), atol=2e-5)
    # The same vector alone, in another batch, from token ids, and base64-encoded.
    alone = client.embeddings.create(model="default", input=texts[1]).data[0].embedding
    ids_batch = client.embeddings.create(model="default", input=[tokens[2], tokens[1]])
    np.testing.assert_allclose(alone, batch.data[1].embedding, atol=1e-6)
    np.testing.assert_allclose(ids_batch.data[1].embedding, batch.data[1].embedding, atol=1e-6)
    raw = httpx.post(
        tiny_api_server + "/v1/embeddings", json={"input": texts[0], "encoding_format": "base64"}
    ).json()["data"][0]["embedding"]
    decoded = np.frombuffer(base64.b64decode(raw), dtype="<f4")
    np.testing.assert_allclose(decoded, batch.data[0].embedding, atol=1e-6)


def test_embeddings_on_the_native_default_server(api_server, oai):
    """The native step gives only logits: the server embeds with a float build of the same
    checkpoint. Unit vectors, one per input, the same alone and batched."""
    r = oai.embeddings.create(model=MODEL, input=["red", "a red apple", "blue"])
    vectors = np.array([d.embedding for d in r.data])
    assert vectors.shape[0] == 3 and vectors.shape[1] > 100
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    alone = oai.embeddings.create(model=MODEL, input="a red apple").data[0].embedding
    np.testing.assert_allclose(alone, vectors[1], atol=1e-5)
    for body, param in [
        ({"input": []}, "input"),
        ({"input": ""}, "input"),
        ({"input": "x", "dimensions": 3}, "dimensions"),
        ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
        ({"input": "hello " * 600}, "input"),
    ]:
        bad = httpx.post(api_server + "/v1/embeddings", json=body)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == param, bad.text
