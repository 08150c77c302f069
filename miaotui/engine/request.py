"""A generation request and its lifecycle.

There is no prefill or decode phase, only computed tokens catching up (vLLM v1): a request knows
`num_tokens` tokens (prompt + sampled output), of which the KV cache holds the first
`num_computed_tokens`. Each step computes some of the missing ones (all of them, or a chunk if the
token budget is short) and, when the step reaches the end of the known tokens, the runner samples
the next token. A fresh prompt, a chunk of a long prompt, a decode step and the recompute of a
preempted request are one code path: `num_new = req.num_tokens - req.num_computed_tokens`.

Lifecycle: WAITING -> RUNNING (-> PREEMPTED -> RUNNING ...) -> FINISHED_*. Any unfinished state
can go straight to FINISHED_ABORTED.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from miaotui.engine.speculative import SpecState
from miaotui.errors import InvalidRequestError


class RequestStatus(enum.Enum):
    WAITING = enum.auto()
    """Queued, never admitted; holds no KV blocks."""
    RUNNING = enum.auto()
    """Admitted: holds KV blocks and is scheduled every step the budget allows."""
    PREEMPTED = enum.auto()
    """Evicted to free KV blocks; back in the waiting queue, will recompute its tokens."""
    FINISHED_STOPPED = enum.auto()
    """Sampled an end-of-sequence token or hit a stop string."""
    FINISHED_LENGTH = enum.auto()
    """Reached max_tokens or the model's context length."""
    FINISHED_ABORTED = enum.auto()
    """Cancelled by the client or the engine."""

    @property
    def is_finished(self) -> bool:
        return self in _FINISH_REASONS

    @property
    def finish_reason(self) -> str | None:
        """OpenAI's `finish_reason` ("stop", "length", "abort"), None while unfinished."""
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


def check_prompt(num_prompt_tokens: int, max_model_len: int, param: str = "prompt") -> None:
    """The one check of a prompt's length, for the engine and the server alike: a request must
    leave room in the context for at least one generated token."""
    if num_prompt_tokens == 0:
        raise InvalidRequestError("the prompt is empty; give at least one token", param)
    if num_prompt_tokens >= max_model_len:
        raise InvalidRequestError(
            f"the prompt has {num_prompt_tokens} tokens but the context holds {max_model_len}; "
            f"shorten it to at most {max_model_len - 1} tokens",
            param,
        )


@dataclass(eq=False)  # identity semantics: two requests with equal fields are still two requests
class Request:
    """One generation: immutable inputs, then the state the scheduler and block pool mutate."""

    request_id: str
    """Unique among unfinished requests."""
    prompt_token_ids: list[int]
    """Prompt tokens (copied to a list on construction)."""
    max_tokens: int
    """Upper bound on sampled tokens."""
    eos_token_ids: frozenset[int] = frozenset()
    """Sampling one of these finishes the request (empty for ignore_eos)."""
    arrival_time: float = field(default_factory=time.monotonic)
    """time.monotonic() at arrival, for latency metrics."""

    output_token_ids: list[int] = field(default_factory=list)
    """Tokens sampled so far; kept across preemption (recompute includes them)."""
    num_computed_tokens: int = 0
    """Leading tokens of all_token_ids whose KV is in the cache."""
    status: RequestStatus = RequestStatus.WAITING
    block_ids: list[int] = field(default_factory=list)
    """The request's block table: block i holds the KV of tokens [i*block_size, (i+1)*block_size)."""
    num_cached_tokens: int = 0
    """Prompt tokens found in the prefix cache at first admission (usage metrics)."""
    stop_reason: int | str | None = None
    """The eos token id or stop string that finished the request, if any."""
    matcher: Any = None
    """The llguidance matcher of a structured output (engine/structured.py), None if free."""
    spec_token_ids: list[int] = field(default_factory=list)
    """Tokens proposed for the next decode step (engine/speculative.py); scored, not yet known."""
    spec: SpecState = field(default_factory=SpecState)
    """The proposer's per-request state (back-off, acceptance counts)."""

    def __post_init__(self) -> None:
        self.prompt_token_ids = list(self.prompt_token_ids)
        self.eos_token_ids = frozenset(self.eos_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        """All known tokens: prompt + sampled output."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        """A new list of prompt + output tokens."""
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def token_slice(self, start: int, end: int) -> list[int]:
        """all_token_ids[start:end] without concatenating the whole history (hot path)."""
        num_prompt = len(self.prompt_token_ids)
        if start >= num_prompt:
            return self.output_token_ids[start - num_prompt : end - num_prompt]
        if end <= num_prompt:
            return self.prompt_token_ids[start:end]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - num_prompt]
