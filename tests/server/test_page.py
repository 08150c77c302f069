"""The chat page in a real browser (Debian's Chromium driven by Playwright) on a real
`miaotui serve`: tokens arrive before the answer ends, Stop frees the request on the server
(its /metrics), a second turn carries the first, speech uploaded in the page is answered, server
errors are shown, and model text is escaped: an answer with <script> and <img onerror> renders
as text. That last one runs the real app around a scripted engine, the one way to make a model
say exactly that.

The references: the server's own /metrics and the official `openai` client's non-streaming
answer to the same request."""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import AsyncIterator

import httpx
import openai
import pytest

from miaotui.audio.wer import word_error_rate
from miaotui.engine.engine import Produced, RequestOutput
from miaotui.engine.metrics import EngineMetrics
from miaotui.load.open import load_tokenizer, open_checkpoint
from miaotui.sampling_params import SamplingParams
from miaotui.server.openai import ServerConfig, create_app
from tests.helpers import (
    APP_API_KEY,
    chromium,
    default_model_path,
    librivox_clips,
    prometheus_values,
    serve_in_thread,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

ANSWER = ".msg.assistant"


def fake_microphone() -> tuple[str, ...]:
    """Chromium flags: a microphone that plays LibriVox clip 1 once, granted without asking."""
    return (
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={librivox_clips()[1][0]}%noloop",
    )


@pytest.fixture(scope="module")
def browser():
    with chromium(*fake_microphone()) as b:
        yield b


def open_page(browser, url: str, key: str | None = APP_API_KEY, **settings):
    """A fresh page on `url` with the API key typed in and the settings filled."""
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url + "/")
    if key:
        page.fill("#api-key", key)
        page.dispatch_event("#api-key", "change")
    for name, value in settings.items():
        page.fill(f"#{name.replace('_', '-')}", str(value))
    page.js_errors = errors
    return page


def ask(page, text: str) -> None:
    page.fill("#prompt", text)
    page.click("#send")


def last_answer_state(page) -> str | None:
    return page.eval_on_selector_all(ANSWER, "els => els.length ? els.at(-1).dataset.state : null")


def wait_answer(page, timeout_s: float = 90) -> None:
    page.wait_for_function(
        "() => { const a = [...document.querySelectorAll('.msg.assistant')].at(-1);"
        " return a && a.dataset.state !== 'streaming'; }",
        timeout=timeout_s * 1000,
    )


def test_page_is_self_contained(app_server):
    page = httpx.get(app_server + "/", timeout=10)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert {"/static/app.js", "/static/markdown.js", "/static/style.css"} <= set(assets)
    for asset in assets:
        if asset.startswith("data:"):
            continue
        assert asset.startswith("/static/"), f"{asset}: the page must work offline"
        r = httpx.get(app_server + asset, timeout=10)
        assert r.status_code == 200, asset
        assert not re.search(r"https?://", r.text), f"{asset} reaches outside the server"
    assert httpx.get(app_server + "/static/../openai.py", timeout=10).status_code == 404


def test_tokens_stream_in_and_the_stats_match_the_server(app_server, browser):
    page = open_page(browser, app_server, temperature=0, max_tokens=64)
    question = f"[{uuid.uuid4().hex[:6]}] Name three colours of the rainbow."
    ask(page, question)
    seen_streaming = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = page.inner_text(f"{ANSWER} .content")
        state = last_answer_state(page)
        if state == "streaming" and text.strip():
            seen_streaming.append(len(text))
        if state != "streaming":
            break
        time.sleep(0.02)
    assert last_answer_state(page) == "done", page.inner_text(ANSWER)
    assert len(set(seen_streaming)) >= 2, f"text lengths seen while streaming: {seen_streaming}"

    stats = page.inner_text(f"{ANSWER} .stats")
    ttft = re.search(r"TTFT (\d+) ms", stats)
    speed = re.search(r"([\d.]+) tok/s", stats)
    tokens = re.search(r"(\d+) tokens", stats)
    assert ttft and speed and tokens, stats
    assert float(speed.group(1)) > 0
    # The same request, not streamed, through the official client: the same token count.
    client = openai.OpenAI(base_url=app_server + "/v1", api_key=APP_API_KEY, max_retries=0)
    ref = client.chat.completions.create(
        model="smollm2-135m",
        messages=[{"role": "user", "content": question}],
        temperature=0,
        max_tokens=64,
    )
    assert int(tokens.group(1)) == ref.usage.completion_tokens
    assert ref.choices[0].finish_reason in stats
    assert not page.js_errors
    page.close()


