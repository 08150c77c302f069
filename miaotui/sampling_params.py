"""How a request wants its tokens chosen and when to stop."""

from __future__ import annotations

from dataclasses import dataclass, field

from miaotui.errors import InvalidRequestError


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

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        checks = [
            ("max_tokens", self.max_tokens >= 1, "an integer >= 1"),
            ("temperature", 0.0 <= self.temperature <= 100.0, "between 0 and 100"),
            ("top_k", self.top_k >= 0, ">= 0 (0 disables)"),
            ("top_p", 0.0 < self.top_p <= 1.0, "in (0, 1]"),
            ("min_p", 0.0 <= self.min_p <= 1.0, "in [0, 1]"),
            ("repetition_penalty", self.repetition_penalty > 0.0, "> 0"),
            ("presence_penalty", -2.0 <= self.presence_penalty <= 2.0, "in [-2, 2]"),
            ("frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0, "in [-2, 2]"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= 20, "in [0, 20]"),
            ("n", 1 <= self.n <= 16, "in [1, 16]"),
        ]
        for name, ok, accepted in checks:
            if not ok:
                raise InvalidRequestError(
                    f"{name}={getattr(self, name)!r} is out of range; expected {accepted}", name
                )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
