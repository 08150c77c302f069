"""POST /v1/embeddings: the mean over an input's tokens of the model's final hidden state (after
the last norm), L2-normalized; `float` or `base64` (little-endian float32) encodings; a list of
inputs runs as one packed forward pass, each sequence attending only to itself.

The hidden states come from the server's own forward passes (forward.py)."""

from __future__ import annotations

import asyncio
import base64
from typing import Literal

import torch
from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from miaotui.server.errors import APIError
from miaotui.server.forward import ServerForward

MAX_INPUTS = 256


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    input: str | list[str] | list[StrictInt] | list[list[StrictInt]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, strict=True, ge=1)
    user: str | None = None


def embed(forward: ServerForward, sequences: list[list[int]]) -> torch.Tensor:
    """(B, C) float32 unit vectors: each sequence's hidden states, mean-pooled."""
    pooled = torch.stack([h.mean(0) for h in forward.hidden_states(sequences)])
    return torch.nn.functional.normalize(pooled, dim=-1)


def install_embeddings(app: FastAPI, engine, forward: ServerForward, check_model) -> None:
    @app.post("/v1/embeddings")
    async def embeddings(req: EmbeddingRequest) -> dict:
        check_model(req)
        sequences = _sequences(req.input, engine)
        vectors = await asyncio.to_thread(embed, forward, sequences)
        if req.dimensions is not None and req.dimensions != vectors.shape[1]:
            raise APIError(
                400, f"dimensions: this model's embeddings have {vectors.shape[1]}", "dimensions"
            )
        data = [
            {"object": "embedding", "index": i, "embedding": _encode(v, req.encoding_format)}
            for i, v in enumerate(vectors)
        ]
        tokens = sum(len(s) for s in sequences)
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return {"object": "list", "data": data, "model": req.model, "usage": usage}


def _sequences(given, engine) -> list[list[int]]:
    tokenizer = engine.tokenizer
    if isinstance(given, str) or (given and all(isinstance(t, int) for t in given)):
        given = [given]
    if not given:
        raise APIError(400, "input: give at least one input", "input")
    if len(given) > MAX_INPUTS:
        raise APIError(400, f"input: at most {MAX_INPUTS} inputs, got {len(given)}", "input")
    sequences = [tokenizer.encode(x) if isinstance(x, str) else list(x) for x in given]
    for i, ids in enumerate(sequences):
        if not ids:
            raise APIError(400, f"input: input {i} is empty", "input")
        if len(ids) > engine.max_model_len:
            raise APIError(
                400,
                f"input: input {i} has {len(ids)} tokens; this model's maximum context length "
                f"is {engine.max_model_len} tokens",
                "input",
                code="context_length_exceeded",
            )
        if not all(0 <= t < tokenizer.vocab_size for t in ids):
            raise APIError(400, f"input: input {i} has token ids outside the vocabulary", "input")
    return sequences


def _encode(vector: torch.Tensor, encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(vector.numpy().astype("<f4").tobytes()).decode()
    return vector.tolist()
