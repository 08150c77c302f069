"""Speech recognition accuracy and speed: word error rate of Whisper tiny.en and base on the five
LibriVox clips of Debian's `pocketsphinx-testdata` (16 kHz WAV, transcripts beside them), and the
real-time factor (seconds of compute per second of audio). Prints JSON.

    .venv/bin/python bench/bench_speech.py [--models tiny.en,base] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

LIBRIVOX = Path("/usr/share/pocketsphinx/test/data/librivox")
"""Where Debian's pocketsphinx-testdata puts the clips."""
_LINE = re.compile(r"^<s>\s*(.*?)\s*</s>\s*\((\S+)\)$")


class LibriVoxMissing(RuntimeError):
    pass


def load_clips(root: Path = LIBRIVOX) -> list[tuple[Path, str]]:
    """(wav path, reference transcript) of every clip listed in `transcription`."""
    listing = root / "transcription"
    if not listing.exists():
        raise LibriVoxMissing(
            f"{listing} not found: the speech tests read Debian's LibriVox clips; "
            "apt-get install -y pocketsphinx-testdata (scripts/setup.sh)"
        )
    clips = []
    for line in listing.read_text().splitlines():
        m = _LINE.match(line.strip())
        if m:
            clips.append((root / f"{m.group(2)}.wav", m.group(1)))
    return clips


def measure(model: str, clips: list[tuple[Path, str]], threads: int) -> dict:
    from miaotui.audio.wav import read_wav
    from miaotui.audio.wer import word_error_rate
    from miaotui.audio.whisper import SpeechRecognizer

    speech = SpeechRecognizer(threads=threads)
    audio = [read_wav(path.read_bytes()) for path, _ in clips]
    t0 = time.perf_counter()
    speech.transcribe(audio[0][:16000], model)  # load the model (and join base's parts)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    hypotheses = [speech.transcribe(a, model).text for a in audio]
    compute_s = time.perf_counter() - t0
    audio_s = sum(len(a) for a in audio) / 16000
    return {
        "model": model,
        "wer": round(word_error_rate([ref for _, ref in clips], hypotheses), 4),
        "real_time_factor": round(compute_s / audio_s, 3),
        "audio_s": round(audio_s, 2),
        "load_s": round(load_s, 2),
        "transcripts": hypotheses,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny.en,base")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    clips = load_clips()
    results = [measure(m, clips, a.threads) for m in a.models.split(",")]
    print(json.dumps({"clips": len(clips), "results": results}, indent=2))


if __name__ == "__main__":
    main()
