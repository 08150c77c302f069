"""AsyncEngine on a tiny random fp32 model: streaming, cancellation, abort(), the queue bound, a
failing step, and concurrent requests token for token against each alone. Every test ends with
every KV block back in the free pool."""

from __future__ import annotations

import asyncio
import time

import pytest

from miaotui.config import CacheConfig, EngineConfig
from miaotui.engine.async_engine import AsyncEngine, EngineDeadError, EngineStepError
from miaotui.errors import CapacityError, InvalidRequestError
from miaotui.loader import engine_for_model
from miaotui.sampling_params import SamplingParams
from tests.helpers import BYTE_EOS, byte_tokenizer, tiny_transformer

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("one_thread")]

EOS = BYTE_EOS


@pytest.fixture(scope="module")
def tiny():
    return tiny_transformer(seed=0, max_seq_len=256), byte_tokenizer()


def make_engine(tiny, **overrides) -> AsyncEngine:
    model, tok = tiny
    fields = dict(
        device="cpu",
        max_model_len=128,
        max_num_seqs=8,
        max_num_batched_tokens=64,
        cache=CacheConfig(block_size=4, num_blocks=96),
    )
    fields.update(overrides)
    return AsyncEngine(engine_for_model(model, tok, EngineConfig.from_kwargs(**fields)), "tiny")


@pytest.fixture
def engine(tiny):
    eng = make_engine(tiny)
    yield eng
    eng.shutdown()


def slow_down(eng: AsyncEngine, monkeypatch, seconds: float) -> None:
    """Make every step take a while, so that a test can act while a request is in flight."""
    runner = eng.engine.runner
    real_execute = runner.execute

    def slow_execute(inp):
        time.sleep(seconds)
        return real_execute(inp)

    monkeypatch.setattr(runner, "execute", slow_execute)


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)


def prompt_of(i: int, length: int) -> list[int]:
    return [(7 * i + 3 * j) % 256 for j in range(length)]


async def collect(eng: AsyncEngine, prompt, params, rid: str):
    outs = [o async for o in eng.generate(prompt, params, rid)]
    return outs


def wait_all_free(eng: AsyncEngine, timeout: float = 10.0) -> None:
    """Every KV block back in the free pool and nothing left running or waiting."""
    pool, sched = eng.engine.block_pool, eng.engine.scheduler
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pool.num_free_blocks == pool.num_usable_blocks and not sched.requests:
            return
        time.sleep(0.01)
    raise AssertionError(
        f"{pool.num_usable_blocks - pool.num_free_blocks} blocks still in use, "
        f"requests left: {list(sched.requests)}"
    )


def test_stream_deltas_add_up_and_blocks_return(engine):
    outs = asyncio.run(collect(engine, prompt_of(1, 9), greedy(12), "a"))
    final = outs[-1]
    assert final.finished and final.finish_reason == "length"
    assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
    assert sum((o.delta_token_ids for o in outs), []) == final.token_ids
    assert len(final.token_ids) == 12
    assert "".join(o.delta_text for o in outs) == final.text
    wait_all_free(engine)
    assert engine.metrics.kv_usage._value.get() == 0.0


def test_cancelled_consumer_aborts_and_frees_blocks(engine, monkeypatch):
    slow_down(engine, monkeypatch, 0.005)
    pool = engine.engine.block_pool

    async def main():
        seen = []

        async def consume():
            async for out in engine.generate(prompt_of(2, 20), greedy(100), "c"):
                seen.append(out)

        task = asyncio.create_task(consume())
        while len(seen) < 2:
            await asyncio.sleep(0.001)
        assert pool.num_free_blocks < pool.num_usable_blocks  # it holds blocks mid-stream
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return seen

    seen = asyncio.run(main())
    assert not seen[-1].finished
    wait_all_free(engine)


def test_leaving_the_loop_early_aborts(engine):
    async def main():
        gen = engine.generate(prompt_of(3, 5), greedy(100), "b")
        async for out in gen:
            if len(out.token_ids) >= 3:
                break
        await gen.aclose()

    asyncio.run(main())
    wait_all_free(engine)


def test_abort_ends_the_consumer_and_frees_blocks(engine):
    async def main():
        outs = []
        async for out in engine.generate(prompt_of(4, 6), greedy(100), "x"):
            outs.append(out)
            if len(outs) == 3:
                engine.abort("x")
        return outs

    outs = asyncio.run(main())
    assert outs[-1].finished and outs[-1].finish_reason == "abort"
    assert outs[-1].token_ids == outs[-2].token_ids[: len(outs[-1].token_ids)]
    assert len(outs[-1].token_ids) < 100
    wait_all_free(engine)
    engine.abort("x")  # finished or unknown ids are ignored
    engine.abort("never-seen")
    outs = asyncio.run(collect(engine, prompt_of(4, 6), greedy(4), "x"))  # the id is free again
    assert outs[-1].finish_reason == "length"


def test_concurrent_requests_match_each_alone(engine):
    """12 requests of different prompt and output lengths at once (chunked prefill, since the
    step budget is 64 tokens) give each the tokens it gets alone; one bad request in the middle
    of the burst is refused without disturbing them."""
    jobs = [(prompt_of(i, 3 + 5 * i), greedy(4 + (i * 5) % 17)) for i in range(12)]
    alone = [
        asyncio.run(collect(engine, p, sp, f"alone-{i}"))[-1] for i, (p, sp) in enumerate(jobs)
    ]

    async def burst():
        tasks = [collect(engine, p, sp, f"burst-{i}") for i, (p, sp) in enumerate(jobs)]
        tasks.insert(6, collect(engine, [1, 2, 10_000], greedy(4), "bad"))
        return await asyncio.gather(*tasks, return_exceptions=True)

    results = asyncio.run(burst())
    bad = results.pop(6)
    assert isinstance(bad, InvalidRequestError) and bad.param == "prompt"
    for i, (outs, ref) in enumerate(zip(results, alone)):
        assert outs[-1].token_ids == ref.token_ids, f"request {i}"
        assert outs[-1].text == ref.text
    assert engine.engine.scheduler.config.max_num_seqs < len(jobs)  # some had to wait
    wait_all_free(engine)


