"""OpenAI request schemas (pydantic). Wrong types and out-of-range values fail validation here
and become HTTP 400 with the offending field named.

Numbers and booleans are strict, as in OpenAI's API: "5" is not an integer and 1 is not a
boolean. Fields whose meaning we do not implement are refused rather than silently ignored."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

# torch.Generator.manual_seed accepts [-2**63, 2**64); n > 1 adds up to 15 to the seed.
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1


def _strict(default: Any = None, **bounds: Any) -> Any:
    return Field(default=default, strict=True, **bounds)


class StreamOptions(BaseModel):
    include_usage: bool = _strict(False)


class SamplingFields(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions.

    Structured outputs: `response_format` ({"type": "json_object"} or {"type": "json_schema",
    "json_schema": {"name", "schema", "strict"}}), or one of vLLM's extra fields `guided_json`
    (a schema), `guided_regex`, `guided_grammar` (Lark) and `guided_choice` (a list of strings)."""

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
    response_format: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_grammar: str | None = None
    guided_choice: list[str] | None = None

    @field_validator("stop")
    @classmethod
    def _at_most_8_stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 8:
            raise ValueError(f"at most 8 stop strings, got {len(v)}")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _token_ids_and_bounds(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (v or {}).items():
            if not key.isdigit():
                raise ValueError(f"keys are token ids written as strings, got {key!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"biases are in [-100, 100], got {bias} for token {key}")
        return v

    @field_validator("response_format")
    @classmethod
    def _known_format(cls, v: dict[str, Any] | None):
        if v is None:
            return v
        kind = v.get("type")
        if kind not in ("text", "json_object", "json_schema"):
            raise ValueError(
                f"type {kind!r} is not supported; use 'text', 'json_object' or 'json_schema'"
            )
        if kind == "json_schema":
            spec = v.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict | bool):
                raise ValueError("json_schema must be an object with a 'schema' object")
        return v

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed when stream is true")
        return self


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]]
    max_tokens: int | None = _strict(None, ge=0)  # 0 only with echo

    @field_validator("prompt", mode="before")
    @classmethod
    def _integer_token_ids(cls, v: Any) -> Any:
        rows = v if isinstance(v, list) and v and all(isinstance(r, list) for r in v) else [v]
        for row in rows:
            if isinstance(row, list) and any(not isinstance(t, str) for t in row):
                bad = [t for t in row if isinstance(t, bool) or not isinstance(t, int)]
                if bad:
                    raise ValueError(f"token ids must be integers, got {bad[0]!r}")
        return v

    logprobs: int | None = _strict(None, ge=0, le=20)
    echo: bool = _strict(False)
    best_of: int | None = _strict(None, ge=1)
    suffix: str | None = None

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v: str | None) -> str | None:
        if v:
            raise ValueError(
                "suffix (fill-in-the-middle) is not supported: this model has no infill tokens"
            )
        return v


class FunctionCall(BaseModel):
    name: str
    arguments: str


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

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

    @model_validator(mode="after")
    def _content_where_needed(self):
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"content: a {self.role} message needs content")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("tool_call_id: a tool message needs the id of the call it answers")
        return self

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p["text"] for p in self.content)
        return self.content or ""


class FunctionDefinition(BaseModel):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: dict[str, str]


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = _strict(None, ge=1)
    logprobs: bool = _strict(False)
    top_logprobs: int | None = _strict(None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = _strict(True)

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: only allowed when logprobs is true")
        return self

    @model_validator(mode="after")
    def _tool_choice_names_a_tool(self):
        choice = self.tool_choice
        if choice is None or choice == "none":
            return self
        names = [t.function.name for t in self.tools or ()]
        if not names:
            raise ValueError("tool_choice: given without tools")
        if isinstance(choice, NamedToolChoice) and choice.function.get("name") not in names:
            raise ValueError(
                f"tool_choice: no tool named {choice.function.get('name')!r}; tools: {names}"
            )
        return self
