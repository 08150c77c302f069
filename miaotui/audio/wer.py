"""Word error rate: (substitutions + deletions + insertions) / reference words, after the usual
English normalisation (lower case, no punctuation, hyphens split, titles spelled out as in
Whisper's EnglishTextNormalizer: "Mr." and "mister" count as the same word)."""

from __future__ import annotations

import re

_TITLES = {"mr": "mister", "mrs": "missus", "dr": "doctor", "st": "saint"}


def normalize(text: str) -> list[str]:
    text = re.sub(r"[-–—]", " ", text.lower())
    text = re.sub(r"[^\w\s']", " ", text)
    return [_TITLES.get(w, w) for w in text.split()]


def edit_distance(ref: list[str], hyp: list[str]) -> int:
    """Levenshtein distance over words (one row of the dynamic programme at a time)."""
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1]


def word_error_rate(references: list[str], hypotheses: list[str]) -> float:
    """Corpus WER: all edits over all reference words (not a mean of per-utterance rates)."""
    pairs = [(normalize(r), normalize(h)) for r, h in zip(references, hypotheses, strict=True)]
    words = sum(len(r) for r, _ in pairs)
    if words == 0:
        raise ValueError("the references have no words")
    return sum(edit_distance(r, h) for r, h in pairs) / words
