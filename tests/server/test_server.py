"""`miaotui serve` end to end over real HTTP, with the official `openai` client and httpx.

One server process per module (the default model, native weights, one thread: on a busy 2-core
machine two threads that wait for each other are many times slower), and one in-process `LLM`
on the same model as the independent reference. The queue-bound test uses a second app in this
process (uvicorn in a thread) around an AsyncEngine on the reference's model.

Native weights quantize activations to int8, which turns the ~1e-7 differences between computing
a prompt alone and packed with others (attention sums in another order) into visible ones: token
logprobs move by up to ~0.2 nats and two candidates' relative logit by up to ~0.3 (measured), so
greedy decoding can part at a near-tie. Comparisons of a request alone on both sides are exact;
comparisons across batch compositions (a burst, a prefix-cache hit) allow the two to part only
at a near-tie (see `assert_same_greedy`).
"""

from __future__ import annotations

import functools
import json
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import openai
import pytest

from miaotui.config import CacheConfig, EngineConfig
from miaotui.llm import LLM, GenerationResult
from miaotui.sampling_params import SamplingParams
from tests.helpers import engine_variant, miaotui_serve, serve_in_thread
from tests.helpers import prometheus_values as metrics

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

API_KEY = "sk-miaotui-test"
MODEL = "smollm2-135m"
MAX_MODEL_LEN = 256
NOISE = 0.6  # nats: see the module docstring


def nonce() -> str:
    """A unique prompt start: no prefix-cache hit on earlier prompts, on either side."""
    return f"[{uuid.uuid4().hex[:8]}]"


@dataclass
class Stack:
    url: str
    llm: LLM


@pytest.fixture(scope="module")
def stack(smollm_native, one_thread):
    args = ("--threads", "1", "--max-model-len", str(MAX_MODEL_LEN), "--api-key", API_KEY)
    with miaotui_serve(*args) as url:
        # The in-process reference: the session's native model, with a KV cache of its own.
        llm = engine_variant(
            smollm_native, max_model_len=MAX_MODEL_LEN, cache=CacheConfig(num_blocks=64)
        )
        yield Stack(url, llm)


@pytest.fixture(scope="module")
def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def post(url: str, path: str, body, timeout: float = 120, key: str | None = API_KEY):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, (str, bytes)):
        headers["Content-Type"] = "application/json"
        return httpx.post(url + path, content=body, headers=headers, timeout=timeout)
    return httpx.post(url + path, json=body, headers=headers, timeout=timeout)


def wait_idle(url: str, timeout: float = 30) -> dict[str, float]:
    """Poll /metrics until nothing runs or waits and every KV block is free."""
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(url)
        busy = (
            m["miaotui_kv_cache_usage_perc"],
            m["miaotui_num_requests_running"],
            m["miaotui_num_requests_waiting"],
        )
        if busy == (0, 0, 0):
            return m
        if time.monotonic() > deadline:
            raise AssertionError(f"not idle after {timeout}s: kv usage, running, waiting = {busy}")
        time.sleep(0.1)


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)


def token_texts(llm: LLM, ids: list[int]) -> list[str]:
    return [llm.tokenizer.decode([t], skip_special=False) for t in ids]


def assert_same_greedy(llm: LLM, got: dict, ref: GenerationResult, what: str) -> None:
    """A server completion's logprobs (`got`, requested with logprobs=5) against the
    reference's (run with logprobs=5): the same tokens with log-probabilities within NOISE, or
    the two part at a near-tie: each side's token is among the other's top 5, and the two tokens'
    relative logit moved by less than NOISE between the runs (ties can be 3-way)."""
    lps = ref.outputs[0].logprobs
    expected = token_texts(llm, [s.token_id for s in lps])
    for k, (g, r) in enumerate(zip(got["tokens"], expected)):
        context = f"{what}, token {k}: got {got['tokens']}, alone {expected}"
        if g == r:
            assert abs(got["token_logprobs"][k] - lps[k].logprob) < NOISE, context
            continue
        tops = lps[k].top_logprobs
        ref_top = dict(zip(token_texts(llm, [t for t, _ in tops]), [lp for _, lp in tops]))
        srv_top = got["top_logprobs"][k]
        assert g in ref_top and r in srv_top, f"not a near-tie; {context}"
        change = (ref_top[r] - ref_top[g]) + (srv_top[g] - srv_top[r])
        assert change < NOISE, f"relative logit moved {change:.3f} nats; {context}"
        return
    assert len(got["tokens"]) == len(expected), f"{what}: got {got['tokens']}, alone {expected}"


