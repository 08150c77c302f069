"""The scheduler -> runner message: new requests bring their whole block table, cached (running)
ones only the blocks appended this step, freed ones (finished, aborted, preempted) are dropped by
the runner; a running request's share of a step stays O(1) however long it grows."""

from __future__ import annotations

import pytest
import torch

from miaotui.config import CacheConfig
from miaotui.engine.block_pool import BlockPool
from miaotui.engine.engine import LLMEngine
from miaotui.engine.request import Request
from miaotui.engine.runner import ModelRunner
from miaotui.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from miaotui.sampling_params import SamplingParams
from tests import helpers

pytestmark = pytest.mark.usefixtures("one_thread")

BS = 4


def make(num_blocks: int = 64, **config) -> tuple[Scheduler, ModelRunner]:
    cache = CacheConfig(block_size=BS, num_blocks=num_blocks)
    runner = ModelRunner(
        helpers.tiny_transformer(0), cache, num_blocks, torch.device("cpu"), torch.float32
    )
    config.setdefault("max_model_len", (num_blocks - 1) * BS)
    return Scheduler(SchedulerConfig(**config), BlockPool(num_blocks, BS)), runner


def step(sched: Scheduler, runner: ModelRunner) -> SchedulerOutput:
    out = sched.schedule()
    inp = runner.prepare(out)
    logits = runner.execute(inp)
    sampled = {rid: [t] for rid, t in zip(inp.sample_ids, logits.argmax(-1).tolist())}
    sched.update_from_output(out, sampled)
    for r in sched.running:  # every running request's table is the scheduler's, block for block
        assert runner.block_tables.get(r.request_id, []) == r.block_ids, r.request_id
    return out


def test_new_then_cached_requests_send_only_appended_blocks():
    sched, runner = make()
    a = Request("a", list(range(1, 7)), max_tokens=20)  # 6 tokens: 2 blocks
    sched.add_request(a)
    out = step(sched, runner)
    assert [r.request_id for r in out.new] == ["a"] and out.cached == []
    assert out.new[0].block_ids == runner.block_tables["a"] and len(out.new[0].block_ids) == 2
    appended = []
    for _ in range(10):
        out = step(sched, runner)
        assert out.new == [] and [r.request_id for r in out.cached] == ["a"]
        (cached,) = out.cached
        assert len(cached.token_ids) == 1 and len(cached.new_block_ids) <= 1
        appended += cached.new_block_ids
    assert (
        len(runner.block_tables["a"]) == 2 + len(appended) == len(a.block_ids) == 4
    )  # 16 tokens computed


def test_a_running_requests_share_of_the_message_stays_constant():
    sched, runner = make(max_model_len=200)
    sched.add_request(Request("long", [5] * 40, max_tokens=150))
    step(sched, runner)
    sizes = []
    for _ in range(150 - 1):
        (cached,) = step(sched, runner).cached
        sizes.append(len(cached.token_ids) + len(cached.new_block_ids))
    assert max(sizes) <= 2  # one token, at most one new block: not the whole history


def test_preempted_requests_are_dropped_and_come_back_as_new():
    # 8 usable blocks: r0, r1, r2 take 1 + 3 + 4 at admission; r0's first decode needs a block,
    # so r2 (the most recently arrived) is preempted.
    sched, runner = make(num_blocks=9, max_num_seqs=3)
    reqs = [Request(f"r{i}", [i + 1] * n, max_tokens=6) for i, n in enumerate([4, 11, 15])]
    for r in reqs:
        sched.add_request(r)
    step(sched, runner)
    assert set(runner.block_tables) == {"r0", "r1", "r2"}
    out = step(sched, runner)
    assert out.freed_ids == ["r2"] and "r2" not in runner.block_tables
    assert [r.request_id for r in out.cached] == ["r0", "r1"]
    back = None
    while sched.has_unfinished() and back is None:
        out = step(sched, runner)
        back = next((r for r in out.new if r.request_id == "r2"), None)
    assert back is not None and back.start_pos < 15  # recomputes (past any cached prefix)
    assert len(back.block_ids) == 4  # the whole table again, cached prefix included
    assert back.block_ids == runner.block_tables["r2"]
    while sched.has_unfinished():
        step(sched, runner)


def test_finished_and_aborted_requests_are_dropped_at_the_next_step():
    sched, runner = make()
    sched.add_request(Request("short", [1, 2, 3], max_tokens=2))
    sched.add_request(Request("long", [4, 5, 6], max_tokens=10))
    step(sched, runner)
    step(sched, runner)  # short has its 2 tokens: finished, its blocks freed
    assert "short" in runner.block_tables  # the runner learns it with the next step
    out = step(sched, runner)
    assert out.freed_ids == ["short"] and set(runner.block_tables) == {"long"}
    sched.add_request(Request("waits", [7], max_tokens=3))
    sched.abort_request("waits")  # never scheduled: the runner never had its table
    sched.abort_request("long")
    sched.add_request(Request("next", [8, 9], max_tokens=3))
    out = step(sched, runner)
    assert out.freed_ids == ["waits", "long"] and set(runner.block_tables) == {"next"}


def tiny_engine(max_model_len: int = 128) -> LLMEngine:
    cache = CacheConfig(block_size=BS, num_blocks=64)
    model = helpers.tiny_transformer(0)
    runner = ModelRunner(model, cache, 64, torch.device("cpu"), torch.float32)
    sched = SchedulerConfig(max_model_len=max_model_len)
    return LLMEngine(runner, helpers.byte_tokenizer(), 64, cache, sched)


def test_outputs_share_history_and_stay_snapshots():
    engine = tiny_engine()
    params = SamplingParams(max_tokens=12, temperature=0.8, seed=1, logprobs=2, ignore_eos=True)
    rid = engine.add_request("hello", params)
    assert engine.states[rid].generator.device == engine.runner.device
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    assert len(outs) == 12 and outs[-1].finished
    # One history for all outputs of the request (nothing copied per step) ...
    assert all(o.produced is outs[0].produced for o in outs)
    # ... yet each output reads only its own prefix: later steps do not change what it says.
    for k, o in enumerate(outs, 1):
        assert len(o.token_ids) == len(o.logprobs) == k
        assert o.token_ids == outs[-1].token_ids[:k]
        assert o.delta_logprobs == [outs[-1].logprobs[k - 1]]
    assert "".join(o.delta_text for o in outs) == outs[-1].text
    assert sum((o.delta_token_ids for o in outs), []) == outs[-1].token_ids
