"""Document translation, batched against one sentence at a time, in the same run: the opening
of Pride and Prejudice (40 sentences, read in place from shared/data) translated with every
sentence submitted at once (continuous batching), then with one `generate` call per sentence.
Prints JSON: sentences/s both ways, the speed-up, and how many translations agree.

    .venv/bin/python bench/bench_translate.py [--to fr] [--model smollm2-135m] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from miaotui.llm import LLM
from miaotui.translate import (
    TranslationConfig,
    split_document,
    translate_sentences,
    translate_with_llm,
)

NOVEL = (
    Path(__file__).resolve().parents[1].parent / "shared/data/text/austen_pride_and_prejudice.txt"
)
SENTENCES = 40


def opening(num_sentences: int) -> str:
    """The novel's first paragraphs from Chapter 1, cut at `num_sentences` sentences."""
    text = NOVEL.read_text(encoding="utf-8").split("Chapter 1", 1)[1].split("Chapter 2", 1)[0]
    paragraphs, count = [], 0
    for para in split_document(text).paragraphs:
        take = para[: num_sentences - count]
        paragraphs.append(" ".join(take))
        count += len(take)
        if count == num_sentences:
            break
    return "\n\n".join(paragraphs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--to", default="fr")
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--max-tokens", type=int, default=96, help="per sentence, at most")
    ap.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=128,
        help="prefill chunk: steps of 512 tokens over 40 sequences run at half the speed here",
    )
    a = ap.parse_args()
    llm = LLM(
        a.model,
        threads=a.threads,
        max_num_seqs=SENTENCES,
        max_model_len=1024,
        max_num_batched_tokens=a.max_num_batched_tokens,
    )
    config = TranslationConfig(a.to, max_tokens=a.max_tokens)
    text = opening(SENTENCES)
    doc = split_document(text)
    assert len(doc.sentences) == SENTENCES, len(doc.sentences)
    translate_with_llm(llm, "Warm up the kernels.", config)

    start = time.perf_counter()
    batched = translate_sentences(llm, doc.sentences, config)
    batched_s = time.perf_counter() - start
    start = time.perf_counter()
    alone = [translate_sentences(llm, [s], config)[0] for s in doc.sentences]
    alone_s = time.perf_counter() - start
    agree = sum(a == b for a, b in zip(batched, alone))
    print(
        json.dumps(
            {
                "model": a.model or "smollm2-135m",
                "target": a.to,
                "sentences": SENTENCES,
                "paragraphs": len(doc.paragraphs),
                "max_num_batched_tokens": a.max_num_batched_tokens,
                "batched_s": round(batched_s, 2),
                "one_at_a_time_s": round(alone_s, 2),
                "batched_sentences_per_s": round(SENTENCES / batched_s, 2),
                "one_at_a_time_sentences_per_s": round(SENTENCES / alone_s, 2),
                "speedup": round(alone_s / batched_s, 2),
                "sentences_translated_alike": agree,
                "sample": doc.assemble(batched).split("\n\n")[:2],
            },
            indent=2,
            ensure_ascii=False,
        )
    )


if __name__ == "__main__":
    main()
