"""The Python API: `LLM(model=...).generate(prompts, SamplingParams(...))` and `.chat(messages)`."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from miaotui.config import EngineConfig
from miaotui.engine.engine import LLMEngine, RequestOutput
from miaotui.engine.sampler import SampledToken
from miaotui.loader import build_engine
from miaotui.sampling_params import SamplingParams

Message = dict[str, Any]


@dataclass
class Completion:
    """One generated continuation."""

    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[SampledToken] = field(default_factory=list)


@dataclass
class GenerationResult:
    """Everything generated for one prompt (n completions) with its timings."""

    prompt: str | list[int]
    prompt_token_ids: list[int]
    outputs: list[Completion]
    time_to_first_token: float
    """Seconds from submission to the first token."""
    total_time: float
    """Seconds from submission to the last token."""

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def decode_tokens_per_s(self) -> float:
        n = sum(len(o.token_ids) for o in self.outputs)
        span = self.total_time - self.time_to_first_token
        return (n - len(self.outputs)) / span if span > 0 else float("nan")


class LLM:
    """An engine on one model: `LLM(EngineConfig(...))`, or as a convenience
    `LLM("model", device="cpu", max_model_len=256)` with flat keyword arguments (any field of
    EngineConfig or of its sub-configs; see EngineConfig.from_kwargs)."""

    def __init__(self, model: EngineConfig | str | None = None, **kwargs: Any):
        if isinstance(model, EngineConfig):
            if kwargs:
                raise TypeError(
                    f"LLM(EngineConfig, ...) takes no keyword arguments, got {sorted(kwargs)}"
                )
            config = model
        else:
            config = EngineConfig.from_kwargs(model=model, **kwargs)
        self.config = config
        self.engine: LLMEngine = build_engine(config)
        self.tokenizer = self.engine.tokenizer

    @classmethod
    def from_engine(cls, engine: LLMEngine) -> LLM:
        llm = cls.__new__(cls)
        llm.config, llm.engine, llm.tokenizer = EngineConfig(), engine, engine.tokenizer
        return llm

    def generate(
        self,
        prompts: str | list[int] | list[str] | list[list[int]],
        params: SamplingParams | None = None,
    ) -> list[GenerationResult]:
        """Generate for every prompt in one continuous batch; results in prompt order."""
        params = params or SamplingParams()
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        start = time.monotonic()
        ids_of: dict[str, tuple[int, int]] = {}
        try:
            for i, prompt in enumerate(prompts):
                for j in range(params.n):
                    rid = self.engine.add_request(prompt, _with_seed(params, j))
                    ids_of[rid] = (i, j)
        except BaseException:  # one bad prompt rejects the whole call and leaves nothing queued
            for rid in ids_of:
                self.engine.abort(rid)
            raise
        finals: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished():
            for out in self.engine.step():
                if out.finished:
                    finals[out.request_id] = out
        return self._collect(prompts, params.n, ids_of, finals, start)

    def chat(
        self, messages: list[Message] | list[list[Message]], params: SamplingParams | None = None
    ) -> list[GenerationResult]:
        """Render each conversation with the model's chat template and generate the reply."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.tokenizer.apply_chat_template(c) for c in convs]  # type: ignore[arg-type]
        return self.generate(prompts, params)

    def stream(
        self, prompt: str | list[int], params: SamplingParams | None = None
    ) -> Iterator[RequestOutput]:
        """Yield outputs (with `delta_text`) as tokens are produced."""
        rid = self.engine.add_request(prompt, params or SamplingParams())
        try:
            while True:
                for out in self.engine.step():
                    if out.request_id == rid:
                        yield out
                        if out.finished:
                            return
        finally:
            self.engine.abort(rid)

    def _collect(self, prompts, n, ids_of, finals, start) -> list[GenerationResult]:
        grouped: list[list[RequestOutput | None]] = [[None] * n for _ in prompts]
        for rid, (i, j) in ids_of.items():
            grouped[i][j] = finals[rid]
        results = []
        for prompt, outs in zip(prompts, grouped):
            first = min(o.first_token_time or start for o in outs)
            last = max(o.finish_time or start for o in outs)
            results.append(
                GenerationResult(
                    prompt=prompt,
                    prompt_token_ids=outs[0].prompt_token_ids,
                    outputs=[
                        Completion(o.text, o.token_ids, o.finish_reason, o.logprobs) for o in outs
                    ],
                    time_to_first_token=first - start,
                    total_time=last - start,
                )
            )
        return results


def _with_seed(params: SamplingParams, j: int) -> SamplingParams:
    """The j-th of n completions: distinct but reproducible seeds when a seed is given."""
    if params.seed is None or j == 0:
        return dataclasses.replace(params, n=1)
    return dataclasses.replace(params, n=1, seed=params.seed + j)
