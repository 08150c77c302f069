"""POST /v1/embeddings: the mean over an input's tokens of the model's final hidden state (after
the last norm), L2-normalized; `float` or `base64` (little-endian float32) encodings; a list of
inputs runs as one packed forward pass, each sequence attending only to itself.

The hidden states come from a `Transformer` (the engine's own, with its own KV cache here, when
it serves packed or float weights; the native step only returns logits, so then a float build of
the same checkpoint is loaded on the first embeddings request). Forward passes run in a worker
thread, one at a time, so the event loop and the engine's step loop keep going."""

from __future__ import annotations

import asyncio
import base64
import threading
from typing import Literal

import torch
from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from miaotui.server.errors import APIError

BLOCK = 16
MAX_INPUTS = 256


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    input: str | list[str] | list[StrictInt] | list[list[StrictInt]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, strict=True, ge=1)
    user: str | None = None


class Embedder:
    """Mean-pooled, normalized final hidden states of token sequences."""

    def __init__(self, engine, model_path: str | None):
        self.engine, self.model_path = engine, model_path
        self._model = None
        self._lock = threading.Lock()

    def model(self):
        if self._model is None:
            from miaotui.model.transformer import Transformer

            runner_model = self.engine.engine.runner.model
            if isinstance(runner_model, Transformer):
                self._model = runner_model
            elif self.model_path is None:
                raise APIError(400, "embeddings need the model's path", "model")
            else:
                from miaotui.load.open import open_checkpoint
                from miaotui.model.build import build_model

                ckpt = open_checkpoint(self.model_path)
                self._model = build_model(ckpt, torch.device("cpu"), torch.float32, "float")
        return self._model

    @torch.inference_mode()
    def embed(self, sequences: list[list[int]]) -> torch.Tensor:
        """(B, C) float32 unit vectors, one per sequence."""
        from miaotui.model.attention import build_attention_metadata
        from miaotui.model.kv_cache import KVCache

        with self._lock:
            model = self.model()
            c = model.config
            tables, next_block = [], 1  # block 0 stays unused, like the pool's null block
            for ids in sequences:
                n = -(-len(ids) // BLOCK)
                tables.append(list(range(next_block, next_block + n)))
                next_block += n
            n_kv_heads, dtype, device = model.kv_spec()
            cache = KVCache(c.n_layers, next_block * BLOCK, n_kv_heads, c.head_dim, dtype, device)
            lens = [len(ids) for ids in sequences]
            meta = build_attention_metadata([0] * len(lens), lens, tables, BLOCK, c.sliding_window)
            packed = torch.tensor([t for ids in sequences for t in ids], device=device)
            hidden = model.hidden_states(packed, meta, cache).float()  # (N, C)
            pooled = torch.stack([h.mean(0) for h in hidden.split(lens)])  # (B, C)
            return torch.nn.functional.normalize(pooled, dim=-1)


def install_embeddings(app: FastAPI, engine, config, check_model) -> None:
    embedder = Embedder(engine, getattr(config, "model_path", None))

    @app.post("/v1/embeddings")
    async def embeddings(req: EmbeddingRequest) -> dict:
        check_model(req)
        sequences = _sequences(req.input, engine)
        vectors = await asyncio.to_thread(embedder.embed, sequences)
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
