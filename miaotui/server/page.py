"""The applications on top of the API: the chat page at `/` (plain HTML/CSS/JS shipped in
server/static, nothing from a CDN), the speech endpoint it records into (audio.py), and
`POST /v1/translate`, the page's translate mode (every sentence submitted at once).

The page talks to the server only through its public routes (/v1/chat/completions with SSE,
/v1/audio/transcriptions, /v1/translate), with the API key typed into the page."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from miaotui.errors import InvalidRequestError
from miaotui.sampling_params import SamplingParams
from miaotui.server.audio import install_transcriptions
from miaotui.server.errors import APIError
from miaotui.server.fanout import ClientGone, FanOut, Job
from miaotui.translate import (
    STYLES,
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
    async def translate(req: TranslateRequest, raw: Request) -> JSONResponse:
        try:
            cfg = TranslationConfig(req.target_language, req.style, req.max_tokens)
            doc = split_document(req.text)
        except InvalidRequestError as e:
            raise APIError(400, str(e), e.param) from e
        start = time.perf_counter()
        outputs = await _run_all(engine, raw, doc.sentences, cfg)
        return JSONResponse(
            {
                "object": "translation",
                "model": config.model_name,
                "target_language": cfg.target,
                "text": doc.assemble([clean_output(t) for t in outputs]),
                "sentences": len(doc.sentences),
                "seconds": time.perf_counter() - start,
            }
        )


async def _run_all(engine, raw: Request, sentences: list[str], cfg: TranslationConfig):
    """Every sentence as one engine request, all submitted together; their texts in order. A
    client that leaves (the page's Stop) aborts whatever is still running."""
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
    shared = shared_prefix([job.prompt_ids for job in jobs])
    if len(jobs) > 1 and shared:  # the instruction computed once: a prefix-cache hit for all
        await _run(FanOut(engine, [Job(0, f"{rid}-prefix", shared, PRIME)], raw), [""])
    return await _run(FanOut(engine, jobs, raw), [""] * len(jobs))


async def _run(fan: FanOut, texts: list[str]) -> list[str]:
    try:
        await fan.start()
        async for idx, out in fan.outputs(check_disconnect=True):
            if out.finished:
                texts[idx] = out.text
    except ClientGone:
        return texts  # nobody reads the answer
    finally:
        fan.close()
    return texts
