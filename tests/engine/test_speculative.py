"""Speculative decoding (engine/speculative.py): the proposer against a brute-force search, and
output with `speculative_method="ngram"` against the same engine without it on the default
model's native step, whose rows are the same bits whether a step scores one token or several."""

from __future__ import annotations

import random

import pytest

from miaotui import CacheConfig, SamplingParams
from miaotui.engine.speculative import SpecState, propose_ngram
from tests.helpers import SHARED, engine_variant


def brute_force_ngram(tokens: list[int], k: int, ngram_max: int) -> list[int]:
    for n in range(min(ngram_max, len(tokens) - 1), 0, -1):
        suffix = tokens[-n:]
        starts = [i for i in range(len(tokens) - n) if tokens[i : i + n] == suffix]
        if starts:
            i = starts[-1]
            return tokens[i + n : i + n + k]
    return []


def test_propose_ngram_matches_a_brute_force_search():
    rng = random.Random(0)
    for _ in range(2000):
        tokens = [rng.randrange(4) for _ in range(rng.randrange(1, 30))]
        k, n_max = rng.randrange(1, 6), rng.randrange(1, 5)
        assert propose_ngram(tokens, k, n_max) == brute_force_ngram(tokens, k, n_max), tokens


def test_backoff_after_misses_and_reset_on_accept():
    s = SpecState()
    s.record(4, 0)
    assert [s.ready() for _ in range(3)] == [False, False, True]  # 2^1 steps skipped
    s.record(4, 0)
    assert [s.ready() for _ in range(5)] == [False] * 4 + [True]
    s.record(4, 2)
    assert s.ready() and s.misses == 0 and (s.proposed, s.accepted) == (12, 2)


def passage() -> str:
    text = (SHARED / "data" / "text" / "wiki_dev.txt").read_text(encoding="utf-8")
    return " ".join(text[5000:5600].split()[:60])


PROMPTS = [
    f"Copy this text word for word.\n\n{passage()}\n\nCopy:",
    "The capital of France is",
    "Count: one, two, three, four, five,",
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n",
]


@pytest.fixture(scope="module")
def engines(smollm_native):
    # block_size 4: proposals and rejections cross block boundaries all the time
    kw = dict(max_model_len=512, cache=CacheConfig(num_blocks=400, block_size=4))
    return (
        engine_variant(smollm_native, **kw),
        engine_variant(smollm_native, speculative_method="ngram", **kw),
    )


def outputs(llm, params):
    return [r.outputs[0] for r in llm.generate(PROMPTS, params)]


def assert_no_leaks(llm):
    engine = llm.engine
    assert not engine.has_unfinished()
    pool = engine.block_pool
    assert pool.num_free_blocks == pool.num_usable_blocks
    engine.scheduler.check_invariants()


def test_greedy_same_tokens_and_logprobs_batched(engines):
    base, spec = engines
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, logprobs=1)
    before = spec.engine.num_spec_accepted
    want, got = outputs(base, params), outputs(spec, params)
    for g, w in zip(got, want, strict=True):
        assert g.token_ids == w.token_ids
        assert [lp.logprob for lp in g.logprobs] == [lp.logprob for lp in w.logprobs]
        assert g.finish_reason == w.finish_reason == "length" and len(g.token_ids) == 40
    assert spec.engine.num_spec_accepted - before > 20  # the copy prompt accepts long runs
    assert_no_leaks(spec)


def test_seeded_sampling_same_tokens(engines):
    base, spec = engines
    params = SamplingParams(max_tokens=32, temperature=0.8, top_p=0.95, seed=11)
    want, got = outputs(base, params), outputs(spec, params)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert_no_leaks(spec)


def test_stop_strings_and_eos_cut_accepted_runs(engines):
    base, spec = engines
    words = passage().split()
    stop = " ".join(words[8:10])  # inside the copied run: accepted tokens past it are dropped
    params = SamplingParams(max_tokens=64, temperature=0.0, stop=[stop], logprobs=0)
    want, got = outputs(base, params), outputs(spec, params)
    for g, w in zip(got, want, strict=True):
        assert (g.text, g.token_ids, g.finish_reason) == (w.text, w.token_ids, w.finish_reason)
        assert len(g.logprobs) == len(g.token_ids)
    assert got[0].finish_reason == "stop"
    assert_no_leaks(spec)


def test_alone_equals_batched_and_prefix_cache_hits(engines):
    _, spec = engines
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    batched = outputs(spec, params)
    hits = spec.engine.block_pool.prefix_hits
    alone = [spec.generate([p], params)[0].outputs[0] for p in PROMPTS]
    assert spec.engine.block_pool.prefix_hits > hits  # the prompts came back from the cache
    assert [a.token_ids for a in alone] == [b.token_ids for b in batched]
    assert_no_leaks(spec)


@pytest.fixture(scope="module")
def model_proposers(smollm_native, smollm_path):
    """layerskip:20 on the native step (it shares the target's KV cache), and the default model
    as its own draft (a second native model with its own cache)."""
    kw = dict(max_model_len=512, cache=CacheConfig(num_blocks=400, block_size=4))
    out = {
        "layerskip": engine_variant(smollm_native, speculative_method="layerskip:20", **kw),
        "draft": engine_variant(smollm_native, speculative_method=f"draft:{smollm_path}", **kw),
    }
    for llm in out.values():  # proposals then depend on the tokens only, not on timings
        llm.engine.drafter.cost, llm.engine.drafter.verify_cost = 0.0, []
    return out


@pytest.mark.parametrize("method", ["layerskip", "draft"])
def test_model_proposers_same_tokens_on_the_default_model(engines, model_proposers, method):
    base, spec = engines[0], model_proposers[method]
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True, logprobs=1)
    want, got = outputs(base, params), outputs(spec, params)
    for g, w in zip(got, want, strict=True):
        assert g.token_ids == w.token_ids
        assert [lp.logprob for lp in g.logprobs] == [lp.logprob for lp in w.logprobs]
    s = spec.engine.spec_stats()
    assert s["drafts"] >= 8, s  # UNPAID_LIMIT runs at least before any back-off
    if method == "draft":  # the same bits propose what the target samples
        assert s["accepted"] == s["proposed"], s
    seeded = SamplingParams(max_tokens=24, temperature=0.8, top_p=0.95, seed=3)
    assert [g.token_ids for g in outputs(spec, seeded)] == [
        w.token_ids for w in outputs(base, seeded)
    ]
    assert_no_leaks(spec)
