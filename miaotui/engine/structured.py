"""Structured outputs with llguidance: a request's StructuredOutput becomes a grammar, the grammar a
per-request matcher, and each step the matchers of the sampled rows fill one token bitmask
(batched, in llguidance's own threads) while the forward pass runs. The sampler applies the masks
and commits the chosen tokens back. Never fails open: a constraint that cannot be compiled is a
request error before any token, and a matcher that reaches an error state fails the step.

Grammars come from llguidance's compilers: JSON schema (its strict subset of draft 2020-12), regex,
Lark; a choice list is an alternation of JSON-escaped string literals in Lark.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from miaotui.errors import InvalidRequestError, MiaotuiError
from miaotui.sampling_params import SamplingParams, StructuredOutput


class GrammarError(MiaotuiError):
    """A matcher rejected a token it had allowed: a bug, never silently ignored."""


def grammar_for(spec: StructuredOutput) -> str:
    """The llguidance grammar of `spec`, checked without a tokenizer. Raises InvalidRequestError
    naming what is wrong (a bad schema, regex or grammar)."""
    from llguidance import LLMatcher

    if spec.json_schema is not None:
        try:
            schema = json.loads(spec.json_schema)
        except json.JSONDecodeError as e:
            raise InvalidRequestError(f"the JSON schema is not valid JSON: {e}", "schema") from e
        try:
            grammar = LLMatcher.grammar_from_json_schema(
                schema, defaults={"whitespace_flexible": False}
            )
        except Exception as e:  # raised for schemas it cannot even parse
            raise InvalidRequestError(f"invalid JSON schema: {e}", "schema") from e
        what = "JSON schema"
    elif spec.regex is not None:
        grammar, what = LLMatcher.grammar_from_regex(spec.regex), "regex"
    elif spec.grammar is not None:
        grammar, what = LLMatcher.grammar_from_lark(spec.grammar), "grammar"
    else:
        alternatives = " | ".join(json.dumps(c) for c in spec.choice or ())
        grammar, what = LLMatcher.grammar_from_lark(f"start: {alternatives}"), "choice"
    error = LLMatcher.validate_grammar(grammar)
    if error:
        raise InvalidRequestError(f"invalid {what}: {error.strip()}", what.split()[-1].lower())
    return grammar


@dataclass
class MaskStats:
    """Running totals of the masking work (what bench/bench_structured.py reports)."""

    steps: int = 0
    rows: int = 0
    fill_s: float = 0.0
    """Time spent filling masks (in the mask thread, beside the forward pass)."""
    wait_s: float = 0.0
    """Time the sampler waited for masks and applied them (on the step's critical path)."""


@dataclass
class GrammarStep:
    """One step's constrained rows: their masks (being computed) and matchers."""

    rows: list[int]
    """Indices, among the step's sampled rows, of the constrained ones."""
    matchers: list
    """Their llguidance matchers, in the same order."""
    bitmask: torch.Tensor
    """(len(rows), ceil(V / 32)) int32, filled by `pending`."""
    pending: Future
    stats: MaskStats

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (B, V) float32 -> a copy with every token the grammars forbid at -inf."""
        t0 = time.perf_counter()
        masked = self._apply(logits)
        self.stats.wait_s += time.perf_counter() - t0
        return masked

    def _apply(self, logits: torch.Tensor) -> torch.Tensor:
        self.pending.result()
        batch, vocab = logits.shape
        bits = np.unpackbits(
            self.bitmask.numpy().view(np.uint8), axis=1, count=vocab, bitorder="little"
        )
        allowed = torch.from_numpy(bits.view(np.bool_))  # (len(rows), V), no copy
        if not bool(allowed.any(dim=1).all()):
            raise GrammarError("a grammar allows no token at all (its matcher is stuck)")
        if len(self.rows) < batch:  # unconstrained rows keep every token
            full = torch.ones(batch, vocab, dtype=torch.bool)
            full[self.rows] = allowed
            allowed = full
        return torch.where(allowed, logits, float("-inf"))

    def commit(self, token_ids: list[int]) -> None:
        """Advance each matcher by its row's sampled token."""
        for row, matcher in zip(self.rows, self.matchers):
            if not matcher.consume_token(token_ids[row]):
                error = matcher.get_error()
                raise GrammarError(f"the grammar rejected token {token_ids[row]}: {error}")


class StructuredOutputs:
    """Per engine: the llguidance tokenizer (built on first use, ~0.3 s), the executor that
    fills masks in parallel, and one thread that runs it beside the forward pass."""

    def __init__(self, tokenizer, vocab_size: int):
        self.tokenizer = tokenizer
        self.vocab_size = max(vocab_size, tokenizer.vocab_size)
        """Bits per mask row: the model's logits and the tokenizer's ids, whichever is more."""
        self._lltok = None
        self._executor = None
        self._thread: ThreadPoolExecutor | None = None
        self.stats = MaskStats()

    def matcher_for(self, params: SamplingParams):
        """A fresh matcher for the request, or None if it is unconstrained."""
        if params.structured is None:
            return None
        from llguidance import LLMatcher

        grammar = grammar_for(params.structured)
        matcher = LLMatcher(self._llguidance_tokenizer(), grammar)
        if matcher.is_error():
            raise InvalidRequestError(f"invalid constraint: {matcher.get_error()}", "structured")
        return matcher

    def start_step(self, matchers: list) -> GrammarStep | None:
        """Begin filling the masks of this step's constrained rows (None if there are none)."""
        rows = [i for i, m in enumerate(matchers) if m is not None]
        if not rows:
            return None
        from llguidance.torch import allocate_token_bitmask, fill_next_token_bitmask_par

        active = [matchers[i] for i in rows]
        bitmask = allocate_token_bitmask(len(rows), self.vocab_size)
        if self._thread is None:
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="miaotui-grammar")
        executor = self._llguidance_executor()

        def fill() -> None:
            t0 = time.perf_counter()
            fill_next_token_bitmask_par(executor, [(m, i) for i, m in enumerate(active)], bitmask)
            self.stats.fill_s += time.perf_counter() - t0

        self.stats.steps += 1
        self.stats.rows += len(rows)
        return GrammarStep(rows, active, bitmask, self._thread.submit(fill), self.stats)

    def _llguidance_tokenizer(self):
        if self._lltok is None:
            from llguidance import LLTokenizer

            self._lltok = LLTokenizer(
                self.tokenizer.tok.to_str(),
                n_vocab=self.vocab_size,
                eos_token=sorted(self.tokenizer.stop_ids),
            )
        return self._lltok

    def _llguidance_executor(self):
        if self._executor is None:
            from llguidance import LLExecutor

            self._executor = LLExecutor()
        return self._executor
