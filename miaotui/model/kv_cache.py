"""KV-cache storage: one flat slot array per layer, addressed through block tables.

A slot is `block_id * block_size + offset`. Which blocks belong to which request is decided by
the engine's block pool; this module only stores and fetches the K/V vectors.
"""

from __future__ import annotations

import torch


class KVCache:
    """K and V for every layer: (num_slots, KVH, D) each, in the model dtype.

    Allocated uninitialised, so pages are only backed by memory once a token's K/V lands on
    them (the cache costs what the running requests use, not its configured size). Slot 0 is
    zeroed: padded attention rows point at it and must read finite values."""

    def __init__(
        self,
        n_layers: int,
        num_slots: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        shape = (num_slots, n_kv_heads, head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        for t in self.k + self.v:
            t[0].zero_()

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """slots: (N,); k, v: (N, KVH, D)."""
        self.k[layer].index_copy_(0, slots, k)
        self.v[layer].index_copy_(0, slots, v)

    def read(self, layer: int, key_slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """key_slots: (B, L) -> k, v: (B, L, KVH, D)."""
        return self.k[layer][key_slots], self.v[layer][key_slots]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


class Int8KVCache(KVCache):
    """int8 K/V with one fp32 scale per token and head: half the bytes of bf16, a quarter of fp32.
    Dequantized on read; |error| <= scale/2 per element. Uninitialised but slot 0, as KVCache."""

    def __init__(
        self,
        n_layers: int,
        num_slots: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        self.dtype = dtype
        shape = (num_slots, n_kv_heads, head_dim)
        sshape = (num_slots, n_kv_heads, 1)
        self.k = [torch.empty(shape, dtype=torch.int8, device=device) for _ in range(n_layers)]
        self.v = [torch.empty(shape, dtype=torch.int8, device=device) for _ in range(n_layers)]
        self.k_scale = [torch.empty(sshape, device=device) for _ in range(n_layers)]
        self.v_scale = [torch.empty(sshape, device=device) for _ in range(n_layers)]
        for t in self.k + self.v + self.k_scale + self.v_scale:
            t[0].zero_()

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        for store, scales, x in ((self.k, self.k_scale, k), (self.v, self.v_scale, v)):
            q, s = quantize_per_head_int8(x)
            store[layer].index_copy_(0, slots, q)
            scales[layer].index_copy_(0, slots, s)

    def read(self, layer: int, key_slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.k[layer][key_slots].to(self.dtype) * self.k_scale[layer][key_slots].to(self.dtype)
        v = self.v[layer][key_slots].to(self.dtype) * self.v_scale[layer][key_slots].to(self.dtype)
        return k, v

    def nbytes(self) -> int:
        tensors = self.k + self.v + self.k_scale + self.v_scale
        return sum(t.numel() * t.element_size() for t in tensors)


def quantize_per_head_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (N, KVH, D) -> int8 codes (N, KVH, D), fp32 scales (N, KVH, 1); symmetric absmax."""
    scale = x.float().abs().amax(dim=-1, keepdim=True).clamp_min(1e-8) / 127.0
    q = torch.round(x.float() / scale).clamp_(-127, 127).to(torch.int8)
    return q, scale


def kv_bytes_per_token(
    n_layers: int, n_kv_heads: int, head_dim: int, kv_dtype: str, dtype: torch.dtype
) -> int:
    """Bytes one cached token costs across all layers (K and V)."""
    if kv_dtype == "int8":
        return 2 * n_layers * n_kv_heads * (head_dim + 4)
    return 2 * n_layers * n_kv_heads * head_dim * torch.finfo(dtype).bits // 8
