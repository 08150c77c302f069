"""Scheduler output -> one forward pass: packs the step's tokens, builds attention addressing
and returns the logits of the rows that need sampling. Sampling itself stays on the driver.

The runner keeps every running request's block table: the scheduler sends a new request's whole
table once, then only the blocks appended to it, and the ids of requests whose tables to drop."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from miaotui.config import CacheConfig
from miaotui.engine.scheduler import ScheduledRequest, SchedulerOutput
from miaotui.model.attention import AttentionMetadata, build_attention_metadata
from miaotui.model.kv_cache import Int8KVCache, KVCache, kv_bytes_per_token
from miaotui.model.transformer import Transformer


@dataclass
class ModelInput:
    """Everything one forward pass needs; the message a driver sends to model-parallel workers."""

    input_ids: torch.Tensor
    """(N,) packed new tokens of all scheduled requests."""
    meta: AttentionMetadata
    logits_index: torch.Tensor
    """(S,) rows of the packed batch whose logits are sampled: each sampling request's last
    1 + num_spec rows (its proposed tokens are scored in the same pass)."""
    sample_ids: list[str]
    """Request ids of the sampling requests, in order."""
    num_rows: list[int]
    """Logits rows of each of them (1 + its proposed tokens), consecutive in that order."""


def num_cache_blocks(model: Transformer, cache: CacheConfig, dtype: torch.dtype) -> int:
    """Blocks that fit the configured KV memory (or the configured count)."""
    if cache.num_blocks is not None:
        return cache.num_blocks
    c = model.config
    per_token = kv_bytes_per_token(c.n_layers, c.n_kv_heads, c.head_dim, cache.kv_dtype, dtype)
    return max(2, int(cache.memory_gib * 2**30) // (per_token * cache.block_size))


class ModelRunner:
    def __init__(
        self,
        model: Transformer,
        cache: CacheConfig,
        num_blocks: int,
        device: torch.device,
        dtype: torch.dtype,
    ):
        self.model = model
        self.block_size = cache.block_size
        self.device = device
        c = model.config
        kv_cls = Int8KVCache if cache.kv_dtype == "int8" else KVCache
        # The model says what it reads: local KV heads under TP, float16 for the native step.
        n_kv_heads, kv_dtype, _ = model.kv_spec()
        self.kv_cache = kv_cls(
            c.n_layers, num_blocks * cache.block_size, n_kv_heads, c.head_dim, kv_dtype, device
        )
        self.block_tables: dict[str, list[int]] = {}
        """Block table of every request the scheduler has running (or had, until freed)."""

    def prepare(self, out: SchedulerOutput) -> ModelInput:
        """Apply the step's block-table changes, then pack its tokens."""
        self.update_block_tables(out)
        return self.build_input(out.scheduled)

    def update_block_tables(self, out: SchedulerOutput) -> None:
        # Freed first: a request preempted or finished earlier may come back as new this step.
        for rid in out.freed_ids:
            self.block_tables.pop(rid, None)  # never-scheduled requests have no table
        for r in out.new:
            self.block_tables[r.request_id] = list(r.block_ids)
        for r in out.cached:
            self.block_tables[r.request_id].extend(r.new_block_ids)

    def build_input(self, scheduled: list[ScheduledRequest]) -> ModelInput:
        """Pack `scheduled` (whose block tables are known) into one forward pass's input."""
        ids = [t for s in scheduled for t in s.token_ids]
        meta = build_attention_metadata(
            [s.start_pos for s in scheduled],
            [len(s.token_ids) for s in scheduled],
            [self.block_tables[s.request_id] for s in scheduled],
            self.block_size,
            self.model.config.sliding_window,
            self.device,
        )
        rows, end = [], 0
        for s in scheduled:
            end += len(s.token_ids)
            if s.sample:
                rows.extend(range(end - 1 - s.num_spec, end))
        sampling = [s for s in scheduled if s.sample]
        return ModelInput(
            input_ids=torch.tensor(ids, dtype=torch.long, device=self.device),
            meta=meta,
            logits_index=torch.tensor(rows, dtype=torch.long, device=self.device),
            sample_ids=[s.request_id for s in sampling],
            num_rows=[1 + s.num_spec for s in sampling],
        )

    @torch.inference_mode()
    def execute(self, inp: ModelInput) -> torch.Tensor:
        """(S, V) float32 logits for the sampled rows."""
        if len(inp.sample_ids) == 0:
            self.model.hidden_states(inp.input_ids, inp.meta, self.kv_cache)
            return torch.empty(0, self.model.config.vocab_size)
        return self.model(inp.input_ids, inp.meta, self.kv_cache, inp.logits_index)

    def greedy_tokens(self, rows: int) -> list[int] | None:
        """The argmax of each of the last `execute`'s `rows` logit rows when the model found
        them with the logits (the native step), else None."""
        find = getattr(self.model, "greedy_tokens", None)
        tokens = find() if find is not None and rows else None
        return tokens.tolist() if tokens is not None and len(tokens) == rows else None
