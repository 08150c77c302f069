"""What every loader returns: a model config plus lazily decoded tensors."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from miaotui.config import ModelConfig


@dataclass
class TensorSource:
    """One checkpoint tensor, still in its file encoding (memory-mapped where possible)."""

    shape: tuple[int, ...]
    """Torch order: (rows, K) for matrices, K contiguous."""
    qtype: str
    """Encoding name: "F32", "F16", "BF16", "Q4_1", "Q8_0", ... (GGML type names)."""
    data: Any
    """np.ndarray view of the file bytes (GGUF) or a torch tensor (safetensors)."""
    row_perm: torch.Tensor | None = None
    """Row permutation applied after decoding (llama q/k in GGUF use interleaved RoPE order)."""

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape))

    def to_float(self) -> torch.Tensor:
        """Decode to a float32 tensor of `shape`."""
        if isinstance(self.data, torch.Tensor):
            t = self.data.to(torch.float32)
        else:
            from miaotui.load.quants import dequantize

            t = dequantize(self.data, self._gguf_type(), self.shape)
        return t if self.row_perm is None else t[self.row_perm]

    def to_affine(self):
        """Integer codes with group scales/offsets (see quants.AffineGroups), or None if this
        encoding is not a group-wise affine integer format."""
        if isinstance(self.data, torch.Tensor) or len(self.shape) != 2:
            return None
        from miaotui.load.quants import supported_affine_types, unpack_affine

        qtype = self._gguf_type()
        if qtype not in supported_affine_types():
            return None
        groups = unpack_affine(self.data, qtype, self.shape)
        if self.row_perm is None:
            return groups
        perm = self.row_perm
        offset = None if groups.offset is None else groups.offset[perm]
        return dataclasses.replace(
            groups, q=groups.q[perm], scale=groups.scale[perm], offset=offset
        )

    def _gguf_type(self):
        import gguf

        return gguf.GGMLQuantizationType[self.qtype]


@dataclass
class Checkpoint:
    """A model file opened for loading."""

    config: ModelConfig
    tensors: dict[str, TensorSource]
    path: Path
    file_size: int
    tokenizer_source: Any = None
    """GGUF metadata dict (tokenizer.* keys) or the HF directory path."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Other file metadata worth showing (name, quantization, ...)."""

    def tensor_types(self) -> dict[str, int]:
        """Encoding name -> number of tensors, for `miaotui info`."""
        counts: dict[str, int] = {}
        for t in self.tensors.values():
            counts[t.qtype] = counts.get(t.qtype, 0) + 1
        return counts

    def num_parameters(self) -> int:
        return sum(t.numel for t in self.tensors.values())
