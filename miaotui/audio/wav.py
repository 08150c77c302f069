"""WAV bytes -> the float32 16 kHz mono samples Whisper reads, with a clear error for what it
cannot read: not a WAV, no samples, too long, another sample rate, a format other than PCM."""

from __future__ import annotations

import io
import wave

import numpy as np

from miaotui.errors import InvalidRequestError

SAMPLE_RATE = 16_000
"""Whisper's input rate (its log-mel front end is defined at 16 kHz)."""
MAX_SECONDS = 600.0
MAX_BYTES = 25 * 1024 * 1024
"""OpenAI's upload limit for /v1/audio/transcriptions."""
_CONVERT = (
    "convert it with `sox IN -r 16000 -c 1 -b 16 OUT.wav` or `ffmpeg -i IN -ar 16000 -ac 1 OUT.wav`"
)


class AudioError(InvalidRequestError):
    """Audio that cannot be transcribed; the message says why and how to fix it."""

    def __init__(self, message: str):
        super().__init__(message, "file")


def read_wav(data: bytes, max_seconds: float = MAX_SECONDS) -> np.ndarray:
    """PCM WAV bytes (8/16/32-bit integer, any channel count, 16 kHz) -> float32 mono in [-1, 1]."""
    if not data:
        raise AudioError("the audio file is empty (0 bytes)")
    if len(data) > MAX_BYTES:
        raise AudioError(f"the audio file has {len(data)} bytes; at most {MAX_BYTES}")
    try:
        with wave.open(io.BytesIO(data)) as w:
            rate, channels, width, frames = (
                w.getframerate(),
                w.getnchannels(),
                w.getsampwidth(),
                w.getnframes(),
            )
            raw = w.readframes(frames)
    except (wave.Error, EOFError, ValueError) as e:
        raise AudioError(f"not a PCM WAV file ({e}); {_CONVERT}") from e
    if rate != SAMPLE_RATE:
        raise AudioError(
            f"the audio is sampled at {rate} Hz, Whisper reads {SAMPLE_RATE}; {_CONVERT}"
        )
    frames = len(raw) // (width * channels)
    if frames == 0:
        raise AudioError("the audio has no samples")
    if frames / rate > max_seconds:
        raise AudioError(
            f"the audio lasts {frames / rate:.1f} s; at most {max_seconds:.0f} s per request"
        )
    return _to_float_mono(raw[: frames * width * channels], width, channels)


def _to_float_mono(raw: bytes, width: int, channels: int) -> np.ndarray:
    if width == 1:  # 8-bit WAV is unsigned
        x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        x = np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
    elif width == 4:
        x = np.frombuffer(raw, "<i4").astype(np.float32) / 2147483648.0
    else:
        raise AudioError(f"{8 * width}-bit WAV samples are not supported (8, 16 or 32); {_CONVERT}")
    return x.reshape(-1, channels).mean(axis=1).astype(np.float32)
