"""Overload, engine faults and graceful shutdown, over real HTTP with httpx and the `openai`
client.

In-process (uvicorn in a thread around an AsyncEngine on the tiny chat model, with the engine's
fault hook to slow steps down or make one fail): the queue bounds (count and tokens) answer 429
with Retry-After at once and the accepted requests finish; a failed step fails only its own
requests with a 500 naming the failure; a dead step thread makes /health and new requests 503.
A real `miaotui serve` subprocess on the default model: SIGTERM and SIGINT drain (503 for new
requests, /health "draining"), let the short request finish, end the long one with an SSE
error event, and exit 0. Every test ends with every KV block back in the pool."""

from __future__ import annotations

import json
import signal
import statistics
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import openai
import pytest

from miaotui.config import CacheConfig, EngineConfig
from tests.helpers import prometheus_values as metrics
from tests.helpers import serve_in_thread, serve_subprocess

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(180),
    pytest.mark.usefixtures("one_thread"),
]

MAX_MODEL_LEN = 256
NUM_BLOCKS = 48


@pytest.fixture(scope="module")
def tiny_llm(tiny_chat_gguf, one_thread):
    from miaotui.llm import LLM

    return LLM(str(tiny_chat_gguf), weights="float", max_model_len=MAX_MODEL_LEN)


@contextmanager
def served(llm, fault_hook=None, max_waiting_tokens=None, **engine_kw) -> Iterator[tuple]:
    """Our app around a new AsyncEngine (own KV cache) on `llm`'s model, served in a thread;
    yields (base URL, AsyncEngine)."""
    from miaotui.engine.async_engine import AsyncEngine
    from miaotui.loader import engine_for_model
    from miaotui.server.openai import ServerConfig, create_app

    cfg = EngineConfig.from_kwargs(
        max_model_len=MAX_MODEL_LEN, cache=CacheConfig(num_blocks=NUM_BLOCKS), **engine_kw
    )
    inner = engine_for_model(llm.engine.runner.model, llm.tokenizer, cfg)
    inner.fault_hook = fault_hook
    engine = AsyncEngine(inner, "tiny", max_waiting_tokens=max_waiting_tokens)
    try:
        with serve_in_thread(create_app(engine, ServerConfig(model_name="tiny"))) as url:
            yield url, engine
    finally:
        engine.shutdown()


