"""Scheduler with a fake runner: budgets, chunked prefill, preemption, FCFS, prefix caching, aborts.

The fake runner keeps a simulated paged KV cache: it writes every computed token into the slot its
block table names, and "samples" a token from the whole context read back through the block
table. A wrong block table, a stale prefix-cache hit or a block reused while still referenced
changes the output, which is compared with `reference_generate` (no scheduler, no blocks).
"""

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from miaotui.engine.block_pool import BlockPool
from miaotui.engine.request import Request, RequestStatus
from miaotui.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from miaotui.errors import CapacityError, InvalidRequestError

BS = 4


def next_token(context: list[int]) -> int:
    """The fake model: deterministic in the token history."""
    return hash(tuple(context)) % 100 + 10


def reference_generate(prompt: list[int], max_tokens: int, eos=frozenset(), max_model_len=10**9):
    tokens, out = list(prompt), []
    while True:
        token = next_token(tokens)
        out.append(token)
        tokens.append(token)
        if token in eos or len(out) >= max_tokens or len(tokens) >= max_model_len:
            return out


class FakeRunner:
    """Keeps block tables as ModelRunner does: whole for new requests, appended for cached ones,
    dropped for freed ones."""

    def __init__(self, pool: BlockPool):
        self.bs = pool.block_size
        self.kv: list[list[int | None]] = [[None] * self.bs for _ in range(pool.num_blocks)]
        self.tables: dict[str, list[int]] = {}

    def _slot(self, block_ids: list[int], pos: int) -> tuple[int, int]:
        return block_ids[pos // self.bs], pos % self.bs

    def step(self, out: SchedulerOutput) -> dict[str, list[int]]:
        for rid in out.freed_ids:
            self.tables.pop(rid, None)
        for s in out.new:
            self.tables[s.request_id] = list(s.block_ids)
        for s in out.cached:
            self.tables[s.request_id] += s.new_block_ids
        # Like a real forward pass: write the whole batch's KV first, then attend.
        for s in out.scheduled:
            for j, token in enumerate(s.token_ids):
                block, offset = self._slot(self.tables[s.request_id], s.start_pos + j)
                self.kv[block][offset] = token
        sampled = {}
        for s in out.scheduled:
            if s.sample:
                end = s.start_pos + len(s.token_ids)
                table = self.tables[s.request_id]
                context = [self.kv[b][o] for b, o in (self._slot(table, p) for p in range(end))]
                sampled[s.request_id] = [next_token(context)]
        return sampled


def make_scheduler(num_blocks=64, prefix_caching=True, **config):
    config.setdefault("max_model_len", (num_blocks - 1) * BS)
    pool = BlockPool(num_blocks, BS, enable_prefix_caching=prefix_caching)
    return Scheduler(SchedulerConfig(**config), pool), FakeRunner(pool)


def step(sched: Scheduler, runner: FakeRunner) -> SchedulerOutput:
    out = sched.schedule()
    assert num_batched_tokens(out) <= sched.config.max_num_batched_tokens
    scheduled_ids = {s.request_id for s in out.scheduled}
    assert len(scheduled_ids) == len(out.scheduled)
    assert not {s.request_id for s in out.cached} & set(out.freed_ids)
    sampled = runner.step(out)
    for r in sched.running:  # the runner's tables follow the scheduler's exactly
        assert runner.tables.get(r.request_id, []) == r.block_ids, r.request_id
    assert set(runner.tables) <= {r.request_id for r in sched.running} | set(sched._freed_ids)
    sched.update_from_output(out, sampled)
    sched.check_invariants()
    return out


def num_batched_tokens(out: SchedulerOutput) -> int:
    return sum(len(s.token_ids) for s in out.scheduled)


def run_to_completion(sched, runner, max_steps=5000) -> list[SchedulerOutput]:
    outputs = []
    while sched.has_unfinished():
        outputs.append(step(sched, runner))
        assert len(outputs) < max_steps, "no progress"
    assert sched.block_pool.num_free_blocks == sched.block_pool.num_usable_blocks
    return outputs


def prompt(seed: int, n: int) -> list[int]:
    return [(seed * 7919 + i * 31) % 97 + 1 for i in range(n)]


def first_step_of(outputs: list[SchedulerOutput]) -> dict[str, int]:
    first = {}
    for i, out in enumerate(outputs):
        for s in out.scheduled:
            first.setdefault(s.request_id, i)
    return first


def test_single_request_matches_reference():
    sched, runner = make_scheduler()
    req = Request("a", prompt(1, 10), max_tokens=12)
    sched.add_request(req)
    run_to_completion(sched, runner)
    assert req.output_token_ids == reference_generate(req.prompt_token_ids, 12)
    assert req.status is RequestStatus.FINISHED_LENGTH and req.status.finish_reason == "length"


def test_token_budget_is_respected_and_everything_matches_reference():
    sched, runner = make_scheduler(max_num_batched_tokens=20, long_prefill_token_threshold=20)
    reqs = [Request(f"r{i}", prompt(i, 3 + 5 * i), max_tokens=6 + i) for i in range(6)]
    for req in reqs:
        sched.add_request(req)
    outputs = run_to_completion(sched, runner)
    assert max(num_batched_tokens(out) for out in outputs) == 20  # the budget was the limit
    for req in reqs:
        assert req.output_token_ids == reference_generate(req.prompt_token_ids, req.max_tokens)


def test_chunked_prefill_runs_alongside_decodes():
    sched, runner = make_scheduler(max_num_batched_tokens=64, long_prefill_token_threshold=16)
    short = Request("short", prompt(1, 4), max_tokens=30)
    sched.add_request(short)
    step(sched, runner)
    long = Request("long", prompt(2, 50), max_tokens=5)
    sched.add_request(long)
    chunks = []
    for _ in range(4):
        out = step(sched, runner)
        by_id = {s.request_id: s for s in out.scheduled}
        assert len(by_id["short"].token_ids) == 1 and by_id["short"].sample  # decode keeps flowing
        chunks.append(by_id["long"])
    assert [len(c.token_ids) for c in chunks] == [16, 16, 16, 2]
    assert [c.start_pos for c in chunks] == [0, 16, 32, 48]
    assert [c.sample for c in chunks] == [False, False, False, True]
    assert sum((c.token_ids for c in chunks), []) == long.prompt_token_ids
    assert long.num_output_tokens == 1
    run_to_completion(sched, runner)
    assert long.output_token_ids == reference_generate(long.prompt_token_ids, 5)
    assert short.output_token_ids == reference_generate(short.prompt_token_ids, 30)


def test_prefill_is_chunked_by_what_is_left_of_the_budget():
    sched, runner = make_scheduler(max_num_batched_tokens=10, long_prefill_token_threshold=100)
    sched.add_request(Request("a", prompt(1, 2), max_tokens=20))
    step(sched, runner)
    sched.add_request(Request("b", prompt(2, 25), max_tokens=2))
    sizes = []
    while sched.requests["b"].num_output_tokens == 0:
        out = step(sched, runner)
        sizes.append({s.request_id: len(s.token_ids) for s in out.scheduled})
    assert sizes == [{"a": 1, "b": 9}, {"a": 1, "b": 9}, {"a": 1, "b": 7}]


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_preemption_by_recompute_gives_the_same_tokens(prefix_caching):
    # 8 usable blocks of 4 tokens. r0, r1, r2 take 1 + 3 + 4 blocks at admission; r3 waits
    # (max_num_seqs=3). r0's first decode needs a 5th token slot: the pool is full, so the most
    # recently arrived running request, r2, is preempted and must go back before r3.
    sched, runner = make_scheduler(num_blocks=9, prefix_caching=prefix_caching, max_num_seqs=3)
    reqs = [Request(f"r{i}", prompt(i, n), max_tokens=12) for i, n in enumerate([4, 11, 15, 6])]
    for req in reqs:
        sched.add_request(req)
    step(sched, runner)
    assert sched.block_pool.num_free_blocks == 0
    out = step(sched, runner)
    assert out.freed_ids == ["r2"]
    assert [s.request_id for s in out.scheduled] == ["r0", "r1"]
    victim = reqs[2]
    assert list(sched.waiting) == [victim, reqs[3]] and victim.status is RequestStatus.PREEMPTED
    assert victim.num_computed_tokens == 0 and victim.block_ids == []
    assert victim.num_output_tokens == 1  # kept: recompute includes it
    run_to_completion(sched, runner)
    assert sched.num_preemptions >= 1
    for req in reqs:
        assert req.output_token_ids == reference_generate(req.prompt_token_ids, 12)


def test_fcfs_a_waiting_request_that_does_not_fit_is_not_jumped():
    # 10 usable blocks. a holds 5+ blocks; b needs 8 and must wait; c (1 block) would fit.
    sched, runner = make_scheduler(num_blocks=11)
    a = Request("a", prompt(1, 20), max_tokens=10)
    b = Request("b", prompt(2, 30), max_tokens=3)
    c = Request("c", prompt(3, 2), max_tokens=3)
    for req in (a, b, c):
        sched.add_request(req)
    outputs = run_to_completion(sched, runner)
    first = first_step_of(outputs)
    assert first["a"] < first["b"] <= first["c"]
    assert first["b"] > 0  # b really had to wait
    for req in (a, b, c):
        assert req.output_token_ids == reference_generate(req.prompt_token_ids, req.max_tokens)


def test_max_num_seqs_bounds_the_batch():
    sched, runner = make_scheduler(max_num_seqs=2)
    reqs = [Request(f"r{i}", prompt(i, 5), max_tokens=4 + i) for i in range(5)]
    for req in reqs:
        sched.add_request(req)
    outputs = run_to_completion(sched, runner)
    assert max(len(out.scheduled) for out in outputs) == 2
    assert list(first_step_of(outputs)) == [r.request_id for r in reqs]  # admitted in order
    for req in reqs:
        assert req.output_token_ids == reference_generate(req.prompt_token_ids, req.max_tokens)


def test_shared_prefix_is_cached_and_shared():
    sched, runner = make_scheduler()
    system = prompt(9, 12)
    a = Request("a", system + [1, 2], max_tokens=30)
    sched.add_request(a)
    step(sched, runner)
    b = Request("b", system + [3], max_tokens=4)
    sched.add_request(b)
    step(sched, runner)
    assert b.num_cached_tokens == 12
    shared = b.block_ids[:3]
    assert shared == a.block_ids[:3]
    assert [sched.block_pool.blocks[i].ref_count for i in shared] == [2, 2, 2]
    run_to_completion(sched, runner)
    assert a.output_token_ids == reference_generate(a.prompt_token_ids, 30)
    assert b.output_token_ids == reference_generate(b.prompt_token_ids, 4)


def test_stop_conditions():
    sched, runner = make_scheduler(max_model_len=20)
    expected = reference_generate(prompt(1, 5), 10)
    eos = Request("eos", prompt(1, 5), max_tokens=10, eos_token_ids={expected[2]})
    long = Request("long", prompt(2, 15), max_tokens=100)
    sched.add_request(eos)
    sched.add_request(long)
    run_to_completion(sched, runner)
    assert eos.output_token_ids == expected[: expected.index(expected[2]) + 1]
    assert eos.status is RequestStatus.FINISHED_STOPPED and eos.stop_reason == expected[2]
    assert long.status is RequestStatus.FINISHED_LENGTH and long.num_tokens == 20


def test_abort_frees_everything_and_is_reported():
    sched, runner = make_scheduler(max_num_seqs=1)
    a = Request("a", prompt(1, 9), max_tokens=50)
    b = Request("b", prompt(2, 9), max_tokens=50)
    sched.add_request(a)
    sched.add_request(b)
    step(sched, runner)
    assert a.status is RequestStatus.RUNNING and b.status is RequestStatus.WAITING
    out = sched.schedule()  # a is scheduled; the abort arrives while the runner works
    assert sched.abort_request("a") is a and sched.abort_request("b") is b
    assert sched.abort_request("a") is None and sched.abort_request("nope") is None
    assert sched.update_from_output(out, runner.step(out)) == []
    assert a.status is b.status is RequestStatus.FINISHED_ABORTED
    assert sched.block_pool.num_free_blocks == sched.block_pool.num_usable_blocks
    assert not sched.has_unfinished() and sched.num_running == sched.num_waiting == 0
    assert sched.schedule().freed_ids == []  # nothing runs: the ids wait for a real step
    sched.add_request(Request("c", prompt(3, 2), max_tokens=2))
    out = sched.schedule()
    assert out.freed_ids == ["a", "b"] and [s.request_id for s in out.new] == ["c"]
    sched.check_invariants()


def test_finish_request_from_the_engine():
    sched, runner = make_scheduler()
    a = Request("a", prompt(1, 3), max_tokens=50)
    sched.add_request(a)
    step(sched, runner)
    assert sched.finish_request("a", RequestStatus.FINISHED_STOPPED, stop_reason="</s>") is a
    assert a.status.finish_reason == "stop" and a.stop_reason == "</s>"
    with pytest.raises(ValueError):
        sched.finish_request("a", RequestStatus.RUNNING)
    assert sched.block_pool.num_free_blocks == sched.block_pool.num_usable_blocks


def test_waiting_queue_bound_raises_capacity_error():
    sched, runner = make_scheduler(max_waiting=2, max_num_seqs=1)
    sched.add_request(Request("a", [1], 5))
    sched.add_request(Request("b", [1], 5))
    with pytest.raises(CapacityError):
        sched.add_request(Request("c", [1], 5))
    step(sched, runner)  # a admitted: room for one more
    sched.add_request(Request("c", [1], 5))
    assert sched.num_waiting == 2


def test_invalid_requests_and_configs():
    sched, _ = make_scheduler(max_model_len=16)
    sched.add_request(Request("a", [1], 5))
    with pytest.raises(InvalidRequestError, match="already in use"):
        sched.add_request(Request("a", [1], 5))
    with pytest.raises(InvalidRequestError, match="prompt is empty"):
        sched.add_request(Request("e", [], 5))
    with pytest.raises(InvalidRequestError, match="has 16 tokens but the context holds 16"):
        sched.add_request(Request("l", list(range(16)), 5))
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        sched.add_request(Request("m", [1], 0))
    with pytest.raises(InvalidRequestError, match="max_num_seqs"):
        SchedulerConfig(max_num_seqs=0)
    with pytest.raises(InvalidRequestError, match="max_model_len=100"):
        Scheduler(SchedulerConfig(max_model_len=100), BlockPool(10, BS))


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_random_workload_keeps_invariants_and_returns_every_block(data):
    num_blocks = data.draw(st.integers(8, 24), label="num_blocks")
    max_model_len = (num_blocks - 1) * BS - data.draw(st.integers(0, BS))
    config = dict(
        max_num_seqs=data.draw(st.integers(1, 6)),
        max_num_batched_tokens=data.draw(st.integers(1, 40)),
        long_prefill_token_threshold=data.draw(st.integers(1, 40)),
        max_model_len=max_model_len,
    )
    sched, runner = make_scheduler(num_blocks, data.draw(st.booleans()), **config)
    prefixes = [prompt(100 + i, 3 * BS) for i in range(2)]  # shared prefixes exercise caching
    eos = frozenset(data.draw(st.lists(st.integers(10, 109), max_size=3)))
    plan = []  # (arrival step, abort step or None, request)
    for i in range(data.draw(st.integers(1, 10), label="num_requests")):
        prefix_len = data.draw(st.integers(0, 3 * BS) | st.just(3 * BS))
        base = data.draw(st.sampled_from(prefixes))[:prefix_len]
        suffix = prompt(i, data.draw(st.integers(0 if prefix_len else 1, 20)))
        tokens = (base + suffix)[: max_model_len - 1]
        req = Request(f"r{i}", tokens, data.draw(st.integers(1, 25)), eos_token_ids=eos)
        arrival = data.draw(st.integers(0, 30))
        abort = data.draw(st.none() | st.integers(arrival, arrival + 40))
        plan.append((arrival, abort, req))

    for t in range(3000):
        for arrival, abort, req in plan:
            if arrival == t:
                sched.add_request(req)
            if abort == t:
                sched.abort_request(req.request_id)
        if t > 30 + 40 and not sched.has_unfinished():
            break
        step(sched, runner)
    else:
        pytest.fail("workload did not finish")

    assert sched.block_pool.num_free_blocks == sched.block_pool.num_usable_blocks
    event("preempted" if sched.num_preemptions else "no preemption")
    event("prefix hit" if sched.block_pool.prefix_hits else "no prefix hit")
    for _, _, req in plan:
        assert req.is_finished
        expected = reference_generate(req.prompt_token_ids, req.max_tokens, eos, max_model_len)
        if req.status is RequestStatus.FINISHED_ABORTED:
            assert req.output_token_ids == expected[: req.num_output_tokens]
        else:
            assert req.output_token_ids == expected
