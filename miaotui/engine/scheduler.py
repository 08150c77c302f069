"""Continuous batching: which requests compute which tokens this step.

Each step (vLLM v1 / nano-vllm policy, FCFS):
1. Running requests, in arrival order, each get the tokens they are missing (1 for a decode, a
   chunk of at most `long_prefill_token_threshold` for a long prompt) within the step's token
   budget. If the pool cannot grow a request's block table, the most recently arrived running
   request is preempted by recompute: its blocks are freed (they stay in the prefix cache), its
   num_computed_tokens drops to 0, its output tokens are kept, and it returns to the FRONT of the
   waiting queue. If that victim is the request itself, the step stops scheduling running ones.
2. If nothing was preempted, waiting requests are admitted in FCFS order while the budget,
   `max_num_seqs` and the pool allow. Admission allocates blocks for all known tokens at once,
   so a chunked prompt never needs new blocks mid-prefill. The head of the queue is never
   skipped: a request that does not fit blocks the ones behind it (no starvation).

Because admission is strictly FCFS and preempted requests return to the queue front, `running`
stays in arrival order and its last element is the most recently arrived.

The scheduler is driven one step at a time: schedule() -> runner -> update_from_output().
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

from miaotui.config import SchedulerConfig
from miaotui.engine.block_pool import BlockPool, check_invariant
from miaotui.engine.request import Request, RequestStatus, check_prompt
from miaotui.errors import CapacityError, InvalidRequestError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScheduledRequest:
    """One request's share of a step (what NewRequest and CachedRequest have in common)."""

    request_id: str
    token_ids: list[int]
    """Tokens to compute this step, at positions start_pos .. start_pos + len - 1."""
    start_pos: int
    """num_computed_tokens before the step."""
    sample: bool
    """The step reaches the end of the known tokens: sample the next token from the last one."""


@dataclass(frozen=True)
class NewRequest(ScheduledRequest):
    """A request the runner holds no block table for: just admitted, or re-admitted after a
    preemption. Carries its whole block table."""

    block_ids: list[int]
    """The request's whole block table (a copy)."""
    num_spec: int = 0
    """Always 0: a request speculates only once it runs (see CachedRequest.num_spec)."""


@dataclass(frozen=True)
class CachedRequest(ScheduledRequest):
    """A request the runner already holds a block table for (it ran before and was not
    preempted since). Carries only the blocks appended this step, so its share of the message
    stays O(1) however long the request grows."""

    new_block_ids: list[int]
    """Blocks appended to the request's table this step (usually none, one per block_size
    decoded tokens)."""
    num_spec: int = 0
    """The last num_spec of token_ids are proposed (speculative) tokens: logits are needed for
    all 1 + num_spec last rows, and only the accepted ones become known tokens."""


