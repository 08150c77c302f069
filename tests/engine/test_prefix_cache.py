"""Prefix caching end to end on a tiny random fp32 model: a request that reuses cached KV blocks
generates exactly what it generates with caching off (fp32 keeps the difference between
computing a prompt whole and reading part of it from the cache at rounding level), and the hits
show in `num_cached_tokens`, in `usage.prompt_tokens_details.cached_tokens` and in /metrics.
The real model's hits over HTTP are checked in test_server.py."""

from __future__ import annotations

import httpx
import openai
import pytest

from miaotui.config import CacheConfig, EngineConfig
from miaotui.engine.async_engine import AsyncEngine
from miaotui.llm import LLM
from miaotui.loader import engine_for_model
from miaotui.sampling_params import SamplingParams
from tests.helpers import BYTE_EOS, byte_tokenizer, serve_in_thread, tiny_transformer

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_thread")]

BS = 4  # small blocks: many of them per prompt
EOS = BYTE_EOS


@pytest.fixture(scope="module")
def tiny():
    return tiny_transformer(seed=1, max_seq_len=512), byte_tokenizer()


def engine_config(caching: bool, num_blocks: int = 128, **kw) -> EngineConfig:
    kw.setdefault("max_num_batched_tokens", 32)  # long prompts take several chunks
    cache = CacheConfig(block_size=BS, num_blocks=num_blocks, enable_prefix_caching=caching)
    return EngineConfig.from_kwargs(device="cpu", max_model_len=256, cache=cache, **kw)


def make_llm(tiny, caching: bool, **kw) -> LLM:
    model, tok = tiny
    return LLM.from_engine(engine_for_model(model, tok, engine_config(caching, **kw)))


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


SYSTEM = "You are a careful assistant. Answer briefly and precisely. "  # 15 blocks


def conversation() -> list[tuple[str, int]]:
    """Prompts that share prefixes in every way a cache can be hit: a common system prompt, the
    same prompt twice, one prompt inside another, a prompt cut in the middle of a block."""
    return [
        (SYSTEM + "What is the sea?", 9),
        (SYSTEM + "What is the sky?", 6),
        (SYSTEM + "What is the sea?", 9),  # identical: all but the last block hit
        (SYSTEM + "What is the sea? And the land?", 5),
        (SYSTEM[:30], 7),  # a prefix of the others, ending mid-block
        ("Something else entirely, sharing nothing.", 4),
    ]


def test_cached_prefixes_generate_what_uncached_do(tiny):
    on, off = make_llm(tiny, caching=True), make_llm(tiny, caching=False)
    for prompt, n in conversation():  # one at a time: each sees the cache the others left
        cached = on.generate(prompt, greedy(n))[0]
        plain = off.generate(prompt, greedy(n))[0]
        assert cached.token_ids == plain.token_ids, prompt
        assert cached.text == plain.text
    pool_on, pool_off = on.engine.block_pool, off.engine.block_pool
    assert pool_on.prefix_hits > 0 and pool_off.prefix_hits == 0
    assert pool_on.num_free_blocks == pool_on.num_usable_blocks


def test_multi_turn_reuses_the_previous_answer(tiny):
    """Turn 2's prompt is turn 1's prompt + answer + more: the blocks of the answer, computed
    while decoding, are hit too."""
    on, off = make_llm(tiny, caching=True), make_llm(tiny, caching=False)
    first = on.generate(SYSTEM + "Q1?", greedy(12))[0]
    turn2 = first.prompt_token_ids + first.token_ids + on.tokenizer.encode(" Q2?")
    hits = on.engine.block_pool.prefix_hits
    second = on.generate(turn2, greedy(8))[0]
    computed = len(first.prompt_token_ids) + len(first.token_ids) - 1  # not the last sampled
    assert on.engine.block_pool.prefix_hits - hits == computed // BS * BS
    assert second.token_ids == off.generate(turn2, greedy(8))[0].token_ids


def test_batched_shared_prefix_with_preemption(tiny):
    """Eight requests with a common prefix at once, in a pool too small for all of them: some
    are preempted and recompute from the blocks they left in the cache. Same tokens as with
    caching off and as each alone."""
    prompts = [SYSTEM + f"Question number {i}?" for i in range(8)]
    n = 24
    kw = dict(num_blocks=66, max_num_seqs=8, max_num_batched_tokens=128)
    on, off = make_llm(tiny, caching=True, **kw), make_llm(tiny, caching=False, **kw)
    together_on = on.generate(prompts, greedy(n))
    together_off = off.generate(prompts, greedy(n))
    assert on.engine.scheduler.num_preemptions > 0  # the pool was too small
    assert off.engine.scheduler.num_preemptions > 0
    alone = make_llm(tiny, caching=False)
    for p, a, b in zip(prompts, together_on, together_off):
        assert a.token_ids == b.token_ids == alone.generate(p, greedy(n))[0].token_ids
    assert on.engine.block_pool.prefix_hits > 0


# ---- over HTTP -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny):
    from miaotui.server.openai import ServerConfig, create_app

    model, tok = tiny
    engine = AsyncEngine(engine_for_model(model, tok, engine_config(caching=True)), "tiny")
    try:
        with serve_in_thread(create_app(engine, ServerConfig(model_name="tiny"))) as url:
            yield url
    finally:
        engine.shutdown()


def prefix_hits(url: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("miaotui_prefix_cache_hits_total"):
            return float(line.split()[-1])
    raise AssertionError("miaotui_prefix_cache_hits_total missing from /metrics")


def test_http_cached_tokens_and_metrics(tiny, server):
    client = openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0)
    off = make_llm(tiny, caching=False)
    prompt = SYSTEM + "Tell me about caches."
    expected = 4 * ((len(off.tokenizer.encode(prompt)) - 1) // 4)
    kw = dict(model="tiny", prompt=prompt, max_tokens=6, temperature=0)
    kw["extra_body"] = {"ignore_eos": True}
    before = prefix_hits(server)
    cold = client.completions.create(**kw)
    assert cold.usage.prompt_tokens_details.cached_tokens == 0
    warm = client.completions.create(**kw)
    assert warm.usage.prompt_tokens_details.cached_tokens == expected > 0
    assert prefix_hits(server) == before + expected
    reference = off.generate(prompt, greedy(6))[0].text
    assert warm.choices[0].text == cold.choices[0].text == reference

    # Streaming, n = 2: both choices hit the cache and stream what the cold request produced.
    chunks = list(client.completions.create(**kw, n=2, stream=True))
    texts = ["", ""]
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] += ch.text
    assert texts == [reference, reference]
    usage = client.completions.create(**kw, n=2).usage
    assert usage.prompt_tokens_details.cached_tokens == expected  # the prompt counts once
