"""Document translation, batched against one sentence at a time, in the same run: the opening
of Pride and Prejudice (40 sentences, read in place from shared/data) translated with every
sentence submitted at once (continuous batching), then with one `translate_sentences` call per
sentence. Prints JSON: sentences/s both ways, the speed-up, how many translations agree, the
native step's threads and the 1-minute load average before and after. Each way is timed
`--repeats` times, alternated, and the best time counts: on this shared 2-core machine one
run of either swings by 20-30 % from one minute to the next (the median of the rounds' own
ratios is printed too).

Each timed run starts from the same KV cache: nothing cached but the instruction the sentences
share (a warm server's state). Run right after the batched one, one at a time would find every
sentence's prompt in the prefix cache, which no user translating a new sentence gets; that
figure is printed too (`after_batched`), for comparison with earlier runs.

    .venv/bin/python bench/bench_translate.py [--to fr] [--model smollm2-135m] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from miaotui.llm import LLM
from miaotui.translate import (
    BLOCK_SIZE,
    MAX_NUM_BATCHED_TOKENS,
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
        default=MAX_NUM_BATCHED_TOKENS,
        help="step token budget",
    )
    ap.add_argument(
        "--block-size",
        type=int,
        default=BLOCK_SIZE,
        help="KV block: the sentences' shared instruction is prefix-cached in whole blocks only",
    )
    ap.add_argument("--repeats", type=int, default=5, help="best of: each way, alternated")
    a = ap.parse_args()
    llm = LLM(
        a.model,
        threads=a.threads,
        max_num_seqs=SENTENCES,
        max_model_len=1024,
        max_num_batched_tokens=a.max_num_batched_tokens,
        block_size=a.block_size,
    )
    config = TranslationConfig(a.to, max_tokens=a.max_tokens)
    text = opening(SENTENCES)
    doc = split_document(text)
    assert len(doc.sentences) == SENTENCES, len(doc.sentences)
    load_before = os.getloadavg()[0]

    def fresh() -> None:
        """Only the shared instruction cached (and the kernels warm): what both runs start from."""
        assert llm.engine.block_pool.reset_prefix_cache()
        translate_with_llm(llm, "Warm up the kernels.", config)

    def one_at_a_time() -> tuple[list[str], float]:
        start = time.perf_counter()
        out = [translate_sentences(llm, [s], config)[0] for s in doc.sentences]
        return out, time.perf_counter() - start

    times: dict[str, list[float]] = {"batched": [], "after_batched": [], "alone": []}
    for _ in range(a.repeats):  # alternated, so a busy spell hits both ways alike
        fresh()
        start = time.perf_counter()
        batched = translate_sentences(llm, doc.sentences, config)
        times["batched"].append(time.perf_counter() - start)
        after_batched, seconds = one_at_a_time()  # the batched run's prompts still cached
        times["after_batched"].append(seconds)
        fresh()
        alone, seconds = one_at_a_time()
        times["alone"].append(seconds)
    batched_s, alone_s, after_batched_s = (
        min(times[k]) for k in ("batched", "alone", "after_batched")
    )
    print(
        json.dumps(
            {
                "model": a.model or "smollm2-135m",
                "target": a.to,
                "sentences": SENTENCES,
                "paragraphs": len(doc.paragraphs),
                "max_num_batched_tokens": a.max_num_batched_tokens,
                "block_size": a.block_size,
                "threads": getattr(llm.engine.runner.model, "threads", a.threads),
                "batched_s": round(batched_s, 2),
                "one_at_a_time_s": round(alone_s, 2),
                "batched_sentences_per_s": round(SENTENCES / batched_s, 2),
                "one_at_a_time_sentences_per_s": round(SENTENCES / alone_s, 2),
                "speedup": round(alone_s / batched_s, 2),
                "speedup_median_of_rounds": round(
                    statistics.median(a / b for a, b in zip(times["alone"], times["batched"])), 2
                ),
                "sentences_translated_alike": sum(x == y for x, y in zip(batched, alone)),
                "after_batched_one_at_a_time_s": round(after_batched_s, 2),
                "after_batched_speedup": round(after_batched_s / batched_s, 2),
                "after_batched_alike": sum(x == y for x, y in zip(batched, after_batched)),
                "loadavg_before": round(load_before, 2),
                "loadavg_after": round(os.getloadavg()[0], 2),
                "repeats_s": {k: [round(t, 2) for t in v] for k, v in times.items()},
                "sample": doc.assemble(batched).split("\n\n")[:2],
            },
            indent=2,
            ensure_ascii=False,
        )
    )


if __name__ == "__main__":
    main()
