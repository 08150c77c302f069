"""Streaming text: IncrementalDetokenizer never shows a broken character and its deltas add up to
the full decode; StopStringMatcher never shows part of a stop string and cuts where the first
stop string ends, however the text is split into deltas."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from miaotui.load.gguf_file import read_gguf
from miaotui.tokenizer import IncrementalDetokenizer, StopStringMatcher, TextTokenizer
from tests.helpers import default_model_path

MULTIBYTE = [
    "😀👍🏽🇫🇷 emoji",
    "猫が好きです。你好，世界！한국어",
    "mixed 🤖 text with CJK 漢字 and ümläuts",
    "👨‍👩‍👧‍👦 family, 🏳️‍🌈 flag",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 and 🀄🃏",
]


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return TextTokenizer.from_gguf_metadata(read_gguf(default_model_path()).tokenizer_source)


def _stream(tok: TextTokenizer, ids: list[int], prompt: list[int] | None = None) -> list[str]:
    detok = IncrementalDetokenizer(tok, prompt)
    return [detok.add(i) for i in ids]


def test_split_characters_exist_in_these_texts(tok):
    """The texts do put multi-byte characters across tokens (else the test proves nothing)."""
    split = 0
    for text in MULTIBYTE:
        split += sum("\ufffd" in tok.decode([i]) for i in tok.encode(text))
    assert split >= 10


@pytest.mark.parametrize("text", MULTIBYTE)
def test_no_replacement_character_and_deltas_add_up(tok, text):
    ids = tok.encode(text)
    deltas = _stream(tok, ids)
    assert all("\ufffd" not in d for d in deltas), deltas
    assert "".join(deltas) == tok.decode(ids) == text


@pytest.mark.parametrize("text", MULTIBYTE)
def test_with_prompt_context(tok, text):
    """Continuing a prompt: the deltas are the decode of prompt + output minus the prompt's."""
    prompt = tok.encode("Once upon a time 🐉")
    ids = tok.encode(text)
    deltas = _stream(tok, ids, prompt)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == tok.decode(prompt + ids)[len(tok.decode(prompt)) :]


ALPHABET = "ab \n猫🤖é😀👍🏽漢字"


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=ALPHABET, max_size=30))
def test_any_text_streams_cleanly(tok, text):
    ids = tok.encode(text)
    deltas = _stream(tok, ids)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text


@settings(max_examples=100, deadline=None)
@given(ids=st.lists(st.integers(17, 49151), max_size=20))
def test_any_ids_stream_to_the_full_decode(tok, ids):
    """Arbitrary token sequences (incomplete UTF-8 left at the end is held back; a sequence that
    can never complete is emitted once the next character starts)."""
    deltas = _stream(tok, ids)
    full = tok.decode(ids)
    joined = "".join(deltas)
    assert full.startswith(joined)
    assert full[len(joined) :].strip("\ufffd") == ""  # only an unfinished tail is held


def test_special_tokens_are_skipped_or_kept(tok):
    ids = tok.encode("hi<|im_end|>there")
    assert "".join(_stream(tok, ids)) == "hithere"
    detok = IncrementalDetokenizer(tok, None, skip_special=False)
    assert "".join(detok.add(i) for i in ids) == "hi<|im_end|>there"


# ---- stop strings ---------------------------------------------------------------------------


def expected_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """Reference semantics: generation stops as soon as some stop string is complete, i.e. at the
    smallest end position of any occurrence; the output is the text before that occurrence (the
    longest such occurrence when several end at the same place)."""
    best = None
    for s in stops:
        if not s:
            continue
        i = text.find(s)
        if i >= 0:
            key = (i + len(s), i)
            best = key if best is None or key < best else best
    if best is None:
        return text, False
    return text[: best[1]], True


def _feed(stops: list[str], deltas: list[str]) -> tuple[list[str], bool]:
    m = StopStringMatcher(stops)
    emitted: list[str] = []
    for d in deltas:
        out, stopped = m.feed(d)
        emitted.append(out)
        if stopped:
            return emitted, True
    emitted.append(m.flush())
    return emitted, False


def _split(text: str, cuts: list[int]) -> list[str]:
    points = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    return [text[a:b] for a, b in zip(points, points[1:])] or [""]


@settings(max_examples=500, deadline=None)
@given(
    text=st.text(alphabet="abc猫\n", max_size=24),
    stops=st.lists(st.text(alphabet="abc猫\n", min_size=1, max_size=4), max_size=3),
    cuts=st.lists(st.integers(0, 24), max_size=10),
)
def test_stop_strings_any_split(text, stops, cuts):
    deltas = _split(text, cuts)
    want, want_stopped = expected_stop(text, stops)
    emitted, stopped = _feed(stops, deltas)
    assert stopped == want_stopped
    assert "".join(emitted) == want
    # Never shows text it later takes back: every emission is a prefix of the final output.
    shown = ""
    for e in emitted:
        shown += e
        assert want.startswith(shown)


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(alphabet="xyz ", max_size=20),
    stop=st.text(alphabet="xyz ", min_size=2, max_size=5),
    cut=st.integers(0, 20),
)
def test_partial_match_is_held_then_released(text, stop, cut):
    """After each delta, exactly the text that cannot start a stop string has been shown."""
    if stop in text:
        return
    m = StopStringMatcher([stop])
    a, _ = m.feed(text[:cut])
    b, _ = m.feed(text[cut:])
    held = max((n for n in range(1, len(stop)) if text.endswith(stop[:n])), default=0)
    assert a + b == text[: len(text) - held]
    assert a + b + m.flush() == text


def test_stop_string_examples():
    assert _feed(["</s>"], ["Hello </", "s> world"]) == (["Hello ", ""], True)
    assert _feed(["\n\n"], ["a\n", "b\n", "\n", "c"]) == (["a", "\nb", ""], True)
    assert _feed(["STOP"], ["ST", "OR", "Y"]) == (["", "STOR", "Y", ""], False)
    assert _feed([], ["any", "thing"]) == (["any", "thing", ""], False)
    # A short stop string completed inside a longer, still unfinished one ends generation there.
    assert _feed(["abcd", "c"], ["ab", "c", "d"])[0] == ["", "ab"]
    assert _feed(["abcd", "c"], ["abcd"])[0] == ["ab"]
