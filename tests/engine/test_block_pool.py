"""BlockPool: allocation, reference counts, prefix caching, LRU eviction. No model, no torch."""

import pytest

from miaotui.engine.block_pool import NULL_BLOCK_ID, BlockPool
from miaotui.engine.request import Request, RequestStatus

BS = 4


def make_request(rid: str, prompt: list[int], max_tokens: int = 8) -> Request:
    return Request(rid, prompt, max_tokens)


def compute_all(pool: BlockPool, req: Request) -> None:
    """What a step does for the pool: the runner computed every known token."""
    req.num_computed_tokens = req.num_tokens
    pool.cache_full_blocks(req)


def admit_and_compute(pool: BlockPool, req: Request) -> None:
    assert pool.allocate_for(req)
    req.status = RequestStatus.RUNNING
    compute_all(pool, req)


def test_null_block_is_never_allocated():
    pool = BlockPool(num_blocks=5, block_size=BS)
    assert pool.num_free_blocks == pool.num_usable_blocks == 4
    req = make_request("a", list(range(16)))
    assert pool.allocate_for(req)
    assert len(req.block_ids) == 4 and NULL_BLOCK_ID not in req.block_ids
    assert pool.num_free_blocks == 0 and pool.usage == 1.0
    pool.check_invariants([req])


def test_allocate_covers_all_known_tokens_and_fails_without_side_effects():
    pool = BlockPool(num_blocks=4, block_size=BS)  # 3 usable
    a = make_request("a", list(range(9)))  # 3 blocks
    assert pool.allocate_for(a)
    assert len(a.block_ids) == 3 and a.num_computed_tokens == 0
    b = make_request("b", [1])
    queries = pool.prefix_queries
    assert not pool.allocate_for(b)
    assert b.block_ids == [] and pool.prefix_queries == queries
    pool.free(a)
    assert pool.num_free_blocks == 3 and a.block_ids == []
    pool.check_invariants([])


def test_append_slots_grows_one_block_at_a_boundary_and_refuses_when_full():
    pool = BlockPool(num_blocks=3, block_size=BS)  # 2 usable
    a = make_request("a", list(range(4)))
    assert pool.allocate_for(a)
    a.num_computed_tokens = 4
    assert pool.append_slots(a, 0) and len(a.block_ids) == 1
    assert pool.append_slots(a, 1) and len(a.block_ids) == 2
    a.num_computed_tokens = 8
    assert not pool.append_slots(a, 1)
    assert len(a.block_ids) == 2
    pool.check_invariants([a])


def test_shared_prefix_is_ref_counted_and_counted_as_hits():
    pool = BlockPool(num_blocks=16, block_size=BS)
    shared = list(range(100, 108))  # two full blocks
    a = make_request("a", shared + [1, 2, 3])
    admit_and_compute(pool, a)
    b = make_request("b", shared + [7, 7, 7, 7, 7])
    assert pool.allocate_for(b)
    assert b.block_ids[:2] == a.block_ids[:2]
    assert b.num_computed_tokens == b.num_cached_tokens == 8
    assert [pool.blocks[i].ref_count for i in b.block_ids] == [2, 2, 1, 1]
    assert pool.prefix_queries == 11 + 13 and pool.prefix_hits == 8
    assert pool.prefix_hit_rate == pytest.approx(8 / 24)
    pool.check_invariants([a, b])
    pool.free(a)
    assert [pool.blocks[i].ref_count for i in b.block_ids] == [1, 1, 1, 1]
    pool.check_invariants([b])


def test_block_of_the_last_token_is_recomputed():
    pool = BlockPool(num_blocks=16, block_size=BS)
    a = make_request("a", list(range(8)))
    admit_and_compute(pool, a)  # both blocks cached
    b = make_request("b", list(range(8)))  # the same prompt: its last token's logits are needed
    assert pool.allocate_for(b)
    assert b.num_computed_tokens == 4
    assert b.block_ids[0] == a.block_ids[0] and b.block_ids[1] != a.block_ids[1]


