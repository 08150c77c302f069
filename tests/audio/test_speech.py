"""Speech in: WAV checks, word error rate, Whisper tiny.en against the human transcripts of
Debian's LibriVox clips, `POST /v1/audio/transcriptions` through the official `openai` client on
a real `miaotui serve`, and `miaotui transcribe`.

The references are independent: the clips' own transcripts (pocketsphinx-testdata), PyAV's
decoder (faster_whisper.decode_audio) for our WAV reader, and the parts' own bytes for base's
joined model file."""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import wave

import httpx
import numpy as np
import openai
import pytest

from miaotui import cli
from miaotui.audio.wav import AudioError, read_wav
from miaotui.audio.wer import normalize, word_error_rate
from miaotui.audio.whisper import BASE_DISTS, SpeechRecognizer, model_dir
from tests.helpers import APP_API_KEY, REPO, librivox_clips

TINY_EN_MAX_WER = 0.15


def wav_bytes(samples: np.ndarray, rate: int = 16000, channels: int = 1, width: int = 2) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(samples.tobytes())
    return buf.getvalue()


@pytest.fixture(scope="module")
def clips():
    return librivox_clips()


@pytest.fixture(scope="module")
def speech():
    return SpeechRecognizer(threads=1)


# ---- WAV and WER ------------------------------------------------------------------------------


def test_read_wav_equals_pyav_decoding(clips):
    from faster_whisper import decode_audio

    path = clips[0][0]
    ours = read_wav(path.read_bytes())
    theirs = decode_audio(str(path), sampling_rate=16000)
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_stereo_is_averaged_to_mono():
    left = (np.sin(np.arange(1600) / 10) * 10000).astype("<i2")
    right = np.zeros_like(left)
    stereo = np.stack([left, right], axis=1).reshape(-1)
    got = read_wav(wav_bytes(stereo, channels=2))
    np.testing.assert_allclose(got, left.astype(np.float32) / 32768 / 2, atol=1e-6)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty"),
        (b"this is not audio at all, just some text", "not a PCM WAV"),
        (wav_bytes(np.zeros(4410, "<i2"), rate=44100), "44100 Hz"),
        (wav_bytes(np.zeros(0, "<i2")), "no samples"),
        (wav_bytes(np.zeros(16000 * 3, "<i2")), "at most 2 s"),
    ],
    ids=["empty", "not-audio", "wrong-rate", "no-samples", "too-long"],
)
def test_bad_audio_is_refused_with_the_reason(data, message):
    with pytest.raises(AudioError, match=message):
        read_wav(data, max_seconds=2)


def test_word_error_rate_counts_edits_after_normalising():
    # "b" substituted, "d" deleted: 2 edits over 4 reference words; case, punctuation, hyphens
    # and spelled-out titles do not count.
    assert word_error_rate(["a b c d"], ["A x, c."]) == 0.5
    assert word_error_rate(["an ill disposed mister smith"], ["An ill-disposed Mr. Smith!"]) == 0
    assert word_error_rate(["one two", "three"], ["one two three", ""]) == 2 / 3
    assert normalize("Cold-hearted, isn't it?") == ["cold", "hearted", "isn't", "it"]


# ---- Whisper --------------------------------------------------------------------------------


def test_tiny_en_word_error_rate_on_librivox(clips, speech):
    hypotheses = [speech.transcribe(read_wav(p.read_bytes())).text for p, _ in clips]
    wer = word_error_rate([ref for _, ref in clips], hypotheses)
    assert wer <= TINY_EN_MAX_WER, f"tiny.en WER {wer:.3f}: {hypotheses}"


def test_base_parts_are_joined_once_into_the_cache(tmp_path):
    import importlib.metadata

    parts = []
    for dist, suffix in zip(BASE_DISTS, ("model.bin.part1", "model.bin.part2")):
        files = importlib.metadata.files(dist)
        parts.append(next(f for f in files if str(f).endswith(suffix)).locate())
    target = model_dir("base", tmp_path)
    joined = target / "model.bin"
    want = hashlib.sha256()
    for part in parts:
        want.update(open(part, "rb").read())
    assert hashlib.sha256(joined.read_bytes()).hexdigest() == want.hexdigest()
    assert {"config.json", "tokenizer.json", "vocabulary.txt"} <= {p.name for p in target.iterdir()}
    before = joined.stat().st_mtime_ns
    assert model_dir("base", tmp_path) == target
    assert joined.stat().st_mtime_ns == before  # not written again


