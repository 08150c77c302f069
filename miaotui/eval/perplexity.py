"""Perplexity over a text file with a fixed window and stride (the HF recipe): each window
scores only the tokens not scored by the previous one, with up to `window - stride` tokens of
context before them."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from miaotui.model.kv_cache import KVCache
from miaotui.model.standalone import forward_sequences, token_logprobs


@dataclass(frozen=True)
class PerplexityResult:
    nll: float
    """Mean negative log-likelihood per scored token (nats)."""
    perplexity: float
    num_tokens: int
    window: int
    stride: int


def perplexity_of_ids(
    model,
    ids: list[int],
    window: int = 512,
    stride: int = 256,
    progress: bool = False,
    kv_cache: type[KVCache] = KVCache,
) -> PerplexityResult:
    if len(ids) < 2:
        raise ValueError("need at least two tokens to score")
    total, count = 0.0, 0
    prev_end = 0
    starts = list(range(0, max(1, len(ids) - 1), stride))
    for begin in _progress(starts, progress):
        end = min(begin + window, len(ids))
        seq = ids[begin:end]
        logp = token_logprobs(forward_sequences(model, [seq], kv_cache)[0], seq)  # (len-1,)
        new = end - max(prev_end, begin + 1)  # tokens not yet scored
        if new > 0:
            total -= float(logp[-new:].double().sum())
            count += new
        prev_end = end
        if end == len(ids):
            break
    nll = total / count
    return PerplexityResult(nll, math.exp(nll), count, window, stride)


def perplexity(
    model,
    tokenizer,
    path: Path,
    max_tokens: int | None = 4096,
    window: int = 512,
    stride: int = 256,
    progress: bool = False,
    kv_cache: type[KVCache] = KVCache,
) -> PerplexityResult:
    """Perplexity of the first `max_tokens` tokens of a text file (read in place)."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    if max_tokens is not None:
        text = text[: max_tokens * 8]
    ids = tokenizer.encode(text, add_special=False)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return perplexity_of_ids(model, ids, window, stride, progress, kv_cache)


def _progress(items, enabled: bool):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc="perplexity", unit="window", leave=False)
