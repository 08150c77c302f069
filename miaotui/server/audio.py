"""`POST /v1/audio/transcriptions`, OpenAI's shape: multipart `file` (16 kHz PCM WAV), `model`
(whisper-1 = tiny.en, or base), `language`, `prompt`, `temperature`, `response_format` json |
text | verbose_json (with segments). Bad audio is a 400 naming what is wrong. Whisper runs in
a worker thread, so the event loop keeps streaming the LLM's tokens meanwhile."""

from __future__ import annotations

import asyncio
from dataclasses import asdict

from fastapi import FastAPI, File, Form, UploadFile
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from miaotui.audio.wav import MAX_BYTES, read_wav
from miaotui.audio.whisper import SpeechRecognizer, Transcript, resolve_model_name
from miaotui.errors import InvalidRequestError
from miaotui.server.errors import APIError

FORMATS = ("json", "text", "verbose_json")


def install_transcriptions(app: FastAPI, recognizer: SpeechRecognizer | None = None) -> None:
    speech = recognizer or SpeechRecognizer()

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(
        file: UploadFile = File(...),
        model: str = Form("whisper-1"),
        language: str | None = Form(None),
        prompt: str | None = Form(None),
        response_format: str = Form("json"),
        temperature: float = Form(0.0, ge=0.0, le=1.0),
    ) -> Response:
        if response_format not in FORMATS:
            raise APIError(
                400,
                f"response_format {response_format!r} is not supported; use one of {FORMATS}",
                "response_format",
            )
        data = await file.read(MAX_BYTES + 1)
        try:
            resolve_model_name(model)
            samples = read_wav(data)
            transcript = await asyncio.to_thread(
                speech.transcribe, samples, model, language, prompt, temperature
            )
        except InvalidRequestError as e:
            raise APIError(400, str(e), e.param) from e
        return _response(transcript, response_format)


def _response(t: Transcript, response_format: str) -> Response:
    if response_format == "text":
        return PlainTextResponse(t.text + "\n")
    if response_format == "json":
        return JSONResponse({"text": t.text})
    return JSONResponse(
        {
            "task": "transcribe",
            "language": t.language,
            "duration": t.duration,
            "text": t.text,
            "segments": [dict(asdict(s), seek=0, tokens=list(s.tokens)) for s in t.segments],
        }
    )