def test_queue_bound_refuses_then_recovers(tiny, monkeypatch):
    eng = make_engine(tiny, max_num_seqs=1, max_waiting=1)
    slow_down(eng, monkeypatch, 0.005)
    try:

        async def main():
            first = asyncio.create_task(collect(eng, prompt_of(5, 4), greedy(60), "r1"))
            while not eng.engine.scheduler.running:
                await asyncio.sleep(0.001)
            second = asyncio.create_task(collect(eng, prompt_of(6, 4), greedy(3), "r2"))
            while not eng.engine.scheduler.waiting:
                await asyncio.sleep(0.001)
            with pytest.raises(CapacityError):
                await collect(eng, prompt_of(7, 4), greedy(3), "r3")
            return await first, await second

        first, second = asyncio.run(main())
        assert first[-1].finish_reason == second[-1].finish_reason == "length"
        outs = asyncio.run(collect(eng, prompt_of(7, 4), greedy(3), "r3"))
        assert len(outs[-1].token_ids) == 3
        wait_all_free(eng)
    finally:
        eng.shutdown()


def test_failed_step_aborts_in_flight_requests_and_engine_keeps_serving(engine, monkeypatch):
    runner = engine.engine.runner
    real_execute = runner.execute
    calls = {"n": 0}

    def flaky_execute(inp):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected failure")
        return real_execute(inp)

    monkeypatch.setattr(runner, "execute", flaky_execute)

    async def main():
        tasks = [collect(engine, prompt_of(i, 5), greedy(20), f"f{i}") for i in range(3)]
        return await asyncio.gather(*tasks, return_exceptions=True)

    results = asyncio.run(main())
    assert all(isinstance(r, EngineStepError) for r in results), results
    assert "injected failure" in str(results[0])
    wait_all_free(engine)
    assert engine.error is None
    assert engine.metrics.step_failures._value.get() == 1
    outs = asyncio.run(collect(engine, prompt_of(9, 5), greedy(5), "after"))
    assert outs[-1].finish_reason == "length" and len(outs[-1].token_ids) == 5


def test_duplicate_request_id_is_refused_without_touching_the_original(engine, monkeypatch):
    slow_down(engine, monkeypatch, 0.005)

    async def main():
        original = asyncio.create_task(collect(engine, prompt_of(1, 5), greedy(30), "dup"))
        while "dup" not in engine.engine.scheduler.requests:
            await asyncio.sleep(0.001)
        with pytest.raises(InvalidRequestError, match="already in use"):
            await collect(engine, prompt_of(2, 5), greedy(3), "dup")
        return await original

    outs = asyncio.run(main())
    assert outs[-1].finish_reason == "length" and len(outs[-1].token_ids) == 30
    wait_all_free(engine)


def test_shutdown_fails_pending_consumers(tiny, monkeypatch):
    eng = make_engine(tiny)
    slow_down(eng, monkeypatch, 0.005)

    async def main():
        task = asyncio.create_task(collect(eng, prompt_of(1, 5), greedy(100), "s"))
        while not eng.engine.scheduler.running:
            await asyncio.sleep(0.001)
        await asyncio.to_thread(eng.shutdown)
        with pytest.raises(EngineDeadError):
            await task
        with pytest.raises(EngineDeadError):
            await collect(eng, prompt_of(1, 5), greedy(3), "t")
        eng.abort("s")  # cleanup paths may still abort: never raises

    asyncio.run(main())


@pytest.mark.parametrize("method", ["ngram", "layerskip:1"])
def test_speculation_counters_reach_metrics(tiny, method):
    """/metrics counts scored proposals and accepted ones: a repeating prompt on a tiny model
    proposes from its own earlier tokens (ngram) or its first layer (layerskip); the counters
    and gauges equal the engine's totals."""
    eng = make_engine(tiny, speculative_method=method)
    try:
        asyncio.run(collect(eng, [5, 6, 7, 8] * 8, greedy(24), "spec"))
        wait_all_free(eng)
        e, text = eng.engine, eng.metrics.render().decode()
        assert e.num_spec_proposed > 0
        assert (
            f'miaotui_spec_decode_num_draft_tokens_total{{model_name="tiny"}} {float(e.num_spec_proposed)}'
            in text
        )
        assert (
            f'miaotui_spec_decode_num_accepted_tokens_total{{model_name="tiny"}} {float(e.num_spec_accepted)}'
            in text
        )
        values = {
            line.split("{")[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("miaotui_spec_decode")
        }
        s = e.spec_stats()
        assert values["miaotui_spec_decode_num_drafts_total"] == s["drafts"] > 0
        assert values["miaotui_spec_decode_acceptance_rate"] == pytest.approx(
            e.num_spec_accepted / e.num_spec_proposed
        )
        assert values["miaotui_spec_decode_mean_accepted_length"] == pytest.approx(
            e.num_spec_accepted / s["drafts"]
        )
        assert values["miaotui_spec_decode_verify_seconds_total"] > 0
        assert (values["miaotui_spec_decode_draft_seconds_total"] > 0) == (method != "ngram")
    finally:
        eng.shutdown()
