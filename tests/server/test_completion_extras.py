"""echo (with prompt logprobs and max_tokens 0, what lm-eval's local-completions model reads for
log-likelihoods), best_of and logit_bias on /v1/completions, against a real `miaotui serve` on
the tiny model with float weights (the `tiny_api_server` fixture). The reference is the tiny
model's transformers twin: its log-softmax over the prompt, its greedy choice under a bias."""

from __future__ import annotations

import httpx
import numpy as np
import openai
import pytest
import torch

from tests.helpers import tiny_chat_hf_model

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

PROMPT = "The cat sat on the mat because"


@pytest.fixture(scope="module")
def client(tiny_api_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=tiny_api_server + "/v1", api_key="none", max_retries=0)


@pytest.fixture(scope="module")
def hf():
    return tiny_chat_hf_model()


def log_softmax(hf, ids: list[int]) -> np.ndarray:
    """(T, V) float64 log-probabilities of the next token after each prefix (transformers)."""
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, -1).numpy()


def tokenize(url: str, text: str) -> list[int]:
    return httpx.post(url + "/tokenize", json={"prompt": text}).json()["tokens"]


def detokenize(url: str, ids: list[int]) -> str:
    return httpx.post(url + "/detokenize", json={"tokens": ids}).json()["prompt"]


def test_echo_prompt_logprobs_equal_the_reference(tiny_api_server, client, hf):
    ids = tokenize(tiny_api_server, PROMPT)
    r = client.completions.create(model="default", prompt=ids, max_tokens=0, echo=True, logprobs=2)
    choice = r.choices[0]
    lp = choice.logprobs
    ref = log_softmax(hf, ids)
    assert r.usage.completion_tokens == 0 and len(lp.tokens) == len(ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    want = [ref[i - 1, ids[i]] for i in range(1, len(ids))]
    np.testing.assert_allclose(lp.token_logprobs[1:], want, atol=1e-4)
    for i in range(1, len(ids)):
        best = sorted(lp.top_logprobs[i].values(), reverse=True)
        np.testing.assert_allclose(best, np.sort(ref[i - 1])[::-1][:2], atol=1e-4)
    assert choice.text == detokenize(tiny_api_server, ids)


def test_echo_with_generated_tokens(client):
    plain = client.completions.create(
        model="default",
        prompt=PROMPT,
        max_tokens=3,
        temperature=0,
        logprobs=1,
        extra_body={"ignore_eos": True},
    )
    echoed = client.completions.create(
        model="default",
        prompt=PROMPT,
        max_tokens=3,
        temperature=0,
        logprobs=1,
        echo=True,
        extra_body={"ignore_eos": True},
    )
    n = echoed.usage.prompt_tokens
    text, lp = echoed.choices[0].text, echoed.choices[0].logprobs
    assert text == PROMPT + plain.choices[0].text
    assert lp.tokens[n:] == plain.choices[0].logprobs.tokens
    np.testing.assert_allclose(
        lp.token_logprobs[n:], plain.choices[0].logprobs.token_logprobs, atol=1e-4
    )
    assert len(lp.tokens) == n + 3


def test_best_of_returns_the_most_likely(client):
    kw = dict(model="default", prompt=PROMPT, max_tokens=4, temperature=1.0, seed=11)
    kw["extra_body"] = {"ignore_eos": True}
    all_three = client.completions.create(**kw, n=3, logprobs=0)
    scores = [sum(c.logprobs.token_logprobs) for c in all_three.choices]
    best = client.completions.create(**kw, best_of=3)
    assert len(best.choices) == 1 and best.choices[0].logprobs is None
    assert best.choices[0].text == all_three.choices[int(np.argmax(scores))].text
    assert best.usage.completion_tokens == 12  # all three were generated
    two = client.completions.create(**kw, best_of=3, n=2)
    ranked = [all_three.choices[i].text for i in np.argsort(scores)[::-1][:2]]
    assert [c.text for c in two.choices] == ranked


def test_logit_bias_moves_the_greedy_choice(tiny_api_server, client, hf):
    ids = tokenize(tiny_api_server, PROMPT)
    ref = log_softmax(hf, ids)[-1]
    top, tenth = int(np.argmax(ref)), int(np.argsort(ref)[-10])
    kw = dict(model="default", prompt=ids, max_tokens=1, temperature=0)
    assert client.completions.create(**kw).choices[0].logprobs is None
    plain = client.completions.create(**kw, logprobs=0).choices[0].logprobs
    assert plain.token_logprobs[0] == pytest.approx(ref[top], abs=1e-4)
    pushed = client.completions.create(**kw, logprobs=0, logit_bias={str(tenth): 50})
    banned = client.completions.create(**kw, logprobs=0, logit_bias={str(top): -100})
    second = int(np.argsort(ref)[-2])
    assert pushed.choices[0].logprobs.tokens == [detokenize(tiny_api_server, [tenth])]
    assert banned.choices[0].logprobs.tokens == [detokenize(tiny_api_server, [second])]
