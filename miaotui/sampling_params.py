"""How a request wants its tokens chosen and when to stop."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass, field

from miaotui.errors import InvalidRequestError


@dataclass(frozen=True)
class StructuredOutput:
    """What the generated text must match: exactly one of the fields is set. Compiled into a
    token mask per step by engine/structured.py (llguidance)."""

    json_schema: str | None = None
    """A JSON schema, as JSON text ("{}" or {"type": "object"} for any JSON object)."""
    regex: str | None = None
    """A regular expression the whole text matches."""
    grammar: str | None = None
    """A Lark grammar (llguidance's dialect: `start` is the top rule)."""
    choice: tuple[str, ...] | None = None
    """The text is exactly one of these strings."""

    def __post_init__(self) -> None:
        if self.choice is not None:
            object.__setattr__(self, "choice", tuple(self.choice))
        given = [f for f in ("json_schema", "regex", "grammar", "choice") if getattr(self, f)]
        if len(given) != 1:
            raise InvalidRequestError(
                f"a structured output takes exactly one of json_schema, regex, grammar, choice; "
                f"got {given or 'none'}",
                "structured",
            )
        if self.choice is not None and not all(isinstance(c, str) and c for c in self.choice):
            raise InvalidRequestError(
                f"choice={list(self.choice)!r} must be a list of non-empty strings", "choice"
            )


@dataclass(frozen=True)
class SamplingParams:
    """Sampling and stopping for one request (OpenAI / vLLM semantics)."""

    max_tokens: int = 64
    """Most new tokens to generate."""
    temperature: float = 1.0
    """0 means greedy (argmax)."""
    top_k: int = 0
    """Keep the k most likely tokens (0: all)."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability reaches top_p."""
    min_p: float = 0.0
    """Drop tokens less likely than min_p times the most likely one."""
    repetition_penalty: float = 1.0
    """CTRL-style penalty on every token already in prompt or output (>1 discourages)."""
    presence_penalty: float = 0.0
    """Subtracted once from tokens already generated (OpenAI)."""
    frequency_penalty: float = 0.0
    """Subtracted per occurrence from tokens already generated (OpenAI)."""
    seed: int | None = None
    """Seed of this request's random generator: same seed, same tokens."""
    stop: tuple[str, ...] = field(default_factory=tuple)
    """Stop strings (not included in the output text)."""
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    """Extra token ids that end generation."""
    ignore_eos: bool = False
    """Keep generating past EOS/end-of-turn tokens (benchmarks)."""
    logprobs: int | None = None
    """Return the chosen token's log-probability and this many top alternatives."""
    n: int = 1
    """Number of independent completions."""
    skip_special_tokens: bool = True
    """Leave special tokens out of the text."""
    structured: StructuredOutput | None = None
    """Constrain the text to a JSON schema, a regex, a Lark grammar or a choice (never ignored:
    every sampled token is masked by the constraint)."""
    logit_bias: tuple[tuple[int, float], ...] = ()
    """(token id, bias) pairs added to the logits before sampling (OpenAI: -100..100)."""

    def __post_init__(self) -> None:
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        object.__setattr__(self, "stop", tuple(_sequence("stop", stop)))
        object.__setattr__(
            self, "stop_token_ids", tuple(_sequence("stop_token_ids", self.stop_token_ids))
        )
        _check_types(self)
        checks = [
            ("max_tokens", self.max_tokens >= 1, "an integer >= 1"),
            ("temperature", 0.0 <= self.temperature <= 100.0, "between 0 and 100"),
            ("top_k", self.top_k >= 0, ">= 0 (0 disables)"),
            ("top_p", 0.0 < self.top_p <= 1.0, "in (0, 1]"),
            ("min_p", 0.0 <= self.min_p <= 1.0, "in [0, 1]"),
            ("repetition_penalty", 0.0 < self.repetition_penalty < math.inf, "a finite number > 0"),
            ("presence_penalty", -2.0 <= self.presence_penalty <= 2.0, "in [-2, 2]"),
            ("frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0, "in [-2, 2]"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= 20, "in [0, 20]"),
            ("n", 1 <= self.n <= 16, "in [1, 16]"),
            # torch.Generator.manual_seed takes any 64-bit value, signed or not.
            ("seed", self.seed is None or -(2**63) <= self.seed < 2**64, "a 64-bit integer"),
            ("stop", all(isinstance(x, str) for x in self.stop), "a string or a list of strings"),
            (
                "stop_token_ids",
                all(_is_int(t) and t >= 0 for t in self.stop_token_ids),
                "a list of token ids >= 0",
            ),
        ]
        for name, ok, accepted in checks:
            if not ok:
                raise InvalidRequestError(
                    f"{name}={getattr(self, name)!r} is out of range; expected {accepted}", name
                )
        object.__setattr__(self, "logit_bias", tuple(_logit_bias(self.logit_bias)))
        if self.structured is not None and self.ignore_eos:
            raise InvalidRequestError(
                "ignore_eos cannot be combined with a structured output: the constraint ends "
                "the text with an end-of-sequence token",
                "ignore_eos",
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


_INTS = ("max_tokens", "top_k", "n", "logprobs", "seed")
_REALS = (
    "temperature",
    "top_p",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
)


def _is_int(x: object) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _check_types(p: SamplingParams) -> None:
    """Wrong types become a request error naming the field, not a TypeError deep inside."""
    for name in _INTS + _REALS:
        v = getattr(p, name)
        if v is None and name in ("logprobs", "seed"):
            continue
        ok = (
            _is_int(v) if name in _INTS else isinstance(v, numbers.Real) and not isinstance(v, bool)
        )
        if not ok:
            kind = "an integer" if name in _INTS else "a number"
            raise InvalidRequestError(f"{name}={v!r} has the wrong type; expected {kind}", name)


def _logit_bias(pairs: object) -> Iterable[tuple[int, float]]:
    items = pairs.items() if isinstance(pairs, dict) else _sequence("logit_bias", pairs)
    for item in items:
        token, bias = item
        ok_bias = isinstance(bias, numbers.Real) and not isinstance(bias, bool)
        if not (_is_int(token) and token >= 0 and ok_bias and -100 <= bias <= 100):
            raise InvalidRequestError(
                f"logit_bias entry {item!r} is invalid; expected a token id >= 0 and a bias "
                "in [-100, 100]",
                "logit_bias",
            )
        yield int(token), float(bias)


def _sequence(name: str, value: object) -> Iterable:
    if isinstance(value, Iterable):
        return value
    raise InvalidRequestError(f"{name}={value!r} has the wrong type; expected a list", name)