def test_prefix_must_match_from_the_start():
    pool = BlockPool(num_blocks=16, block_size=BS)
    a = make_request("a", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    admit_and_compute(pool, a)
    b = make_request("b", [0, 2, 3, 4, 5, 6, 7, 8, 9])  # same second block, different parent
    assert pool.allocate_for(b)
    assert b.num_computed_tokens == 0


def test_freed_blocks_stay_cached_and_are_revived_by_a_hit():
    pool = BlockPool(num_blocks=8, block_size=BS)
    a = make_request("a", list(range(9)))
    admit_and_compute(pool, a)
    a_blocks = a.block_ids
    pool.free(a)
    assert pool.num_free_blocks == 7
    b = make_request("b", list(range(9)))
    assert pool.allocate_for(b)
    assert b.block_ids[:2] == a_blocks[:2]
    assert [pool.blocks[i].ref_count for i in b.block_ids[:2]] == [1, 1]
    assert pool.num_free_blocks == 7 - 3
    pool.check_invariants([b])


def test_lru_eviction_order():
    pool = BlockPool(num_blocks=8, block_size=BS)  # 7 usable
    a, b = (make_request(r, [10 * i + j for j in range(9)]) for i, r in enumerate("ab"))
    for req in (a, b):  # 2 full cached blocks + 1 partial block each; 1 block never used
        admit_and_compute(pool, req)
    a_cached, b_cached = a.block_ids[:2], b.block_ids[:2]
    uncached = {a.block_ids[2], b.block_ids[2], 7}
    pool.free(a)  # a freed first: least recently used
    pool.free(b)
    # Blocks holding nothing reusable go first, then a's prefix tail first, then b's.
    taker = make_request("t", [0] * 13)  # 4 blocks, no hit
    assert pool.allocate_for(taker)
    assert set(taker.block_ids[:3]) == uncached
    assert taker.block_ids[3] == a_cached[1]
    b2 = make_request("b2", b.prompt_token_ids)
    assert pool.allocate_for(b2)
    assert b2.num_computed_tokens == 8 and b2.block_ids == b_cached + [a_cached[0]]
    pool.check_invariants([taker, b2])
    pool.free(taker)
    a2 = make_request("a2", a.prompt_token_ids)
    assert pool.allocate_for(a2)
    assert a2.num_computed_tokens == 0


def test_eviction_never_takes_a_block_being_revived():
    pool = BlockPool(num_blocks=4, block_size=BS)  # 3 usable
    a = make_request("a", list(range(9)))
    admit_and_compute(pool, a)
    pool.free(a)  # all 3 blocks free; 2 of them cached
    b = make_request("b", list(range(8)) + [99])
    assert pool.allocate_for(b)  # 2 hits + 1 new block: only the unhashed one may be taken
    assert b.num_computed_tokens == 8
    pool.check_invariants([b])


def test_cache_full_blocks_is_incremental_during_decode():
    pool = BlockPool(num_blocks=8, block_size=BS)
    a = make_request("a", [5, 6, 7])
    assert pool.allocate_for(a)
    for token in [8, 9, 10, 11, 12, 13]:  # decode: compute the last token, sample the next
        assert pool.append_slots(a, a.num_tokens - a.num_computed_tokens)
        compute_all(pool, a)
        a.output_token_ids.append(token)
        pool.check_invariants([a])
    b = make_request("b", [5, 6, 7, 8, 9, 10, 11, 12, 0])
    assert pool.allocate_for(b)
    assert b.num_computed_tokens == 8 and b.block_ids[:2] == a.block_ids[:2]


def test_reset_prefix_cache_only_when_idle():
    pool = BlockPool(num_blocks=8, block_size=BS)
    a = make_request("a", list(range(9)))
    admit_and_compute(pool, a)
    assert not pool.reset_prefix_cache()
    pool.free(a)
    assert pool.reset_prefix_cache()
    b = make_request("b", list(range(9)))
    assert pool.allocate_for(b) and b.num_computed_tokens == 0
    pool.check_invariants([b])


def test_prefix_caching_disabled():
    pool = BlockPool(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    a = make_request("a", list(range(9)))
    admit_and_compute(pool, a)
    b = make_request("b", list(range(9)))
    assert pool.allocate_for(b) and b.num_computed_tokens == 0 and pool.prefix_hits == 0


def test_num_cached_tokens_counts_only_the_first_admission():
    pool = BlockPool(num_blocks=8, block_size=BS)
    a = make_request("a", list(range(6)))
    admit_and_compute(pool, a)
    a.output_token_ids += [1, 2, 3]
    pool.free(a)
    a.status = RequestStatus.PREEMPTED
    assert pool.allocate_for(a)
    assert a.num_computed_tokens == 4 and a.num_cached_tokens == 0


def test_check_invariants_catches_corruption():
    pool = BlockPool(num_blocks=8, block_size=BS)
    a = make_request("a", list(range(9)))
    admit_and_compute(pool, a)
    pool.check_invariants([a])
    with pytest.raises(AssertionError):
        pool.check_invariants([])  # a's blocks are referenced by nobody we know of
    pool.blocks[a.block_ids[0]].ref_count += 1
    with pytest.raises(AssertionError):
        pool.check_invariants([a])
    pool.blocks[a.block_ids[0]].ref_count -= 1
    a.prompt_token_ids[0] = 42  # the cached hash no longer matches the tokens
    with pytest.raises(AssertionError):
        pool.check_invariants([a])