def test_stop_aborts_the_request_on_the_server(app_server, browser):
    # Greedy, this answer runs to its 1500-token limit: Stop comes long before the end.
    page = open_page(browser, app_server, temperature=0, max_tokens=1500)
    aborted = prometheus_values(app_server)["miaotui_request_aborted_total"]
    ask(page, "Write a very long story about a lighthouse keeper.")
    page.wait_for_function(
        "() => document.querySelector('.msg.assistant .content').textContent.length > 20"
    )
    assert prometheus_values(app_server)["miaotui_num_requests_running"] == 1
    page.click("#stop")
    wait_answer(page)
    assert last_answer_state(page) == "stopped"
    deadline = time.monotonic() + 10
    while True:
        m = prometheus_values(app_server)
        if m["miaotui_num_requests_running"] == 0 and m["miaotui_kv_cache_usage_perc"] == 0:
            break
        assert time.monotonic() < deadline, f"the server still runs it: {m}"
        time.sleep(0.1)
    assert m["miaotui_request_aborted_total"] == aborted + 1
    assert "stopped" in page.inner_text(f"{ANSWER} .stats")
    assert page.is_enabled("#send") and not page.is_enabled("#stop")
    page.close()


def test_second_turn_carries_the_first(app_server, browser):
    page = open_page(browser, app_server, temperature=0, max_tokens=24, system="Be brief.")
    bodies = []
    page.on(
        "request",
        lambda r: bodies.append(json.loads(r.post_data)) if "chat/completions" in r.url else None,
    )
    ask(page, "My cat is called Zorblax.")
    wait_answer(page)
    first = page.inner_text(f"{ANSWER} .content")
    ask(page, "What is my cat called?")
    wait_answer(page)
    assert page.locator(ANSWER).count() == 2
    roles = [m["role"] for m in bodies[1]["messages"]]
    assert roles == ["system", "user", "assistant", "user"]
    sent = bodies[1]["messages"]
    assert sent[0]["content"] == "Be brief." and sent[1]["content"] == "My cat is called Zorblax."
    assert " ".join(sent[2]["content"].split()) == " ".join(first.split())
    assert bodies[1]["temperature"] == 0 and bodies[1]["max_tokens"] == 24
    page.close()


def test_server_errors_are_shown(app_server, browser):
    page = open_page(browser, app_server, key="wrong-key")
    ask(page, "hello")
    wait_answer(page)
    assert last_answer_state(page) == "error"
    assert "invalid or missing API key" in page.inner_text(f"{ANSWER} .error")

    page = open_page(browser, app_server, max_tokens=100000)
    ask(page, "hello")
    wait_answer(page)
    error = page.inner_text(f"{ANSWER} .error")
    assert error.startswith("400") and "max_tokens" in error
    page.close()


def test_uploaded_speech_is_transcribed_and_answered(app_server, browser):
    path, reference = librivox_clips()[1]
    page = open_page(browser, app_server, temperature=0, max_tokens=16)
    page.set_input_files("#upload", str(path))
    wait_answer(page, timeout_s=60)
    heard = page.inner_text(".msg.user")
    assert word_error_rate([reference], [heard]) < 0.5, heard
    assert last_answer_state(page) == "done"
    assert page.inner_text(f"{ANSWER} .content").strip()
    page.close()


def test_recorded_speech_is_transcribed_and_answered(app_server, browser):
    """The Record button, on Chromium's fake microphone (see fake_microphone)."""
    reference = librivox_clips()[1][1]
    page = open_page(browser, app_server, temperature=0, max_tokens=8)
    page.click("#record")
    page.wait_for_function("() => document.querySelector('#record').textContent !== 'Record'")
    time.sleep(3.5)  # the clip lasts 3 s
    page.click("#record")
    wait_answer(page, timeout_s=60)
    heard = page.inner_text(".msg.user")
    assert word_error_rate([reference], [heard]) < 0.5, heard
    assert last_answer_state(page) == "done"
    assert not page.js_errors
    page.close()