def test_bad_model_or_language_is_refused(speech):
    from miaotui.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="English only"):
        speech.transcribe(np.zeros(16000, np.float32), "tiny.en", "fr")
    with pytest.raises(InvalidRequestError, match="unknown language 'xx'"):
        speech.transcribe(np.zeros(16000, np.float32), "base", "xx")
    with pytest.raises(InvalidRequestError, match="unknown speech model 'large'"):
        speech.transcribe(np.zeros(16000, np.float32), "large")


def test_serving_path_does_not_import_faster_whisper():
    code = (
        "import sys, miaotui.server.openai, miaotui.cli; miaotui.cli.build_parser(); "
        "print(sorted(m for m in ('faster_whisper', 'ctranslate2', 'av') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ---- the endpoint and the CLI -----------------------------------------------------------------


def test_openai_client_transcribes_through_the_server(app_server, clips):
    client = openai.OpenAI(base_url=app_server + "/v1", api_key=APP_API_KEY, max_retries=0)
    paths, refs = [p for p, _ in clips[:2]], [r for _, r in clips[:2]]
    texts = []
    for path in paths:
        with open(path, "rb") as f:
            texts.append(client.audio.transcriptions.create(model="whisper-1", file=f).text)
    assert word_error_rate(refs, texts) <= TINY_EN_MAX_WER, texts

    with open(paths[0], "rb") as f:
        plain = client.audio.transcriptions.create(
            model="whisper-1", file=f, response_format="text"
        )
    assert plain.strip() == texts[0]
    with open(paths[0], "rb") as f:
        verbose = client.audio.transcriptions.create(
            model="whisper-1", file=f, response_format="verbose_json", language="en"
        )
    assert verbose.text == texts[0] and verbose.language == "en"
    assert "".join(s.text for s in verbose.segments).strip() == texts[0]
    assert verbose.duration == pytest.approx(len(read_wav(paths[0].read_bytes())) / 16000)
    assert 0 <= verbose.segments[0].start < verbose.segments[-1].end <= verbose.duration + 0.5


def test_bad_audio_gets_400_and_the_server_keeps_serving(app_server, clips):
    url = app_server + "/v1/audio/transcriptions"
    auth = {"Authorization": f"Bearer {APP_API_KEY}"}
    cases = {
        "empty": (b"", "empty"),
        "text": (b"hello, I am not a recording", "not a PCM WAV"),
        "rate": (wav_bytes(np.zeros(8000, "<i2"), rate=8000), "8000 Hz"),
        "long": (wav_bytes(np.zeros(16000 * 601, "<i2")), "at most 600 s"),
    }
    for name, (data, message) in cases.items():
        r = httpx.post(url, files={"file": ("a.wav", data)}, headers=auth, timeout=60)
        assert r.status_code == 400, (name, r.text)
        assert message in r.json()["error"]["message"] and r.json()["error"]["param"] == "file"
    r = httpx.post(
        url,
        files={"file": ("a.wav", clips[1][0].read_bytes())},
        data={"response_format": "srt"},
        headers=auth,
    )
    assert r.status_code == 400 and "response_format" in r.json()["error"]["message"]
    r = httpx.post(url, files={"file": ("a.wav", clips[1][0].read_bytes())}, headers=auth)
    assert r.status_code == 200 and word_error_rate([clips[1][1]], [r.json()["text"]]) < 0.5
    r = httpx.post(url, files={"file": ("a.wav", clips[1][0].read_bytes())})
    assert r.status_code == 401  # the API key guards it like every /v1 route


def test_transcribe_cli(clips, tmp_path, capsys):
    paths = [str(p) for p, _ in clips[:2]]
    cmd = [sys.executable, "-m", "miaotui.cli", "transcribe", *paths, "--threads", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert word_error_rate([r for _, r in clips[:2]], lines) <= TINY_EN_MAX_WER, lines

    bad = tmp_path / "bad.wav"
    bad.write_bytes(wav_bytes(np.zeros(4410, "<i2"), rate=44100))
    assert cli.main(["transcribe", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "44100 Hz" in err and len(err.strip().splitlines()) == 1, err