def wait_until(condition, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def assert_all_blocks_free(url: str, engine) -> None:
    """Nothing runs or waits, the gauges say so, and every usable block is free again."""

    def idle() -> bool:
        m = metrics(url)
        keys = ("miaotui_num_requests_running", "miaotui_num_requests_waiting")
        return all(m[k] == 0 for k in keys) and m["miaotui_kv_cache_usage_perc"] == 0

    wait_until(idle, "the engine to go idle")
    pool = engine.engine.block_pool
    assert pool.num_free_blocks == pool.num_usable_blocks


def slow_steps(seconds: float):
    def hook(request_ids: list[str]) -> None:
        time.sleep(seconds)

    return hook


def completion(url: str, prompt, max_tokens: int, timeout: float = 60, **kw) -> httpx.Response:
    body = {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, **kw}
    return httpx.post(url + "/v1/completions", json=body, timeout=timeout)


# ---- overload ------------------------------------------------------------------------------------


def test_burst_beyond_the_queue_gets_429_at_once_and_the_accepted_finish(tiny_llm):
    """2 running + 2 waiting fit; a burst of 24 gets 429 + Retry-After for the rest, each
    sooner than a typical accepted request's answer (12 steps), and every accepted request
    returns all its tokens."""
    with served(tiny_llm, slow_steps(0.03), max_num_seqs=2, max_waiting=2) as (url, engine):
        timed: list[tuple[float, httpx.Response]] = []

        def one(i: int) -> None:
            t0 = time.monotonic()
            r = completion(url, f"burst {i}:", 12)
            timed.append((time.monotonic() - t0, r))

        with ThreadPoolExecutor(24) as pool:
            list(pool.map(one, range(24)))
        codes = sorted(r.status_code for _, r in timed)
        assert set(codes) == {200, 429}, codes
        ok = [r for _, r in timed if r.status_code == 200]
        shed = [(t, r) for t, r in timed if r.status_code == 429]
        t_ok = [t for t, r in timed if r.status_code == 200]
        assert len(ok) >= 2, codes  # at least what fits the queue (more as the first ones run)
        for r in ok:
            assert r.json()["usage"]["completion_tokens"] == 12
            assert r.json()["choices"][0]["finish_reason"] == "length"
        for t, r in shed:
            assert r.headers["retry-after"] == "1"
            assert r.json()["error"]["type"] == "rate_limit_error"
            assert "max_waiting=2" in r.json()["error"]["message"]
            assert t < statistics.median(t_ok), f"a 429 took {t:.2f} s, {t_ok}"
        assert metrics(url)["miaotui_request_rejected_total"] == len(shed)
        # The official client sees the same: RateLimitError, nothing retried behind our back.
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        assert client.completions.create(model="tiny", prompt="after", max_tokens=2).usage
        assert_all_blocks_free(url, engine)


def test_429_does_not_wait_for_the_step(tiny_llm):
    """0.8 s steps, one running and one waiting (max_waiting=1): each further request is
    refused in half a step, not at the next step boundary."""
    with served(tiny_llm, slow_steps(0.8), max_num_seqs=1, max_waiting=1) as (url, engine):
        body = {"prompt": "slow", "max_tokens": 50, "ignore_eos": True, "stream": True}
        with (
            httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as running,
            ThreadPoolExecutor(1) as pool,
        ):
            lines = running.iter_lines()
            next(lines)
            waiting = pool.submit(completion, url, "waits", 2)
            wait_until(lambda: metrics(url)["miaotui_num_requests_waiting"] == 1, "a waiter")
            for _ in range(5):
                t0 = time.monotonic()
                r = completion(url, "refused", 2)
                assert r.status_code == 429 and time.monotonic() - t0 < 0.4
            del lines
            assert waiting.result().status_code == 200
        assert_all_blocks_free(url, engine)


def test_token_budget_sheds_by_cost(tiny_llm):
    """max_waiting_tokens=100: with one request running, two 50-token requests (10 prompt ids +
    40 new) may wait, the third gets 429 naming the budget; the waiting ones then finish."""
    prompt = list(range(1000, 1010))  # 10 token ids
    with served(
        tiny_llm, slow_steps(0.03), max_waiting_tokens=100, max_num_seqs=1, max_waiting=50
    ) as (url, engine):  # the running request takes > 7 s: it holds the queue while we look
        body = {"prompt": "long", "max_tokens": 240, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as running:
            lines = running.iter_lines()
            next(lines)  # it runs
            with ThreadPoolExecutor(2) as pool:
                waiting = []
                for k in range(2):
                    waiting.append(pool.submit(completion, url, prompt, 40))
                    wait_until(lambda k=k: engine.engine.scheduler.num_waiting == k + 1, "waiting")
                for _ in range(2):
                    r = completion(url, prompt, 40)
                    assert r.status_code == 429, r.text
                    assert r.headers["retry-after"] == "1"
                    assert "max_waiting_tokens=100" in r.json()["error"]["message"]
                # At the budget, even a small request is refused.
                assert completion(url, prompt[:5], 5).status_code == 429
                assert metrics(url)["miaotui_request_rejected_total"] == 3
                del lines  # the running client leaves; the waiting two run to the end
                for f in waiting:
                    r = f.result()
                    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 40
        assert_all_blocks_free(url, engine)
        alone = completion(url, list(range(500, 620)), 20)  # over budget, but alone: admitted
        assert alone.status_code == 200 and alone.json()["usage"]["completion_tokens"] == 20


def test_stream_disconnect_frees_its_blocks_within_a_step(tiny_llm):
    """Clients that leave mid-stream: each one's request is gone from the engine, its blocks
    free, by the end of the step after the one running when it left (100 ms steps)."""
    steps = []

    def counted(request_ids: list[str]) -> None:
        time.sleep(0.1)
        steps.append(time.monotonic())

    with served(tiny_llm, counted) as (url, engine):
        for i in range(3):
            body = {"prompt": f"leaving {i}", "max_tokens": 200, "ignore_eos": True, "n": 2}
            with httpx.stream(
                "POST", url + "/v1/completions", json={**body, "stream": True}, timeout=60
            ) as r:
                for k, _ in enumerate(r.iter_lines()):
                    if k == 4:
                        break
                assert engine.engine.scheduler.num_running == 2
                left_at = len(steps)
            wait_until(lambda: not engine.engine.scheduler.requests, "the aborts", timeout=10)
            assert len(steps) - left_at <= 2, f"freed {len(steps) - left_at} steps later"
        assert_all_blocks_free(url, engine)
        assert metrics(url)["miaotui_request_aborted_total"] == 6


# ---- engine faults -------------------------------------------------------------------------------


class Fault:
    """A fault hook: slow steps, and one failure (or thread death) when armed."""

    def __init__(self, error: BaseException):
        self.error, self.armed, self.failed_ids = error, threading.Event(), []

    def __call__(self, request_ids: list[str]) -> None:
        time.sleep(0.02)
        if self.armed.is_set():
            self.armed.clear()
            self.failed_ids = list(request_ids)
            raise self.error


def test_failed_step_fails_only_its_requests_and_the_server_keeps_serving(tiny_llm):
    fault = Fault(RuntimeError("injected fault in the forward pass"))
    with served(tiny_llm, fault, max_num_seqs=1) as (url, engine), ThreadPoolExecutor(2) as pool:
        running = pool.submit(completion, url, "first", 150)
        wait_until(lambda: engine.engine.scheduler.num_running == 1, "the first to run")
        waiting = pool.submit(completion, url, "second", 8)
        wait_until(lambda: engine.engine.scheduler.num_waiting == 1, "the second to wait")
        fault.armed.set()
        r = running.result()
        assert r.status_code == 500, r.text
        err = r.json()["error"]
        assert err["type"] == "server_error"
        assert "RuntimeError: injected fault in the forward pass" in err["message"]
        assert len(fault.failed_ids) == 1  # the step held the running request only
        second = waiting.result()  # not in the failed step: unharmed
        assert second.status_code == 200 and second.json()["usage"]["completion_tokens"] == 8

        # A stream that has started gets the failure as its last event, then [DONE].
        body = {"prompt": "stream", "max_tokens": 100, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as s:
            assert s.status_code == 200
            events = []
            for line in s.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if len(events) == 2:
                        fault.armed.set()
        assert events[-1] == "[DONE]"
        final = json.loads(events[-2])
        assert "injected fault in the forward pass" in final["error"]["message"]
        assert final["error"]["type"] == "server_error"
        assert all("choices" in json.loads(e) for e in events[:-2])

        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        assert client.completions.create(model="tiny", prompt="ok", max_tokens=3).usage
        assert httpx.get(url + "/health").status_code == 200
        assert metrics(url)["miaotui_engine_step_failures_total"] == 2
        assert_all_blocks_free(url, engine)


def test_scheduler_failure_fails_everything_then_serves_again(tiny_llm):
    """A step that fails before it has scheduled anything (the scheduler raised) cannot tell
    whose step it was: every request fails with the 500, none is left waiting forever."""
    with served(tiny_llm, slow_steps(0.02), max_num_seqs=1) as (url, engine):
        scheduler = engine.engine.scheduler
        schedule, armed = scheduler.schedule, threading.Event()

        def failing_once():
            if armed.is_set():
                armed.clear()
                raise RuntimeError("injected scheduler fault")
            return schedule()

        scheduler.schedule = failing_once
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(completion, url, "first", 150)
            wait_until(lambda: scheduler.num_running == 1, "the first to run")
            waiting = pool.submit(completion, url, "second", 8)
            wait_until(lambda: scheduler.num_waiting == 1, "the second to wait")
            armed.set()
            for r in (running.result(), waiting.result()):
                assert r.status_code == 500, r.text
                assert "injected scheduler fault" in r.json()["error"]["message"]
        r = completion(url, "after", 3)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        assert_all_blocks_free(url, engine)


class StepThreadKilled(BaseException):
    """Not an Exception: escapes the step's handler and ends the step thread."""


def test_dead_step_thread_makes_health_fail_and_requests_503(tiny_llm):
    fault = Fault(StepThreadKilled("the step thread was killed"))
    with served(tiny_llm, fault) as (url, engine):
        with ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(completion, url, "doomed", 150)
            wait_until(lambda: engine.engine.scheduler.num_running == 1, "a request to run")
            fault.armed.set()
            r = in_flight.result(timeout=30)  # told, not left hanging
        assert r.status_code == 503, r.text
        assert "the step thread was killed" in r.json()["error"]["message"]
        wait_until(lambda: not engine.is_alive, "the step thread to end")
        health = httpx.get(url + "/health", timeout=5)
        assert health.status_code == 503
        assert "the step thread was killed" in health.json()["error"]["message"]
        t0 = time.monotonic()
        late = completion(url, "late", 4, timeout=10)
        assert late.status_code == 503 and time.monotonic() - t0 < 2
        assert late.json()["error"]["type"] == "server_error"
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.InternalServerError) as e:
            client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2
            )
        assert e.value.status_code == 503
        pool_ = engine.engine.block_pool  # the dead loop's requests were freed
        assert pool_.num_free_blocks == pool_.num_usable_blocks
        assert engine.engine.scheduler.num_running == engine.engine.scheduler.num_waiting == 0


# ---- graceful shutdown of a real `miaotui serve` -------------------------------------------------


def stream_events(url: str, body: dict, started: threading.Event, out: list) -> None:
    """Read one SSE stream to its end into `out` (the status, then (time, data) per event);
    sets `started` at the first event."""
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
        out.append(r.status_code)
        for line in r.iter_lines():
            if line.startswith("data: "):
                out.append((time.monotonic(), line[6:]))
                started.set()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_drains_then_exits_0(sig):
    """In flight at the signal: a short stream (finishes inside the 6 s drain window even on a
    busy machine) and a long one (cannot: 2000 tokens, aborted with a final SSE error event).
    Meanwhile new requests get 503 and /health says draining; then the process exits 0."""
    args = ("--threads", "1", "--max-model-len", "2048", "--shutdown-timeout", "6")
    with serve_subprocess(*args) as (url, proc, log):
        short_body = {"prompt": "One two", "max_tokens": 16, "ignore_eos": True, "stream": True}
        long_body = {**short_body, "prompt": "Once upon a time", "max_tokens": 2000}
        short, long_, threads = [], [], []
        for body, out in ((long_body, long_), (short_body, short)):
            started = threading.Event()
            threads.append(threading.Thread(target=stream_events, args=(url, body, started, out)))
            threads[-1].start()
            assert started.wait(120), out
        proc.send_signal(sig)
        t0 = time.monotonic()

        def draining() -> bool:
            return httpx.get(url + "/health", timeout=5).status_code == 503

        wait_until(draining, "/health to report draining", timeout=5)
        health = httpx.get(url + "/health", timeout=5)
        assert health.json() == {"status": "draining"}
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=10)
        with pytest.raises(openai.InternalServerError) as e:
            client.completions.create(model="smollm2-135m", prompt="new", max_tokens=2)
        assert e.value.status_code == 503 and e.value.response.headers["retry-after"] == "1"
        assert "shutting down" in e.value.body["message"]
        for t in threads:
            t.join(timeout=30)
        assert proc.wait(timeout=30) == 0
        elapsed = time.monotonic() - t0
        output = log.read_text()  # the log's directory goes with the context
    status, events = short[0], [data for _, data in short[1:]]
    assert status == 200 and events[-1] == "[DONE]"
    assert short[-2][0] > t0  # it was in flight at the signal ...
    last = json.loads(events[-2])
    assert last["choices"][0]["finish_reason"] == "length"  # ... and finished in the window
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])
    status, events = long_[0], [data for _, data in long_[1:]]
    assert status == 200 and events[-1] == "[DONE]"
    final = json.loads(events[-2])
    assert final["error"]["type"] == "server_error"
    assert "6 s drain window" in final["error"]["message"]
    assert all("choices" in json.loads(e) for e in events[:-2])
    assert 6 <= elapsed < 40, elapsed
    assert "Traceback" not in output, output[-3000:]
    assert "miaotui: stopped" in output
