"""Packed quantized weights: group-wise integers along K (the contiguous input dimension).

A weight is (M out, K in). Groups of `group_size` consecutive input columns share a scale (and,
for asymmetric int4, an offset). Built by `pack_int8` / `pack_int4` from integer codes; the
kernels in `ops.py` read them directly and `reference.dequantize_packed` turns them back into
float32 for checking.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# A 32-block of int4 codes is 16 bytes: element j in the low nibble of byte j, element j + 16 in
# the high nibble (GGUF Q4_0 order), so two shifts/masks unpack a block into 32 ordered bytes.
INT4_BLOCK = 32


def _check_groups(name: str, scale: torch.Tensor, m: int, k: int, group_size: int) -> None:
    if scale.dtype != torch.float32 or tuple(scale.shape) != (m, k // group_size):
        raise ValueError(
            f"{name} must be float32 of shape (M, K/G) = {(m, k // group_size)}, "
            f"got {scale.dtype} {tuple(scale.shape)}"
        )


@dataclass(frozen=True, eq=False)
class PackedInt8:
    """Group-wise int8 weight: value = qweight * scale."""

    qweight: torch.Tensor
    """int8 (M, K) codes, contiguous."""
    scale: torch.Tensor
    """float32 (M, K // group_size)."""
    group_size: int
    """Input columns per scale: a multiple of 16 dividing K (32 typical, 16 for Q6_K, K per channel)."""

    def __post_init__(self) -> None:
        if self.qweight.dtype != torch.int8 or self.qweight.dim() != 2:
            raise ValueError(
                f"qweight must be a 2-D int8 tensor, got {self.qweight.dtype} {tuple(self.qweight.shape)}"
            )
        m, k = self.qweight.shape
        if self.group_size <= 0 or self.group_size % 16 or k % self.group_size:
            raise ValueError(
                f"group_size must be a multiple of 16 dividing K={k}, got {self.group_size}"
            )
        _check_groups("scale", self.scale, m, k, self.group_size)

    @property
    def shape(self) -> tuple[int, int]:
        """(M, K) of the weight."""
        return tuple(self.qweight.shape)


@dataclass(frozen=True, eq=False)
class PackedInt4:
    """Group-wise int4 weight: value = q * scale + offset, or (q - 8) * scale without offset."""

    qweight: torch.Tensor
    """uint8 (M, K // 2): two codes 0..15 per byte, Q4_0 nibble order within each 32-block."""
    scale: torch.Tensor
    """float32 (M, K // group_size)."""
    offset: torch.Tensor | None
    """float32 (M, K // group_size), or None for the symmetric (q - 8) * scale."""
    group_size: int
    """Input columns per scale: a multiple of 32 dividing K (32, 64, 128)."""

    def __post_init__(self) -> None:
        if self.qweight.dtype != torch.uint8 or self.qweight.dim() != 2:
            raise ValueError(
                f"qweight must be a 2-D uint8 tensor, got {self.qweight.dtype} {tuple(self.qweight.shape)}"
            )
        m, k = self.shape
        if self.group_size <= 0 or self.group_size % INT4_BLOCK or k % self.group_size:
            raise ValueError(
                f"group_size must be a multiple of 32 dividing K={k}, got {self.group_size}"
            )
        _check_groups("scale", self.scale, m, k, self.group_size)
        if self.offset is not None:
            _check_groups("offset", self.offset, m, k, self.group_size)

    @property
    def shape(self) -> tuple[int, int]:
        """(M, K) of the weight."""
        return (self.qweight.shape[0], self.qweight.shape[1] * 2)


def pack_int8(q: torch.Tensor, scale: torch.Tensor, group_size: int) -> PackedInt8:
    """int8 codes (M, K) and scales (M, K/G) -> PackedInt8."""
    return PackedInt8(q.contiguous(), scale.to(torch.float32).contiguous(), int(group_size))


def pack_int4(
    q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, group_size: int
) -> PackedInt4:
    """uint8 codes 0..15 (M, K) with scales / offsets (M, K/G) -> PackedInt4."""
    if q.dim() != 2 or q.shape[1] % INT4_BLOCK:
        raise ValueError(f"int4 codes must be (M, K) with K a multiple of 32, got {tuple(q.shape)}")
    m, k = q.shape
    blocks = q.to(torch.uint8).reshape(m, k // INT4_BLOCK, 2, INT4_BLOCK // 2)  # (M, K/32, 2, 16)
    packed = (blocks[:, :, 0] & 0x0F) | ((blocks[:, :, 1] & 0x0F) << 4)  # (M, K/32, 16)
    return PackedInt4(
        packed.reshape(m, k // 2).contiguous(),
        scale.to(torch.float32).contiguous(),
        None if offset is None else offset.to(torch.float32).contiguous(),
        int(group_size),
    )