# ---- basics ----------------------------------------------------------------------------------


def test_health_models_and_api_key(stack, client):
    assert httpx.get(stack.url + "/health").status_code == 200  # no key needed
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=stack.url + "/v1", api_key="wrong", max_retries=0).models.list()
    r = post(stack.url, "/v1/completions", {"prompt": "hi", "max_tokens": 1}, key=None)
    assert r.status_code == 401
    assert r.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    # No CORS unless --allowed-origins is given: a browser preflight gets no allow header.
    preflight = {"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST"}
    r = httpx.options(stack.url + "/v1/completions", headers=preflight)
    assert "access-control-allow-origin" not in r.headers


def test_completion_greedy_equals_llm_generate(stack, client):
    prompt = nonce() + " The capital of France is"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
    ref = stack.llm.generate(prompt, greedy(8))[0]
    assert r.choices[0].text == ref.text
    assert r.choices[0].finish_reason == ref.finish_reason
    assert r.object == "text_completion" and r.model == MODEL
    assert r.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert r.usage.completion_tokens == len(ref.token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_greedy_equals_llm_chat(stack, client):
    messages = [
        {"role": "system", "content": nonce() + " You are terse."},
        {"role": "user", "content": "Name a color."},
    ]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    ref = stack.llm.chat(messages, greedy(8))[0]
    assert r.choices[0].message.content == ref.text
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == ref.finish_reason
    assert r.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert r.usage.completion_tokens == len(ref.token_ids)


def test_streaming_equals_non_streaming(client):
    prompt = nonce() + " Once upon a time"  # shorter than a KV block: never a cache hit
    whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0)
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt=prompt,
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    *content, last = chunks
    assert "".join(c.choices[0].text for c in content) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in content][-1] == whole.choices[0].finish_reason
    assert all(c.usage is None for c in content)
    assert last.choices == [] and last.usage == whole.usage

    messages = [{"role": "system", "content": nonce()}, {"role": "user", "content": "Hi!"}]
    whole = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=6, temperature=0
    )
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    *content, last = chunks
    assert content[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in content)
    assert text == whole.choices[0].message.content
    assert content[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert last.choices == [] and last.usage.completion_tokens == whole.usage.completion_tokens
    assert last.usage.prompt_tokens == whole.usage.prompt_tokens


def test_n_choices_and_seeds(stack, client):
    """n choices get seeds seed, seed+1, ... (as LLM.generate). A seeded request alone repeats
    exactly; n > 1 choices share a batch, where native kernels are not bitwise reproducible
    (see the module docstring), so only their shape is checked."""
    prompt = nonce() + " My favourite animal is"
    one = dict(model=MODEL, prompt=prompt, max_tokens=5, temperature=0.9, seed=7)
    one["extra_body"] = {"ignore_eos": True}
    r1 = client.completions.create(**one)
    assert client.completions.create(**one).choices[0].text == r1.choices[0].text
    sp = SamplingParams(max_tokens=5, temperature=0.9, seed=7, ignore_eos=True)
    assert r1.choices[0].text == stack.llm.generate(prompt, sp)[0].text

    r = client.completions.create(**{**one, "n": 3})
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.finish_reason for c in r.choices] == ["length"] * 3
    assert len({c.text for c in r.choices}) > 1  # different seeds
    assert r.usage.completion_tokens == 15  # the prompt is counted once
    assert r.usage.prompt_tokens == r1.usage.prompt_tokens
    texts, reasons = ["", "", ""], [None, None, None]
    for c in client.completions.create(**{**one, "n": 3}, stream=True):
        for ch in c.choices:
            texts[ch.index] += ch.text
            reasons[ch.index] = ch.finish_reason or reasons[ch.index]
    assert all(texts) and reasons == ["length"] * 3

    messages = [{"role": "system", "content": nonce()}, {"role": "user", "content": "Hi"}]
    r = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=3, n=2, temperature=0.9, seed=1
    )
    assert [c.index for c in r.choices] == [0, 1]
    assert all(c.message.content is not None for c in r.choices)


