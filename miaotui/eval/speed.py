"""Speed of an engine: prefill tok/s, single-stream decode tok/s, batched throughput, time to
first token and peak RSS. Each figure is the best of `repeats` runs (the machine is shared)."""

from __future__ import annotations

import resource
import time
from dataclasses import asdict, dataclass

from miaotui.sampling_params import SamplingParams

FILLER = (
    "The quick brown fox jumps over the lazy dog while the committee reviews the annual "
    "budget, weather reports and the history of early printing presses in Europe. "
)


@dataclass(frozen=True)
class SpeedResult:
    prefill_tok_s: float
    """Prompt tokens per second for one `prompt_tokens`-token prompt (TTFT-based)."""
    ttft_s: float
    decode_tok_s: float
    """Generated tokens per second of one stream, after the first token."""
    batch_tok_s: float
    """Generated tokens per second with `batch` concurrent streams."""
    peak_rss_mib: float
    prompt_tokens: int
    new_tokens: int
    batch: int

    def to_dict(self) -> dict:
        return asdict(self)


def prompt_of(tokenizer, n_tokens: int, salt: int = 0) -> list[int]:
    """A deterministic English prompt of exactly n_tokens tokens (salted to defeat caching)."""
    ids = tokenizer.encode(f"{salt}: " + FILLER * (n_tokens // 10 + 2), add_special=False)
    return ids[:n_tokens]


def measure_speed(
    llm,
    prompt_tokens: int = 512,
    new_tokens: int = 128,
    batch: int = 16,
    batch_prompt_tokens: int = 128,
    repeats: int = 2,
) -> SpeedResult:
    tok = llm.tokenizer
    greedy = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    llm.generate([prompt_of(tok, 16, salt=-1)], greedy)  # warm-up (kernels, allocator)
    ttft = min(
        llm.generate([prompt_of(tok, prompt_tokens, salt=r)], greedy)[0].time_to_first_token
        for r in range(repeats)
    )
    gen = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    decode = max(
        llm.generate([prompt_of(tok, 16, salt=100 + r)], gen)[0].decode_tokens_per_s
        for r in range(repeats)
    )
    best_batch = 0.0
    for r in range(repeats):
        prompts = [
            prompt_of(tok, batch_prompt_tokens, salt=1000 * (r + 1) + i) for i in range(batch)
        ]
        t0 = time.perf_counter()
        outs = llm.generate(prompts, gen)
        dt = time.perf_counter() - t0
        best_batch = max(best_batch, sum(len(o.token_ids) for o in outs) / dt)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return SpeedResult(
        prompt_tokens / ttft, ttft, decode, best_batch, rss, prompt_tokens, new_tokens, batch
    )
