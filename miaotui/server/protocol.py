"""OpenAI request schemas (pydantic). Wrong types and out-of-range values fail validation here
and become HTTP 400 with the offending field named.

Numbers and booleans are strict, as in OpenAI's API: "5" is not an integer and 1 is not a
boolean. Fields whose meaning we do not implement are refused rather than silently ignored."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# torch.Generator.manual_seed accepts [-2**63, 2**64); n > 1 adds up to 15 to the seed.
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1


def _strict(default: Any = None, **bounds: Any) -> Any:
    return Field(default=default, strict=True, **bounds)


class StreamOptions(BaseModel):
    include_usage: bool = _strict(False)


class SamplingFields(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = _strict(None, ge=1)
    temperature: float = _strict(1.0, ge=0.0, le=2.0)
    top_p: float = _strict(1.0, gt=0.0, le=1.0)
    top_k: int = _strict(0, ge=-1)
    min_p: float = _strict(0.0, ge=0.0, le=1.0)
    n: int = _strict(1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = _strict(None, ge=SEED_MIN, le=SEED_MAX)
    presence_penalty: float = _strict(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = _strict(0.0, ge=-2.0, le=2.0)
    # Below 0.01 the penalised logits overflow float32 and sampling produces NaN.
    repetition_penalty: float = _strict(1.0, ge=0.01, le=10.0)
    stream: bool = _strict(False)
    stream_options: StreamOptions | None = None
    ignore_eos: bool = _strict(False)
    user: str | None = None
    logit_bias: dict[str, float] | None = None

    @field_validator("stop")
    @classmethod
    def _at_most_8_stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 8:
            raise ValueError(f"at most 8 stop strings, got {len(v)}")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v:
            raise ValueError("logit_bias is not supported by this server")
        return v


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = _strict(None, ge=0, le=20)
    echo: bool = _strict(False)
    best_of: int | None = _strict(None, ge=1)
    suffix: str | None = None

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v: bool) -> bool:
        if v:
            raise ValueError("echo is not supported by this server")
        return v

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, v: int | None) -> int | None:
        if v is not None and v > 1:
            raise ValueError(f"best_of={v} is not supported by this server (only 1)")
        return v

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v: str | None) -> str | None:
        if v:
            raise ValueError("suffix is not supported by this server")
        return v


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None

    @field_validator("content")
    @classmethod
    def _text_parts_only(cls, v: str | list[dict[str, Any]] | None):
        if isinstance(v, list):
            for part in v:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError(
                        f"only text content parts are supported, got {part.get('type')!r}"
                    )
        return v

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p["text"] for p in self.content)
        return self.content or ""


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = _strict(None, ge=1)
    logprobs: bool = _strict(False)
    top_logprobs: int | None = _strict(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, v: list[dict[str, Any]] | None):
        if v:
            raise ValueError("tools are not supported by this server")
        return v

    @field_validator("response_format")
    @classmethod
    def _text_format_only(cls, v: dict[str, Any] | None):
        if v is not None and v.get("type") != "text":
            raise ValueError(f"response_format {v.get('type')!r} is not supported (only 'text')")
        return v