def test_translate_mode_keeps_paragraphs(app_server, browser):
    source = "The sun is hot. The sea is blue.\n\nI like bread."
    page = open_page(browser, app_server)
    page.select_option("#mode", "translate")
    page.select_option("#target", "de")
    assert not page.is_visible("#temperature")  # chat settings hidden in translate mode
    ask(page, source)
    wait_answer(page)
    assert last_answer_state(page) == "done", page.inner_text(ANSWER)
    shown = page.inner_text(f"{ANSWER} .content")
    ref = httpx.post(
        app_server + "/v1/translate",
        json={"text": source, "target_language": "de"},
        headers={"Authorization": f"Bearer {APP_API_KEY}"},
        timeout=120,
    ).json()
    assert shown.strip() == ref["text"].strip() and len(shown.strip().split("\n\n")) == 2
    assert "3 sentences" in page.inner_text(f"{ANSWER} .stats")
    page.close()


def test_stop_aborts_a_translation_on_the_server(app_server, browser):
    page = open_page(browser, app_server)
    page.select_option("#mode", "translate")
    aborted = prometheus_values(app_server)["miaotui_request_aborted_total"]
    ask(page, " ".join(f"Sentence number {i} is about the sea and the sky." for i in range(24)))
    deadline = time.monotonic() + 30
    while (running := prometheus_values(app_server)["miaotui_num_requests_running"]) < 2:
        state = last_answer_state(page)
        assert time.monotonic() < deadline and state == "streaming", (running, state)
        time.sleep(0.05)
    page.click("#stop")
    wait_answer(page)
    assert last_answer_state(page) == "stopped", page.inner_text(ANSWER)
    deadline = time.monotonic() + 10
    while (m := prometheus_values(app_server))["miaotui_num_requests_running"] > 0:
        assert time.monotonic() < deadline, f"the server still translates: {m}"
        time.sleep(0.1)
    assert m["miaotui_request_aborted_total"] >= aborted + 2
    page.close()


# ---- model text is never markup ----------------------------------------------------------------

HOSTILE = (
    "Look: <script>window.pwned = 'script'</script> and "
    '<img src="x" onerror="window.pwned = \'img\'"> and **bold** with `<b>code</b>`.\n\n'
    "```html\n<img src=x onerror=alert(1)>\n```\n"
)


class ScriptedEngine:
    """Replays HOSTILE as the answer to any request, token by token (the real tokenizer),
    through the real app: the one way to make a model say exactly that."""

    def __init__(self):
        self.tokenizer = load_tokenizer(open_checkpoint(str(default_model_path())))
        self.metrics = EngineMetrics("scripted")
        self.max_model_len = 2048
        self.error = None

    async def generate(
        self, prompt: list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        ids = self.tokenizer.encode(HOSTILE, add_special=False)
        produced = Produced()
        for k, token in enumerate(ids):
            await asyncio.sleep(0.01)
            text = self.tokenizer.decode(ids[: k + 1])
            delta = text[len("".join(produced.text)) :]
            produced.token_ids.append(token)
            produced.text.append(delta)
            last = k == len(ids) - 1
            yield RequestOutput(
                request_id=request_id,
                prompt_token_ids=list(prompt),
                delta_text=delta,
                delta_token_ids=[token],
                finished=last,
                finish_reason="stop" if last else None,
                produced=produced,
                upto=(k + 1, k + 1, 0),
            )

    def abort(self, request_id: str) -> None:
        pass


def test_model_markup_renders_as_text(browser):
    app = create_app(ScriptedEngine(), ServerConfig(model_name="scripted"))
    with serve_in_thread(app) as url:
        page = open_page(browser, url, key=None)
        ask(page, "say something dangerous")
        wait_answer(page, timeout_s=30)
        assert last_answer_state(page) == "done"
        answer = page.locator(f"{ANSWER} .content")
        text = answer.inner_text()
        assert "<script>window.pwned = 'script'</script>" in text
        assert "onerror=\"window.pwned = 'img'\">" in text
        assert answer.locator("script, img").count() == 0
        assert page.evaluate("window.pwned") is None
        assert answer.locator("strong").inner_text() == "bold"  # Markdown still renders
        assert answer.locator("p code").inner_text() == "<b>code</b>"
        assert answer.locator("pre code").inner_text() == "<img src=x onerror=alert(1)>"
        assert answer.locator("pre .lang").inner_text() == "html"
        assert not page.js_errors
        page.close()