def test_stop_strings(stack, client):
    prompt = nonce() + " The capital of France is"
    full = stack.llm.generate(prompt, greedy(12))[0].text
    i = next(i for i in range(2, len(full) - 3) if full.find(full[i : i + 3]) == i)
    stop = full[i : i + 3]
    for stream in (False, True):
        kw = dict(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
        kw.update(stop=[stop, "never-produced"], stream=stream)
        if stream:
            chunks = list(client.completions.create(**kw))
            text = "".join(c.choices[0].text for c in chunks)
            reason = chunks[-1].choices[0].finish_reason
        else:
            r = client.completions.create(**kw)
            text, reason = r.choices[0].text, r.choices[0].finish_reason
        assert (text, reason) == (full[:i], "stop"), f"stream={stream} stop={stop!r}"


def test_logprobs(stack, client):
    prompt = nonce() + " Water boils at"
    ref = stack.llm.generate(prompt, greedy(5, logprobs=3, ignore_eos=True))[0]
    r = client.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=5,
        temperature=0,
        logprobs=3,
        extra_body={"ignore_eos": True},
    )
    lp = r.choices[0].logprobs
    assert lp.tokens == token_texts(stack.llm, ref.token_ids)
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.token_logprobs == pytest.approx([s.logprob for s in ref.outputs[0].logprobs])
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert 1 <= len(top) <= 3 and max(top.values()) == pytest.approx(chosen)  # greedy
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0

    streamed = []
    offsets = []
    for c in client.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=5,
        temperature=0,
        logprobs=2,
        stream=True,
        extra_body={"ignore_eos": True},
    ):
        if c.choices[0].logprobs:
            streamed += c.choices[0].logprobs.tokens
            offsets += c.choices[0].logprobs.text_offset
    assert streamed == lp.tokens and offsets == lp.text_offset

    messages = [{"role": "system", "content": nonce()}, {"role": "user", "content": "Hello"}]
    r = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for item in content:
        assert len(item.top_logprobs) == 2
        assert item.top_logprobs[0].token == item.token  # greedy takes the best
        assert item.top_logprobs[0].logprob == pytest.approx(item.logprob)
        assert item.logprob <= 0 and bytes(item.bytes).decode() == item.token


# ---- bad input -------------------------------------------------------------------------------

