"""The paged KV cache's bookkeeping: which block belongs to whom, and automatic prefix caching.

Plain Python, no tensors: the runner owns the KV tensors of shape (num_blocks, block_size, ...) and
reads each request's block table; this module only decides the block ids.

Model (vLLM v1's KV cache manager, nano-vllm's BlockManager):
- Block 0 is the null block: never allocated, so the runner can pad block tables with 0 and
  point padding slots at it. `num_blocks` counts it; `num_usable_blocks = num_blocks - 1`.
- Every other block has a reference count. Blocks with ref count 0 sit in the free queue.
- A full block whose KV is computed gets a hash chained with its prefix:
  hash(parent_hash, its block_size tokens). The hash identifies the block's content *and* all
  content before it, so one dict lookup per block finds a cached prefix.
- A freed block keeps its hash and stays findable until it is reused: the free queue is an LRU.
  Freed hashed blocks go to the tail; allocation pops the head and evicts the hash then. Blocks
  without a hash hold nothing reusable and go to the head, so they are reused first. A request
  frees its blocks in reverse order, so the tail of a prefix is evicted before its head (a block
  is useless once its parent is gone).
- Two requests that compute the same block at the same time both hash it; the dict keeps the
  first and the duplicate simply becomes unfindable.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import Counter, OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from miaotui.engine.request import Request, RequestStatus

NULL_BLOCK_ID = 0


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def hash_block_tokens(parent_hash: bytes | None, token_ids: Sequence[int]) -> bytes:
    """Chained content hash of a full block. sha256 rather than Python's hash(): prompts come from
    users, and a collision would silently serve another prompt's KV."""
    h = hashlib.sha256(parent_hash or b"")
    h.update(array("q", token_ids).tobytes())
    return h.digest()


@dataclass(eq=False)
class KVBlock:
    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None
    """Set once the block is full and computed; kept after free until the block is reused."""