@dataclass(frozen=True)
class SchedulerOutput:
    """One step, as the runner needs it (vLLM v1 splits new from cached request data the same
    way): the runner keeps each request's block table and applies these changes to it."""

    cached: list[CachedRequest]
    """Running requests scheduled this step, in batch order (they come first)."""
    new: list[NewRequest]
    """Requests admitted this step, in batch order (after the cached ones)."""
    freed_ids: list[str]
    """Requests whose blocks were freed (finished, aborted or preempted) since the previous
    step: the runner drops their block tables."""

    @property
    def scheduled(self) -> list[ScheduledRequest]:
        """Every request of the step, in batch order."""
        return [*self.cached, *self.new]


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_pool: BlockPool):
        """`config.max_model_len` must be set (SchedulerConfig.for_model caps it at a model's
        context)."""
        if config.max_model_len is None:
            raise ValueError("the scheduler needs max_model_len; use SchedulerConfig.for_model")
        needed = block_pool.num_blocks_for(config.max_model_len)
        if needed > block_pool.num_usable_blocks:
            # Otherwise a long request could not run even alone and would preempt itself forever.
            raise InvalidRequestError(
                f"the KV cache holds {block_pool.num_usable_blocks} blocks of "
                f"{block_pool.block_size} tokens, fewer than the {needed} one request of "
                f"max_model_len={config.max_model_len} needs; lower max_model_len or add blocks",
                "max_model_len",
            )
        self.config = config
        self.block_pool = block_pool
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        """Unfinished requests by id."""
        self.num_preemptions = 0
        self._freed_ids: list[str] = []
        """Freed since the last step handed to the runner (SchedulerOutput.freed_ids)."""

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # ---- requests in and out ------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queue a new request. Raises InvalidRequestError if it can never run, CapacityError if
        the waiting queue is full."""
        self._validate(request)
        if len(self.waiting) >= self.config.max_waiting:
            raise CapacityError(
                f"{len(self.waiting)} requests are waiting (max_waiting="
                f"{self.config.max_waiting}); retry later"
            )
        request.status = RequestStatus.WAITING
        self.waiting.append(request)
        self.requests[request.request_id] = request

    def abort_request(self, request_id: str) -> Request | None:
        """Finish a waiting or running request now, freeing its blocks. None if unknown."""
        return self.finish_request(request_id, RequestStatus.FINISHED_ABORTED)

    def finish_request(
        self, request_id: str, status: RequestStatus, stop_reason: int | str | None = None
    ) -> Request | None:
        """Finish a request from outside (abort, stop string). None if unknown or finished."""
        if not status.is_finished:
            raise ValueError(f"finish_request needs a FINISHED_* status, got {status}")
        request = self.requests.get(request_id)
        if request is None:
            return None
        if stop_reason is not None:
            request.stop_reason = stop_reason
        self._finish(request, status)
        return request

    # ---- one step -----------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        cached: list[CachedRequest] = []
        new: list[NewRequest] = []
        num_preempted = self.num_preemptions
        budget = self._schedule_running(cached)
        if self.num_preemptions == num_preempted:  # memory is tight after a preemption
            self._schedule_waiting(new, budget)
        if not cached and not new:  # nothing runs: the freed ids ride on the next real step
            return SchedulerOutput([], [], [])
        freed_ids, self._freed_ids = self._freed_ids, []
        return SchedulerOutput(cached, new, freed_ids)

    def update_from_output(
        self, output: SchedulerOutput, sampled_token_ids: dict[str, list[int]]
    ) -> list[Request]:
        """Record a finished step: advance computed tokens, cache full blocks, append sampled
        tokens, finish requests on eos / max_tokens / max_model_len. A request that scored k
        proposed tokens gets the a <= k it accepted plus the one sampled after them (a + 1
        tokens): the KV of the accepted ones is computed, that of the rejected ones is garbage
        beyond num_computed_tokens, overwritten when those positions are computed. Returns the
        requests that got new tokens (finished ones included, with their final status)."""
        updated = []
        for item in output.scheduled:
            request = self.requests.get(item.request_id)
            if request is None:  # aborted or finished between schedule() and now
                continue
            assert request.num_computed_tokens == item.start_pos, item.request_id
            request.num_computed_tokens += len(item.token_ids) - item.num_spec
            request.spec_token_ids = []
            if not item.sample:
                self.block_pool.cache_full_blocks(request)
                continue
            tokens = sampled_token_ids[item.request_id]
            if item.num_spec:
                request.spec.record(item.num_spec, len(tokens) - 1)
            updated.append(request)
            status = None
            for i, token in enumerate(tokens):
                request.output_token_ids.append(token)
                request.num_computed_tokens += i > 0  # an accepted proposal: its KV is in
                status = self._finish_status(request, token)
                if status is not None:
                    break
            self.block_pool.cache_full_blocks(request)
            if status is not None:
                self._finish(request, status)
        return updated

    def _finish_status(self, request: Request, token: int) -> RequestStatus | None:
        """How `token`, just appended, ends the request (None: it goes on)."""
        if token in request.eos_token_ids:
            request.stop_reason = token
            return RequestStatus.FINISHED_STOPPED
        if (
            request.num_output_tokens >= request.max_tokens
            or request.num_tokens >= self.config.max_model_len
        ):
            return RequestStatus.FINISHED_LENGTH
        return None

    # ---- internals ----------------------------------------------------------------------------

    def _schedule_running(self, scheduled: list[CachedRequest]) -> int:
        """Schedule running requests in order; returns the budget left."""
        budget = self.config.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = self._num_new_tokens(request, budget)
            spec = self._spec_tokens(request, num_new, budget)
            num_blocks = len(request.block_ids)
            while not self.block_pool.append_slots(request, num_new + len(spec)):
                victim = self.running.pop()  # the most recently arrived; index >= i
                self._preempt(victim)
                if victim is request:
                    return budget
            start = request.num_computed_tokens
            scheduled.append(
                CachedRequest(
                    request.request_id,
                    request.token_slice(start, start + num_new) + spec,
                    start,
                    start + num_new == request.num_tokens,
                    request.block_ids[num_blocks:],
                    len(spec),
                )
            )
            budget -= num_new + len(spec)
            i += 1
        return budget

    def _schedule_waiting(self, scheduled: list[NewRequest], budget: int) -> int:
        """Admit waiting requests in FCFS order; returns the budget left."""
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            if not self.block_pool.allocate_for(request):
                break  # the head waits for blocks; nobody jumps it
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            num_new = self._num_new_tokens(request, budget)
            start = request.num_computed_tokens
            scheduled.append(
                NewRequest(
                    request.request_id,
                    request.token_slice(start, start + num_new),
                    start,
                    start + num_new == request.num_tokens,
                    list(request.block_ids),
                )
            )
            budget -= num_new
        return budget

    def _spec_tokens(self, request: Request, num_new: int, budget: int) -> list[int]:
        """The request's proposed tokens that fit this step: only on a decode (its one missing
        token scheduled), within the budget, and no further than max_tokens or the context
        could use (the token sampled after the last accepted one counts too)."""
        if not request.spec_token_ids or request.num_tokens - request.num_computed_tokens != 1:
            return []
        room = min(
            budget - num_new,
            request.max_tokens - request.num_output_tokens - 1,
            self.config.max_model_len - request.num_tokens - 1,
        )
        return request.spec_token_ids[: max(0, room)]

    def _num_new_tokens(self, request: Request, budget: int) -> int:
        missing = request.num_tokens - request.num_computed_tokens
        return min(missing, self.config.chunk_size, budget)

    def _preempt(self, request: Request) -> None:
        self.block_pool.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        self.waiting.appendleft(request)
        self.num_preemptions += 1
        self._freed_ids.append(request.request_id)
        logger.debug(
            "preempted %s (%d tokens to recompute)", request.request_id, request.num_tokens
        )

    def _finish(self, request: Request, status: RequestStatus) -> None:
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        self.block_pool.free(request)
        request.status = status
        del self.requests[request.request_id]
        self._freed_ids.append(request.request_id)

    def _validate(self, request: Request) -> None:
        rid = request.request_id
        if rid in self.requests:
            raise InvalidRequestError(f"request id {rid!r} is already in use", "request_id")
        check_prompt(request.num_prompt_tokens, self.config.max_model_len)
        if request.max_tokens < 1:
            raise InvalidRequestError(
                f"max_tokens must be >= 1, got {request.max_tokens}", "max_tokens"
            )

    def check_invariants(self) -> None:
        """Raise AssertionError if the queues, statuses or block tables are inconsistent."""
        self.block_pool.check_invariants(self.running)
        ids = [r.request_id for r in self.running] + [r.request_id for r in self.waiting]
        check_invariant(sorted(ids) == sorted(self.requests), "requests dict != running + waiting")
        check_invariant(
            len(self.running) <= self.config.max_num_seqs, "more running than max_num_seqs"
        )
        for r in self.running:
            check_invariant(
                r.status is RequestStatus.RUNNING, f"{r.request_id} running as {r.status}"
            )
            check_invariant(
                r.num_computed_tokens < r.num_tokens, f"{r.request_id} has nothing to compute"
            )
        for r in self.waiting:
            check_invariant(
                r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED),
                f"{r.request_id} waiting as {r.status}",
            )
            check_invariant(
                not r.block_ids and r.num_computed_tokens == 0, f"{r.request_id} waits with KV"
            )
