"""`miaotui transcribe FILE.wav`: speech to text with Whisper (tiny.en by default, --model base)."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from miaotui.audio.whisper import ALIASES, DEFAULT_MODEL
from miaotui.errors import InvalidRequestError


def register(sub) -> None:
    p = sub.add_parser("transcribe", help="speech to text (16 kHz WAV) with Whisper")
    p.add_argument("audio", type=Path, nargs="+", help="16 kHz PCM WAV files")
    p.add_argument("--model", default=DEFAULT_MODEL, choices=sorted(ALIASES))
    p.add_argument("--language", default=None, help="ISO-639-1 code (tiny.en: en only)")
    p.add_argument("--format", choices=["text", "json", "verbose_json"], default="text")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: CTranslate2's choice)")
    p.set_defaults(func=cmd_transcribe)


def cmd_transcribe(a: argparse.Namespace) -> None:
    from miaotui.audio.wav import read_wav
    from miaotui.audio.whisper import SpeechRecognizer

    clips = []
    for path in a.audio:  # every file is checked before a model is loaded
        try:
            clips.append(read_wav(path.read_bytes()))
        except OSError as e:
            raise InvalidRequestError(f"cannot read {path}: {e.strerror}") from e
        except InvalidRequestError as e:
            raise InvalidRequestError(f"{path}: {e}") from e
    speech = SpeechRecognizer(threads=a.threads)
    for path, samples in zip(a.audio, clips):
        t = speech.transcribe(samples, a.model, a.language)
        if a.format == "text":
            print(t.text)
        elif a.format == "json":
            print(json.dumps({"file": str(path), "text": t.text}))
        else:
            print(json.dumps(dict(asdict(t), file=str(path))))