class BlockPool:
    """Allocates KV blocks to requests, shares cached prefix blocks, evicts them LRU."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 2:
            raise ValueError(
                f"num_blocks must be >= 2 (block 0 is the null block), got {num_blocks}"
            )
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, KVBlock] = OrderedDict(
            (b.block_id, b) for b in self.blocks[NULL_BLOCK_ID + 1 :]
        )
        self._cached: dict[bytes, KVBlock] = {}
        self._num_hashed: dict[str, int] = {}  # request id -> leading blocks of it already hashed
        self.prefix_queries = 0
        """Tokens looked up in the prefix cache (all known tokens of each admission)."""
        self.prefix_hits = 0
        """Of those, tokens found cached."""

    # ---- sizes --------------------------------------------------------------------------------

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        """Blocks nobody references, including cached ones that can be evicted."""
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of usable blocks referenced by some request."""
        return 1.0 - self.num_free_blocks / self.num_usable_blocks

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    def num_blocks_for(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    # ---- request lifecycle --------------------------------------------------------------------

    def allocate_for(self, request: Request) -> bool:
        """Give a request without blocks a block table for all its known tokens.

        Leading full blocks found in the prefix cache are shared (ref count + 1) and count as
        computed; the block holding the last known token is never taken from the cache, because
        that token must be computed to produce the logits of the next one. For a preempted request
        the known tokens include its output, so recompute reuses what it computed before.
        Sets num_computed_tokens (and num_cached_tokens on first admission). Returns False,
        changing nothing, if the pool cannot hold the request now.
        """
        assert not request.block_ids, f"{request.request_id} already holds blocks"
        hits = self._find_cached_prefix(request)
        num_new = self.num_blocks_for(request.num_tokens) - len(hits)
        num_revived = sum(1 for b in hits if b.ref_count == 0)  # hits that leave the free queue
        if num_new > self.num_free_blocks - num_revived:
            return False
        for block in hits:  # before allocating, so allocation cannot evict a hit
            self._touch(block)
        request.block_ids = [b.block_id for b in hits] + self._allocate(num_new)
        num_cached = len(hits) * self.block_size
        request.num_computed_tokens = num_cached
        if request.status is RequestStatus.WAITING:  # not a re-admission after preemption
            request.num_cached_tokens = num_cached
        self._num_hashed[request.request_id] = len(hits)
        self.prefix_queries += request.num_tokens
        self.prefix_hits += num_cached
        return True

    def append_slots(self, request: Request, num_new_tokens: int) -> bool:
        """Ensure the block table covers num_computed_tokens + num_new_tokens tokens.
        Returns False, changing nothing, if the pool has too few free blocks."""
        num_tokens = request.num_computed_tokens + num_new_tokens
        num_new = self.num_blocks_for(num_tokens) - len(request.block_ids)
        if num_new > self.num_free_blocks:
            return False
        request.block_ids.extend(self._allocate(num_new))
        return True

    def cache_full_blocks(self, request: Request) -> None:
        """Hash the blocks that became full and computed since the last call, making them
        findable by later requests. Call after advancing num_computed_tokens."""
        if not self.enable_prefix_caching:
            return
        start = self._num_hashed.get(request.request_id, 0)
        end = request.num_computed_tokens // self.block_size
        if end <= start:
            return
        bs = self.block_size
        parent = self.blocks[request.block_ids[start - 1]].block_hash if start else None
        tokens = request.token_slice(start * bs, end * bs)
        for i in range(start, end):
            block = self.blocks[request.block_ids[i]]
            offset = (i - start) * bs
            parent = hash_block_tokens(parent, tokens[offset : offset + bs])
            block.block_hash = parent
            self._cached.setdefault(parent, block)
        self._num_hashed[request.request_id] = end

    def free(self, request: Request) -> None:
        """Drop the request's references; blocks nobody else uses return to the free queue."""
        for block_id in reversed(request.block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = block
                if block.block_hash is None:
                    self._free.move_to_end(block_id, last=False)
        request.block_ids = []
        self._num_hashed.pop(request.request_id, None)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block (e.g. after new weights are loaded). Only possible when no
        block is in use; returns False otherwise."""
        if self.num_free_blocks != self.num_usable_blocks:
            return False
        for block in self.blocks:
            block.block_hash = None
        self._cached.clear()
        return True

    # ---- internals ----------------------------------------------------------------------------

    def _find_cached_prefix(self, request: Request) -> list[KVBlock]:
        if not self.enable_prefix_caching:
            return []
        bs = self.block_size
        num_candidates = (request.num_tokens - 1) // bs  # full blocks before the last token's
        tokens = request.token_slice(0, num_candidates * bs)
        hits: list[KVBlock] = []
        parent = None
        for i in range(num_candidates):
            parent = hash_block_tokens(parent, tokens[i * bs : (i + 1) * bs])
            block = self._cached.get(parent)
            if block is None:
                break
            hits.append(block)
        return hits

    def _touch(self, block: KVBlock) -> None:
        if block.ref_count == 0:
            del self._free[block.block_id]
        block.ref_count += 1

    def _allocate(self, num: int) -> list[int]:
        """Pop `num` blocks from the head of the free queue, evicting their cached hashes."""
        block_ids = []
        for _ in range(num):
            _, block = self._free.popitem(last=False)
            if block.block_hash is not None:
                if self._cached.get(block.block_hash) is block:
                    del self._cached[block.block_hash]
                block.block_hash = None
            block.ref_count = 1
            block_ids.append(block.block_id)
        return block_ids

    # ---- checking -----------------------------------------------------------------------------

    def check_invariants(self, requests: Iterable[Request] | None = None) -> None:
        """Raise AssertionError if the bookkeeping is inconsistent. With `requests` (every request
        holding blocks), also check that ref counts equal block-table occurrences and that each
        hashed block's hash matches the tokens the request has at that place."""
        null = self.blocks[NULL_BLOCK_ID]
        check_invariant(
            null.ref_count == 0 and NULL_BLOCK_ID not in self._free, "null block in use"
        )
        for block in self.blocks[NULL_BLOCK_ID + 1 :]:
            check_invariant(
                block.ref_count >= 0, f"block {block.block_id} has ref {block.ref_count}"
            )
            free = block.block_id in self._free
            check_invariant(
                free == (block.ref_count == 0), f"block {block.block_id} free={free} ref!=0"
            )
        for block_hash, block in self._cached.items():
            check_invariant(
                block.block_hash == block_hash, f"cache entry -> block {block.block_id}"
            )
        if requests is None:
            return
        requests = list(requests)
        refs = Counter(bid for req in requests for bid in req.block_ids)
        for block in self.blocks:
            check_invariant(
                block.ref_count == refs[block.block_id],
                f"block {block.block_id}: ref {block.ref_count}, in {refs[block.block_id]} tables",
            )
        for req in requests:
            self._check_request(req)

    def _check_request(self, req: Request) -> None:
        rid = req.request_id
        check_invariant(
            len(set(req.block_ids)) == len(req.block_ids), f"{rid}: block twice in its table"
        )
        check_invariant(
            len(req.block_ids) * self.block_size >= req.num_computed_tokens,
            f"{rid}: computed tokens beyond its blocks",
        )
        num_hashed = self._num_hashed.get(rid, 0)
        check_invariant(
            num_hashed * self.block_size <= req.num_computed_tokens, f"{rid}: hashed uncomputed"
        )
        bs, parent = self.block_size, None
        for i in range(num_hashed):
            parent = hash_block_tokens(parent, req.token_slice(i * bs, (i + 1) * bs))
            check_invariant(
                self.blocks[req.block_ids[i]].block_hash == parent, f"{rid}: block {i} hash"
            )


def check_invariant(condition: bool, message: str) -> None:
    """`assert` that keeps checking under python -O (for the invariant checkers)."""
    if not condition:
        raise AssertionError(message)
