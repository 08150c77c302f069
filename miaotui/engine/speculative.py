"""Speculative decoding: propose a few tokens, score them in the same forward pass, keep the
longest prefix the model agrees with.

On a CPU a decode step is bound by reading the weights once, so scoring k proposed tokens as
extra query tokens of the step costs little more than one. The proposer here is prompt lookup
(`ngram`, no second model): the last n tokens (n = ngram_max .. 1) are matched against the
request's earlier tokens, prompt and output alike, and the tokens that followed the latest match
are proposed. Text that copies its context (extractive answers, edits, code) accepts long runs.
The model proposers (`draft:MODEL`, `layerskip[:N]`) are in engine/draft.py.

Verification (engine.LLMEngine._verify) samples each scored row in order with the request's own
sampler and generator and stops at the first row whose token differs from the proposal. A
proposal is deterministic (a point mass q), so "sample from p, accept while it equals the draft"
is exactly rejection sampling (accept d with probability p(d), on rejection draw from p
restricted to x != d): greedy and seeded sampled output are token-for-token what they are
without speculation, with the same random draws consumed in the same order.

How many tokens to propose adapts per request: one more than were accepted last time (start
START_TOKENS, at most num_speculative_tokens), because on a CPU each extra scored token costs
(a step of 1 + k tokens: ~1.5x at k = 2, ~2x at k = 4) and only long accepted runs pay for many.
A request whose proposals keep failing backs off: after m proposals in a row with nothing
accepted (for a draft model: fewer than pay for its passes) it skips 2^m steps (at most
MAX_BACKOFF), so low-acceptance text pays almost nothing; with a draft model the engine also
stops proposing for everyone (but a probe every PROBE_EVERY steps) once UNPAID_LIMIT runs in a
row did not pay.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_BACKOFF = 16
START_TOKENS = 2
UNPAID_LIMIT = 8
"""A draft model's runs in a row, across all requests, that did not pay for themselves: after
this many the engine proposes only every PROBE_EVERY steps until one pays (each new request
would otherwise pay its own back-off ramp, and a draft pass costs much more than a lookup)."""
PROBE_EVERY = 32


@dataclass
class SpecState:
    """Per-request proposer state (lives on the Request)."""

    misses: int = 0
    """Proposals in a row with no token accepted."""
    skip: int = 0
    """Steps left before proposing again."""
    proposed: int = 0
    accepted: int = 0
    next_tokens: int = START_TOKENS
    """How many to propose next time (capped by the engine's num_speculative_tokens)."""
    draft_computed: int = 0
    """A separate draft model (engine/draft.py): leading tokens whose draft KV is cached, if
    still known (the engine takes the min with num_computed_tokens, and resets it to 0 when
    the request is (re-)admitted)."""

    min_accepted: int = 1
    """Accepted tokens the last proposal run needed to pay for itself (a draft model's passes
    cost: engine/draft.py); fewer count as a miss."""

    def record(self, num_proposed: int, num_accepted: int) -> None:
        self.proposed += num_proposed
        self.accepted += num_accepted
        self.next_tokens = max(1, num_accepted + 1)
        if num_accepted >= self.min_accepted:
            self.misses = 0
            return
        self.misses += 1
        self.skip = min(MAX_BACKOFF, 2**self.misses)

    def ready(self) -> bool:
        if self.skip > 0:
            self.skip -= 1
            return False
        return True


def propose_ngram(tokens: list[int], k: int, ngram_max: int = 3, ngram_min: int = 1) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the longest suffix
    (ngram_max .. ngram_min tokens) of `tokens`; [] when no suffix occurs earlier.

    Searched in the reversed list, where the suffix is a prefix and list.index runs in C: a
    match starting at j (j >= 1) in `rev` is followed, in reading order, by rev[j-1], rev[j-2], ..
    """
    rev = tokens[::-1]
    for n in range(min(ngram_max, len(tokens) - 1), ngram_min - 1, -1):
        head, j = rev[:n], 0
        while True:
            try:
                j = rev.index(head[0], j + 1)
            except ValueError:
                break
            if rev[j : j + n] == head:
                return rev[max(0, j - k) : j][::-1]
    return []