LONG = "hello " * 300  # > MAX_MODEL_LEN tokens
MEDIUM = "hello " * 200
BAD = [
    # (route, body, param named in the error)
    ("completions", '{"prompt": "hi", "max_tokens": 3', None),  # malformed JSON
    ("completions", "[1, 2]", None),
    ("completions", "", None),
    ("completions", {"prompt": "hi", "max_tokens": "abc"}, "max_tokens"),
    ("completions", {"prompt": "hi", "max_tokens": True}, "max_tokens"),
    ("completions", {"prompt": "hi", "temperature": "hot"}, "temperature"),
    ("completions", {"prompt": "hi", "stream": "yes"}, "stream"),
    ("completions", {"prompt": "hi", "n": 1.5}, "n"),
    ("completions", {"prompt": 5}, "prompt"),
    ("completions", {"prompt": "hi", "stop": 5}, "stop"),
    ("completions", {"prompt": "hi", "temperature": 5}, "temperature"),
    ("completions", {"prompt": "hi", "top_p": 0}, "top_p"),
    ("completions", {"prompt": "hi", "n": 0}, "n"),
    ("completions", {"prompt": "hi", "max_tokens": -1}, "max_tokens"),
    ("completions", {"prompt": "hi", "logprobs": 21}, "logprobs"),
    ("completions", {"prompt": "hi", "presence_penalty": 3}, "presence_penalty"),
    ("completions", {"prompt": "hi", "seed": 2**70}, "seed"),
    ("completions", {"prompt": "hi", "stop": list("abcdefghi")}, "stop"),
    ("completions", {"prompt": "hi", "echo": True, "stream": True}, "echo"),
    ("completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ("completions", {"prompt": "hi", "best_of": 1, "n": 2}, "best_of"),
    ("completions", {"prompt": "hi", "logit_bias": {"5": 101}}, "logit_bias"),
    ("completions", {"prompt": "hi", "logit_bias": {"x": 1}}, "logit_bias"),
    ("completions", {"prompt": "hi", "logit_bias": {"999999": 1}}, "logit_bias"),
    ("completions", {"prompt": MEDIUM, "max_tokens": 100}, "max_tokens"),
    ("completions", {"prompt": LONG, "max_tokens": 1}, "prompt"),
    ("completions", {"prompt": ""}, "prompt"),
    ("completions", {"prompt": []}, "prompt"),
    ("completions", {"prompt": [1, 2, 10**9]}, "prompt"),
    ("completions", {"prompt": [[1, 2], []]}, "prompt"),
    ("chat/completions", {"messages": []}, "messages"),
    ("chat/completions", {"messages": "hi"}, "messages"),
    ("chat/completions", {"messages": [{"role": "bot", "content": "x"}]}, "messages.0.role"),
    ("chat/completions", {"messages": [{"role": "user", "content": LONG}]}, "messages"),
    ("chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_p": 0}, "top_p"),
    (
        "chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]},
        "messages.0.content",
    ),
    (
        "chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 21},
        "top_logprobs",
    ),
]


@pytest.mark.parametrize(("route", "body", "param"), BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_input_gets_400_naming_the_field(stack, route, body, param):
    r = post(stack.url, "/v1/" + route, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param, err
    assert (
        err["code"] in (None, "context_length_exceeded") and err["type"] == "invalid_request_error"
    )
    assert err["message"], err
    if param is None:
        assert "JSON" in err["message"], err


def test_bad_input_through_the_openai_client(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="hi", temperature=5)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[])
    assert e.value.body["param"] == "messages"
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="hi")
    assert e.value.body["param"] == "model" and e.value.code == "model_not_found"


# ---- concurrency, disconnects, the queue bound -----------------------------------------------


def test_burst_matches_each_alone_and_bad_requests_do_not_disturb(stack):
    """12 concurrent greedy requests of different prompt and output lengths, with three bad
    ones in the middle: a token outside the vocabulary (400), an unknown model (404) and a
    1e-45 temperature (which used to turn the sampler's probabilities into NaN and kill the
    engine; now greedy)."""
    llm = stack.llm
    jobs = [
        (nonce() + " Tell me about" + " the sea and the sky" * (i % 5), 2 + (i * 5) % 9)
        for i in range(12)
    ]
    alone = [llm.generate(p, greedy(m, logprobs=5))[0] for p, m in jobs]
    bodies = [{"prompt": p, "max_tokens": m, "temperature": 0, "logprobs": 5} for p, m in jobs]
    bad = [
        {"prompt": [1, 2, 10**9], "max_tokens": 3},
        {"prompt": "hi", "max_tokens": 3, "model": "nope"},
        {"prompt": "Hello", "max_tokens": 3, "temperature": 1e-45},
    ]
    bodies[6:6] = bad
    with ThreadPoolExecutor(len(bodies)) as pool:
        results = list(pool.map(lambda b: post(stack.url, "/v1/completions", b), bodies))
    bad_results = results[6:9]
    del results[6:9]
    assert [r.status_code for r in bad_results] == [400, 404, 200]
    for i, (r, ref) in enumerate(zip(results, alone)):
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert_same_greedy(llm, choice["logprobs"], ref, f"request {i}")
    assert httpx.get(stack.url + "/health").status_code == 200
    wait_idle(stack.url)


