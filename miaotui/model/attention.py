"""Grouped-query attention over a paged KV cache.

Every step packs the new tokens of all sequences into one (N, C) batch. Attention scatters
their K/V into the cache, then gathers each sequence's whole context through its block table
into a padded (B, L) grid and runs one masked SDPA over a padded (B, Tq) query grid. Prefill,
chunked prefill and decode are the same code path.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from miaotui.config import ModelConfig
from miaotui.model.kv_cache import KVCache
from miaotui.model.layers import RMSNorm, apply_rope


@dataclass
class AttentionMetadata:
    """Per-step addressing, built once and shared by all layers. The masks of the padded grid
    are built on first use: the native step (model/native_step.py) never needs them."""

    positions: torch.Tensor
    """(N,) absolute position of each packed token."""
    slot_mapping: torch.Tensor
    """(N,) cache slot where each new token's K/V is written."""
    query_index: torch.Tensor
    """(N,) row of each packed token in the padded (B*Tq) query grid."""
    block_table: torch.Tensor
    """(B, n_blocks) cache block of every block_size context positions (padding: block 0)."""
    block_size: int
    context_lens: list[int]
    """Context length of each sequence after this step."""
    num_seqs: int
    max_query_len: int
    start_pos: torch.Tensor
    """(B,) tokens each sequence had cached before this step."""
    num_new: torch.Tensor
    """(B,) tokens each sequence adds this step."""
    sliding_window: int | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def seq_index(self) -> torch.Tensor:
        """(N,) sequence of each packed token."""
        return self.query_index // self.max_query_len

    @property
    def key_slots(self) -> torch.Tensor:
        """(B, L) cache slot of every context position (padding points at slot 0), L the longest
        context: the gather index of the padded grid."""
        if "key_slots" not in self._cache:
            L, bs = max(self.context_lens), self.block_size
            j = torch.arange(L, device=self.block_table.device)
            slots = self.block_table[:, j // bs] * bs + j % bs  # (B, L)
            if min(self.context_lens) < L:
                lens = torch.tensor(self.context_lens, device=slots.device)
                slots = torch.where(j[None, :] < lens[:, None], slots, 0)
            self._cache["key_slots"] = slots
        return self._cache["key_slots"]

    @property
    def mask(self) -> torch.Tensor:
        """(B, 1, Tq, L) bool, True where a query may attend to a key (causal, within length)."""
        if "mask" not in self._cache:
            self._cache["mask"] = self._grid_mask(None)
        return self._cache["mask"]

    @property
    def local_mask(self) -> torch.Tensor | None:
        """Same as `mask`, further limited to the sliding window (None without local layers)."""
        if self.sliding_window is None:
            return None
        if "local" not in self._cache:
            self._cache["local"] = self._grid_mask(self.sliding_window)
        return self._cache["local"]

    def _grid_mask(self, window: int | None) -> torch.Tensor:
        device = self.key_slots.device
        L = self.key_slots.shape[1]
        j = torch.arange(L, device=device)
        t = torch.arange(self.max_query_len, device=device)
        start, new = self.start_pos.to(device), self.num_new.to(device)
        valid_q = t[None, :] < new[:, None]  # (B, Tq)
        q_pos = start[:, None] + t[None, :]  # (B, Tq)
        mask = (j[None, None, :] <= q_pos[:, :, None]) & valid_q[:, :, None]  # (B, Tq, L)
        if window is not None:
            mask = mask & (j[None, None, :] > q_pos[:, :, None] - window)
        mask[:, :, 0] |= ~valid_q  # padded query rows attend to one key: avoids NaN rows
        return mask.unsqueeze(1)

    def bias(self, group: int, local: bool, dtype: torch.dtype) -> torch.Tensor:
        """Additive mask (B, 1, group*Tq, L): 0 where allowed, -inf elsewhere; rows repeated for
        the `group` query heads sharing a KV head. Built once per step, shared by all layers."""
        key = (group, local and self.local_mask is not None, dtype)
        if key not in self._cache:
            mask = self.local_mask if key[1] else self.mask  # (B, 1, Tq, L)
            B, _, Tq, L = mask.shape
            mask = mask.expand(B, group, Tq, L).reshape(B, 1, group * Tq, L)
            zero = torch.zeros((), dtype=dtype, device=mask.device)
            self._cache[key] = torch.where(mask, zero, float("-inf")).to(dtype)
        return self._cache[key]


def build_attention_metadata(
    start_pos: list[int],
    num_new: list[int],
    block_tables: list[list[int]],
    block_size: int,
    sliding_window: int | None = None,
    device: torch.device | str = "cpu",
) -> AttentionMetadata:
    """Addressing for sequences that already cached `start_pos[b]` tokens and now add
    `num_new[b]` tokens; `block_tables[b]` covers at least start_pos[b] + num_new[b] slots."""
    B, Tq = len(num_new), max(num_new)
    ctx = [s + n for s, n in zip(start_pos, num_new)]
    n_blocks = -(-max(ctx) // block_size)
    rows = [blocks[:n_blocks] + [0] * (n_blocks - len(blocks)) for blocks in block_tables]
    table = torch.tensor(rows, dtype=torch.long)  # (B, n_blocks)
    if Tq == 1:  # pure decode: one token per sequence, addressed in Python ints
        slots = [
            row[p // block_size] * block_size + p % block_size for row, p in zip(rows, start_pos)
        ]
        positions, slot_mapping = torch.tensor(start_pos), torch.tensor(slots)
        query_index = torch.arange(B)
    else:
        start, new = torch.tensor(start_pos), torch.tensor(num_new)
        b_idx = torch.repeat_interleave(torch.arange(B), new)
        t_idx = torch.cat([torch.arange(n) for n in num_new])
        positions = start[b_idx] + t_idx
        slot_mapping = table[b_idx, positions // block_size] * block_size + positions % block_size
        query_index = b_idx * Tq + t_idx
    return AttentionMetadata(
        positions=positions.to(device),
        slot_mapping=slot_mapping.to(device),
        query_index=query_index.to(device),
        block_table=table.to(device),
        block_size=block_size,
        context_lens=ctx,
        num_seqs=B,
        max_query_len=Tq,
        start_pos=torch.tensor(start_pos),
        num_new=torch.tensor(num_new),
        sliding_window=sliding_window,
    )


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.n_heads,
            config.n_kv_heads,
            config.head_dim,
        )
        self.wq = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=config.qkv_bias)
        self.wk = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=config.qkv_bias)
        self.wv = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=config.qkv_bias)
        self.wo = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)
        self.q_norm = RMSNorm(config.head_dim, config.norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(config.head_dim, config.norm_eps) if config.qk_norm else None
        self.scale = config.query_scale or config.head_dim**-0.5
        self.sliding = config.is_sliding(layer)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        cache: KVCache,
    ) -> torch.Tensor:
        N = x.shape[0]
        q = self.wq(x).view(N, -1, self.head_dim)  # (N, H, D)
        k = self.wk(x).view(N, -1, self.head_dim)  # (N, KVH, D)
        v = self.wv(x).view(N, -1, self.head_dim)  # (N, KVH, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        cache.write(self.layer, meta.slot_mapping, k, v)
        keys, values = cache.read(self.layer, meta.key_slots)  # (B, L, KVH, D)
        out = self._attend(q, keys, values, meta)  # (N, H, D)
        return self.wo(out.reshape(N, -1))

    def _attend(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """Masked GQA softmax attention on the padded grid, written out with batched matmuls:
        on CPU this beats SDPA's flash kernel for the short query grids of decoding."""
        B, Tq, H, D = meta.num_seqs, meta.max_query_len, q.shape[1], self.head_dim
        KVH = keys.shape[2]
        G = H // KVH
        if q.shape[0] == B * Tq:  # no padding (e.g. pure decode): the packed batch is the grid
            grid = q
        else:
            grid = q.new_zeros(B * Tq, H, D)
            grid[meta.query_index] = q
        # (B, Tq, KVH, G, D) -> (B, KVH, G*Tq, D): the G query heads of a KV head share its keys
        grid = grid.view(B, Tq, KVH, G, D).permute(0, 2, 3, 1, 4).reshape(B, KVH, G * Tq, D)
        k = keys.transpose(1, 2)  # (B, KVH, L, D)
        v = values.transpose(1, 2)  # (B, KVH, L, D)
        scores = torch.matmul(grid, k.transpose(-1, -2))  # (B, KVH, G*Tq, L)
        bias = meta.bias(G, local=self.sliding, dtype=scores.dtype)  # (B, 1, G*Tq, L)
        probs = torch.softmax(torch.add(bias, scores, alpha=self.scale), dim=-1)
        out = torch.matmul(probs, v)  # (B, KVH, G*Tq, D)
        out = out.view(B, KVH, G, Tq, D).permute(0, 3, 1, 2, 4).reshape(B * Tq, H, D)
        return out if q.shape[0] == B * Tq else out[meta.query_index]
