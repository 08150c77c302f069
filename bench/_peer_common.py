"""Helpers shared by the peer scripts that run inside the peer venv (never imported by miaotui).

Each `_peer_*.py` script prints exactly one JSON object on its last stdout line; `peers.py` parses it.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

# Used when no text file is given: any English prose works, the benchmarks only need real tokens.
_FALLBACK_TEXT = (
    "The history of computing is a story of machines that became smaller, faster and cheaper with "
    "every decade. Early computers filled rooms and consumed as much power as a small town; their "
    "programs were entered with switches and punched cards. The invention of the transistor and then "
    "of the integrated circuit changed everything, and by the end of the twentieth century a pocket "
    "telephone held more computing power than the machines that guided the first spacecraft to the "
    "Moon. Language models are a recent chapter of this story: programs that predict the next word "
    "of a text, trained on large collections of books, articles and conversations. "
)


def rss_mb() -> float:
    """Current resident set size of this process in MiB (from /proc)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def read_text(text_file: str | None) -> str:
    """The prompt source: the given file, or a built-in paragraph repeated."""
    if text_file and Path(text_file).is_file():
        return Path(text_file).read_text(encoding="utf-8")
    return _FALLBACK_TEXT * 200


def token_windows(ids: list[int], n_tokens: int, count: int) -> list[list[int]]:
    """`count` distinct windows of exactly `n_tokens` ids, taken one after another (wrapping)."""
    need = n_tokens * count
    while len(ids) < need:
        ids = ids + ids
    return [ids[i * n_tokens : (i + 1) * n_tokens] for i in range(count)]


def set_threads_env(threads: int) -> None:
    """Pin the thread pools before torch/ctranslate2 are imported."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)


def emit(result: dict) -> None:
    """Print the result as the last stdout line, for peers.py to parse."""
    sys.stdout.write("\n" + json.dumps(result) + "\n")
    sys.stdout.flush()


class Clock:
    """Wall-clock stopwatch: `with Clock() as c: ...; c.seconds`."""

    def __enter__(self) -> Clock:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start


def ppl_chunks(ids: list[int], ctx: int, chunks: int) -> list[list[int]]:
    """llama-perplexity's windows: consecutive, non-overlapping chunks of `ctx` tokens from the start.

    In each chunk only the predictions of tokens ctx/2+1 .. ctx-1 are scored (ctx - ctx/2 - 1 of
    them), the first half being context; no BOS is inserted (SmolLM2's GGUF has add_bos_token=false).
    """
    n = min(chunks, len(ids) // ctx)
    return [ids[i * ctx : (i + 1) * ctx] for i in range(n)]


def summarize_nll(window_nll: float, n_tokens: int, chunk_nlls: list[float], ctx: int) -> dict:
    """The result dict shared by the nll modes of the peer scripts."""
    import math

    res = {
        "n_tokens": n_tokens,
        "scored_tokens": n_tokens - 1,
        "nll": round(window_nll, 6),
        "ppl": round(math.exp(window_nll), 4),
    }
    if chunk_nlls:
        mean = sum(chunk_nlls) / len(chunk_nlls)  # equal counts per chunk
        res.update(
            chunked_ctx=ctx,
            chunked_chunks=len(chunk_nlls),
            chunked_scored_tokens=len(chunk_nlls) * (ctx - ctx // 2 - 1),
            chunked_nll=round(mean, 6),
            chunked_ppl=round(math.exp(mean), 4),
        )
    return res