def test_client_disconnect_mid_stream_frees_every_block(stack):
    aborted = metrics(stack.url)["miaotui_request_aborted_total"]
    headers = {"Authorization": f"Bearer {API_KEY}"}
    streams = [
        ("/v1/completions", {"prompt": nonce() + " A story:", "max_tokens": 200}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Story?"}], "n": 2}),
    ]
    with httpx.Client(timeout=60, headers=headers) as http:
        for path, body in streams:
            body.update(stream=True, ignore_eos=True, max_tokens=200)
            with http.stream("POST", stack.url + path, json=body) as r:
                assert r.status_code == 200
                got = []
                for line in r.iter_lines():
                    if line.startswith("data:"):
                        got.append(line)
                        if len(got) == 3:
                            break
            assert len(got) == 3  # the connection closes here, mid-stream
        # A non-streaming client that gives up (read timeout) is noticed too. 0.5 s: well
        # before 200 tokens are out even at the native step's ~200 tok/s (1.5 s was not).
        body = {"prompt": nonce() + " A long story:", "max_tokens": 200, "ignore_eos": True}
        with pytest.raises(httpx.ReadTimeout):
            http.post(stack.url + "/v1/completions", json=body, timeout=0.5)
    m = wait_idle(stack.url)
    assert m["miaotui_request_aborted_total"] >= aborted + 4


@contextmanager
def inprocess_server(stack: Stack, execute_hook=None, **engine_kw) -> Iterator[str]:
    """An app of our server around a new AsyncEngine on the reference's model, served by
    uvicorn in a thread; `execute_hook(execute, inp)` wraps the runner's forward pass."""
    from miaotui.engine.async_engine import AsyncEngine
    from miaotui.loader import engine_for_model
    from miaotui.server.openai import ServerConfig, create_app

    model, tok = stack.llm.engine.runner.model, stack.llm.tokenizer
    cfg = EngineConfig.from_kwargs(
        max_model_len=MAX_MODEL_LEN, cache=CacheConfig(num_blocks=40), **engine_kw
    )
    engine = AsyncEngine(engine_for_model(model, tok, cfg), MODEL)
    if execute_hook is not None:
        runner = engine.engine.runner
        runner.execute = functools.partial(execute_hook, runner.execute)
    try:
        with serve_in_thread(create_app(engine, ServerConfig(model_name=MODEL))) as url:
            yield url
    finally:
        engine.shutdown()


def test_queue_bound_gives_429_then_keeps_serving(stack):
    """One running, one waiting (max_waiting=1), then 429 + Retry-After; after the slow
    clients leave the server answers again."""

    def slow_step(execute, inp):  # keeps the first request running while the test looks
        time.sleep(0.02)
        return execute(inp)

    with inprocess_server(stack, slow_step, max_num_seqs=1, max_waiting=1) as url:
        slow = {
            "prompt": nonce() + " Count:",
            "max_tokens": 200,
            "ignore_eos": True,
            "stream": True,
        }
        with httpx.Client(timeout=60) as http, ThreadPoolExecutor(1) as pool:
            with http.stream("POST", url + "/v1/completions", json=slow) as running:
                assert running.status_code == 200
                lines = running.iter_lines()  # kept: dropping it closes the connection
                next(lines)  # it runs
                # The second waits behind it: its headers only come with its first token.
                second = {**slow, "stream": False, "max_tokens": 4}
                waiting = pool.submit(httpx.post, url + "/v1/completions", json=second, timeout=60)
                deadline = time.monotonic() + 30
                while metrics(url)["miaotui_num_requests_waiting"] < 1:
                    assert time.monotonic() < deadline, "the second request never waited"
                    assert not waiting.done(), waiting.result().text
                    time.sleep(0.05)
                client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
                for _ in range(2):
                    with pytest.raises(openai.RateLimitError) as e:
                        client.completions.create(model=MODEL, prompt="hi", max_tokens=2)
                    assert e.value.response.headers["retry-after"] == "1"
                    assert e.value.body["type"] == "rate_limit_error"
                del lines
            # The running client left mid-stream: the waiting one now runs to the end.
            assert waiting.result().status_code == 200
        r = post(url, "/v1/completions", {"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
        wait_idle(url)


def test_failed_step_is_reported_and_the_server_keeps_serving(stack):
    """A forward pass that raises (injected) fails the requests in flight with an OpenAI-style
    error (500, or an error event once a stream has started) and nothing else."""
    calls = {"n": 0}

    def flaky(execute, inp):
        calls["n"] += 1
        if calls["n"] in (1, 4):
            raise RuntimeError("injected failure")
        return execute(inp)

    with inprocess_server(stack, flaky) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.InternalServerError) as e:  # step 1
            client.completions.create(model=MODEL, prompt="Hello", max_tokens=4)
        assert "injected failure" in e.value.body["message"]
        assert e.value.body["type"] == "server_error"
        stream = client.completions.create(model=MODEL, prompt="Hi", max_tokens=8, stream=True)
        with pytest.raises(openai.APIError, match="injected failure"):  # steps 2, 3, then 4
            for _ in stream:
                pass
        r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=3)
        assert r.usage.completion_tokens == 3
        m = wait_idle(url)
        assert m["miaotui_engine_step_failures_total"] == 2
        assert httpx.get(url + "/health").status_code == 200


# ---- prefix cache and metrics ----------------------------------------------------------------


def test_prefix_cache_hit_gives_the_same_output(stack, client):
    """The same 3-block prompt twice: the second reuses 48 cached tokens (usage and /metrics)
    and generates what the first did (the first computed the whole prompt in one pass)."""
    text = nonce() + " The history of computing is a story of machines that became smaller,"
    text += " faster and cheaper with every decade, and of the people who built them: the"
    text += " engineers, the mathematicians and the programmers of the first computers, in"
    text += " the forties and the fifties."
    ids = stack.llm.tokenizer.encode(text)
    cached = 16 * ((len(ids) - 1) // 16)  # full blocks before the last prompt token's
    assert cached == 48, len(ids)
    hits = metrics(stack.url)["miaotui_prefix_cache_hits_total"]
    kw = dict(model=MODEL, prompt=text, max_tokens=6, temperature=0, logprobs=5)
    first = client.completions.create(**kw)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    second = client.completions.create(**kw)
    assert second.usage.prompt_tokens_details.cached_tokens == cached
    assert metrics(stack.url)["miaotui_prefix_cache_hits_total"] == hits + cached
    ref = stack.llm.generate(text, greedy(6, logprobs=5))[0]  # the reference, computed whole
    assert first.choices[0].logprobs.tokens == token_texts(stack.llm, ref.token_ids)
    assert_same_greedy(stack.llm, second.choices[0].logprobs.model_dump(), ref, "cached")

    # Chat requests share the template's default system prompt: the second hits it.
    for question in ("What is 2+2?", "What is the sea?"):
        r = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": question}], max_tokens=2
        )
    assert r.usage.prompt_tokens_details.cached_tokens >= 16


def test_metrics_count_this_tests_requests(stack, client):
    """The counters move by this test's own requests (a prompt twice, the second from the prefix
    cache; streamed, so that inter-token latencies are observed), whatever ran before."""
    before = wait_idle(stack.url)
    text = nonce() + " A prompt long enough to fill at least one whole block of the KV cache,"
    text += " so that the second time it is sent its first block comes from the prefix cache."
    for _ in range(2):
        stream = client.completions.create(
            model=MODEL, prompt=text, max_tokens=4, temperature=0, stream=True
        )
        assert len([c for c in stream if c.choices]) >= 2
    m = wait_idle(stack.url)
    for name in (
        "miaotui_prompt_tokens_total",
        "miaotui_generation_tokens_total",
        "miaotui_request_success_total",
        "miaotui_prefix_cache_queries_total",
        "miaotui_prefix_cache_hits_total",
        "miaotui_time_to_first_token_seconds_count",
        "miaotui_inter_token_latency_seconds_count",
        "miaotui_e2e_request_latency_seconds_count",
    ):
        assert m[name] > before.get(name, 0), name
    assert m["miaotui_request_success_total"] == before.get("miaotui_request_success_total", 0) + 2
    assert m["miaotui_engine_step_failures_total"] == 0
    assert 0 < m["miaotui_prefix_cache_hit_rate"] < 1
    body = httpx.get(stack.url + "/metrics").text
    assert json.dumps(MODEL) in body  # every metric is labelled with the served model
