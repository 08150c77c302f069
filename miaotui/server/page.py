"""The applications on top of the API: the chat page at `/` (plain HTML/CSS/JS shipped in
server/static, nothing from a CDN), the speech endpoint it records into (audio.py), and
`POST /v1/translate`, the page's translate mode (every sentence submitted at once).

The page talks to the server only through its public routes (/v1/chat/completions with SSE,
/v1/audio/transcriptions, /v1/translate), with the API key typed into the page."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.background import BackgroundTask

from miaotui.errors import InvalidRequestError
from miaotui.sampling_params import SamplingParams
from miaotui.server.audio import install_transcriptions
from miaotui.server.errors import APIError, api_error_for, error_body
from miaotui.server.fanout import ClientGone, FanOut, Job
from miaotui.translate import (
    STYLES,
    Document,
    TranslationConfig,
    clean_output,
    sampling_params,
    sentence_prompt,
    shared_prefix,
    split_document,
)

STATIC = Path(__file__).with_name("static")
ASSETS = {
    "app.js": "text/javascript",
    "markdown.js": "text/javascript",
    "audio.js": "text/javascript",
    "style.css": "text/css",
}
PRIME = SamplingParams(max_tokens=1)
"""The request that computes the sentences' shared prompt prefix before they are submitted."""
# Defense in depth beside the escaping: no inline script or event handler would run even if
# markup got into the page.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)


class TranslateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str = Field(strict=True)
    target_language: str = Field(strict=True)
    style: str = Field(default="auto", strict=True, description=f"one of {STYLES}")
    max_tokens: int = Field(default=160, strict=True, ge=1, le=1024)
    stream: bool = Field(default=False, strict=True)


def install_page(app: FastAPI, engine, config) -> None:
    """Add the page, its assets, /v1/audio/transcriptions and /v1/translate to `app`."""
    install_transcriptions(app)

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        html = (STATIC / "index.html").read_text(encoding="utf-8")
        return HTMLResponse(html, headers={"Content-Security-Policy": CSP})

    @app.get("/static/{name}", include_in_schema=False)
    async def asset(name: str) -> FileResponse:
        if name not in ASSETS:
            raise APIError(404, f"no asset {name!r}", kind="not_found_error")
        return FileResponse(STATIC / name, media_type=ASSETS[name])

    @app.post("/v1/translate")
    async def translate(req: TranslateRequest, raw: Request) -> Response:
        try:
            cfg = TranslationConfig(req.target_language, req.style, req.max_tokens)
            doc = split_document(req.text)
        except InvalidRequestError as e:
            raise APIError(400, str(e), e.param) from e
        start = time.perf_counter()
        jobs = _jobs(engine, doc.sentences, cfg)
        await _prime(engine, raw, jobs)

        def result(texts: list[str]) -> dict:
            return {
                "object": "translation",
                "model": config.model_name,
                "target_language": cfg.target,
                "text": doc.assemble([clean_output(t) for t in texts]),
                "sentences": len(texts),
                "seconds": time.perf_counter() - start,
            }

        fan = FanOut(engine, jobs, raw)
        try:
            await fan.start()  # a full queue is a 429 before any byte is sent
        except ClientGone:
            return Response(status_code=499)
        if req.stream:
            body = _events(fan, doc, result)
            return StreamingResponse(
                body, media_type="text/event-stream", background=BackgroundTask(fan.close)
            )
        try:
            return JSONResponse(result(await _collect(fan, check_disconnect=True)))
        except ClientGone:
            return Response(status_code=499)  # the page's Stop: every sentence was aborted
        finally:
            fan.close()


def _jobs(engine, sentences: list[str], cfg: TranslationConfig) -> list[Job]:
    """One engine request per sentence."""
    rid = f"translate-{uuid.uuid4().hex[:16]}"
    jobs = []
    for i, sentence in enumerate(sentences):
        ids = engine.tokenizer.encode(sentence_prompt(sentence, engine.tokenizer, cfg))
        params = sampling_params(sentence, engine.tokenizer, cfg)
        if len(ids) + params.max_tokens > engine.max_model_len:
            raise APIError(
                400,
                f"sentence {i + 1} is too long for this model's context "
                f"({len(ids)} prompt tokens + {params.max_tokens} > {engine.max_model_len})",
                "text",
            )
        jobs.append(Job(i, f"{rid}-{i}", ids, params))
    return jobs


async def _prime(engine, raw: Request, jobs: list[Job]) -> None:
    """Compute the sentences' shared instruction once: a prefix-cache hit for all of them."""
    shared = shared_prefix([job.prompt_ids for job in jobs])
    if len(jobs) > 1 and shared:
        fan = FanOut(engine, [Job(0, f"{jobs[0].request_id}-prefix", shared, PRIME)], raw)
        try:
            await fan.start()
            await _collect(fan, check_disconnect=True)
        except ClientGone:
            pass  # the sentences' own start() sees it too
        finally:
            fan.close()


async def _collect(fan: FanOut, check_disconnect: bool) -> list[str]:
    texts = [""] * len(fan.jobs)
    async for idx, out in fan.outputs(check_disconnect):
        if out.finished:
            texts[idx] = out.text
    return texts


async def _events(fan: FanOut, doc: Document, result) -> AsyncIterator[str]:
    """SSE: the paragraphs' sentence counts, each sentence as it is translated (in the order
    they finish), then the whole translation; a client that leaves aborts the rest."""
    texts = [""] * len(fan.jobs)
    try:
        yield _event(
            {"object": "translation.start", "paragraphs": [len(p) for p in doc.paragraphs]}
        )
        async for idx, out in fan.outputs(check_disconnect=False):
            if out.finished:
                texts[idx] = out.text
                body = {
                    "object": "translation.sentence",
                    "index": idx,
                    "text": clean_output(out.text),
                }
                yield _event(body)
        yield _event(result(texts))
    except Exception as e:  # headers are sent: report the failure in the stream
        err = api_error_for(e)
        yield _event(error_body(err.message, err.param, err.kind, err.code))
    finally:
        fan.close()
    yield "data: [DONE]\n\n"


def _event(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"
