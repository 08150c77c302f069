"""POST /tokenize and /detokenize (vLLM's shapes): text or chat messages -> token ids with the
served model's tokenizer (and chat template), and back; GET /tokenizer_info (its special tokens
and chat template), which lm-eval's remote tokenizer reads."""

from __future__ import annotations

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator

from miaotui.server.errors import APIError
from miaotui.server.protocol import ChatMessage


class TokenizeRequest(BaseModel):
    """Either `prompt` (text) or `messages` (rendered with the chat template)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = Field(True, strict=True)
    add_generation_prompt: bool = Field(True, strict=True)

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("prompt: give exactly one of prompt and messages")
        return self


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[StrictInt]


def install_tokens(app: FastAPI, engine, check_model) -> None:
    tokenizer = engine.tokenizer

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest) -> dict:
        check_model(req)
        if req.messages is not None:
            messages = [{"role": m.role, "content": m.text()} for m in req.messages]
            text = tokenizer.apply_chat_template(messages, req.add_generation_prompt)
        else:
            text = req.prompt
        ids = tokenizer.encode(text, add_special=req.add_special_tokens)
        return {"count": len(ids), "max_model_len": engine.max_model_len, "tokens": ids}

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict:
        info = tokenizer.info

        def text(token_id: int | None) -> str | None:
            return None if token_id is None else tokenizer.id_to_token(token_id)

        return {
            "eos_token": text(info.eos_id),
            "bos_token": text(info.bos_id),
            "pad_token": None,
            "add_bos_token": info.add_bos,
            "chat_template": info.chat_template,
            "model_max_length": engine.max_model_len,
            "vocab_size": tokenizer.vocab_size,
        }

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest) -> dict:
        check_model(req)
        bad = [t for t in req.tokens if not 0 <= t < tokenizer.vocab_size]
        if bad:
            raise APIError(400, f"tokens: ids {bad[:5]} are outside the vocabulary", "tokens")
        return {"prompt": tokenizer.decode(req.tokens, skip_special=False)}
