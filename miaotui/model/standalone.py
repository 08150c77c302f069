"""Run independent sequences through a model without an engine: a fresh KV cache sized for the
batch, one packed forward pass. Used by evaluation (perplexity, multiple choice), calibration
of transforms, and tests."""

from __future__ import annotations

import torch

from miaotui.model.attention import build_attention_metadata
from miaotui.model.kv_cache import KVCache
from miaotui.model.transformer import Transformer

BLOCK = 16


@torch.inference_mode()
def forward_sequences(
    model: Transformer, seqs: list[list[int]], kv_cache: type[KVCache] = KVCache
) -> list[torch.Tensor]:
    """Logits (T_i, V) float32 for every position of every sequence, computed as one batch, on a
    fresh cache of class `kv_cache` (the serving engine's: an Int8KVCache is scored as served)."""
    c = model.config
    n_kv, dtype, device = model.kv_spec()
    tables, next_block = [], 1  # block 0 is the padding block
    for s in seqs:
        n = -(-len(s) // BLOCK)
        tables.append(list(range(next_block, next_block + n)))
        next_block += n
    cache = kv_cache(c.n_layers, next_block * BLOCK, n_kv, c.head_dim, dtype, device)
    meta = build_attention_metadata(
        [0] * len(seqs), [len(s) for s in seqs], tables, BLOCK, c.sliding_window, device
    )
    ids = torch.tensor([t for s in seqs for t in s], device=device)
    logits = model(ids, meta, cache)
    return list(logits.split([len(s) for s in seqs]))


def token_logprobs(logits: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """log p(ids[t+1] | ids[:t+1]) for t in 0..T-2: (T-1,) from logits (T, V)."""
    logp = torch.log_softmax(logits[:-1].float(), dim=-1)
    return logp.gather(1, torch.tensor(ids[1:], device=logits.device)[:, None])[:, 0]
