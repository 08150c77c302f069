"""Quantized stand-ins for nn.Linear and nn.Embedding: packed int8/int4 weights run by the kernels
in miaotui.kernels, and W8A8 (int8 weights x per-token int8 activations). The model builder
(GGUF native, saved checkpoints) and the offline quantizers swap them in; model code never asks
`if quantized`."""

from __future__ import annotations

import torch
from torch import nn

from miaotui.kernels import PackedInt4, PackedInt8, dequantize_packed, linear_int4, linear_int8
from miaotui.kernels.w8a8 import quantize_per_token_int8, w8a8_linear

Packed = PackedInt8 | PackedInt4


class QuantLinear(nn.Module):
    """y = x W^T (+ b) with W packed as group-wise int8 or int4."""

    def __init__(self, packed: Packed, bias: torch.Tensor | None = None):
        super().__init__()
        self.packed = packed
        self.out_features, self.in_features = packed.shape
        self.bits = 8 if isinstance(packed, PackedInt8) else 4
        # Registered so state_dict() saves the packed tensors (quantized checkpoints).
        self.register_buffer("qweight", packed.qweight)
        self.register_buffer("scale", packed.scale)
        if getattr(packed, "offset", None) is not None:
            self.register_buffer("offset", packed.offset)
        self.bias = None if bias is None else nn.Parameter(bias.float(), requires_grad=False)
        self.op = linear_int8 if self.bits == 8 else linear_int4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.dtype != torch.float32:
            x2 = x2.float()
        y = self.op(x2, self.packed, self.bias)
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        return y.view(*shape[:-1], self.out_features)

    def dequantized_weight(self) -> torch.Tensor:
        """(M, K) float32: for calibration, pruning and tests."""
        return dequantize_packed(self.packed)

    def extra_repr(self) -> str:
        g = self.packed.group_size
        return f"in={self.in_features}, out={self.out_features}, int{self.bits}, group={g}"


class QuantEmbedding(nn.Module):
    """Embedding table stored packed; a lookup dequantizes only the rows it reads. When the
    output head is tied to it, the head is a QuantLinear over the same packed tensor."""

    def __init__(self, packed: Packed, dtype: torch.dtype):
        super().__init__()
        self.packed = packed
        self.dtype = dtype
        self.num_embeddings, self.embedding_dim = packed.shape
        # Registered so state_dict() saves them; a tied head's QuantLinear holds the same tensors.
        self.register_buffer("qweight", packed.qweight)
        self.register_buffer("scale", packed.scale)
        if getattr(packed, "offset", None) is not None:
            self.register_buffer("offset", packed.offset)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        p = self.packed
        rows = _rows(p, ids.reshape(-1))
        return dequantize_packed(rows).to(self.dtype).view(*ids.shape, self.embedding_dim)


def _rows(p: Packed, idx: torch.Tensor) -> Packed:
    if isinstance(p, PackedInt8):
        return PackedInt8(p.qweight[idx], p.scale[idx], p.group_size)
    offset = None if p.offset is None else p.offset[idx]
    return PackedInt4(p.qweight[idx], p.scale[idx], offset, p.group_size)


class W8A8Linear(nn.Module):
    """y = x W^T (+ b): x quantized per token to int8, W int8 per output channel, multiplied with
    an integer matmul and rescaled in float32 (kernels/w8a8.py). With SmoothQuant the outlier
    scale was already folded into the preceding norm and the weight columns before the codes
    were made, so the module itself never knows whether it was smoothed."""

    def __init__(
        self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
    ):
        super().__init__()
        if qweight.dtype != torch.int8 or qweight.dim() != 2:
            raise ValueError(
                f"qweight must be 2-D int8, got {qweight.dtype} {tuple(qweight.shape)}"
            )
        if scale.shape != (qweight.shape[0], 1):
            raise ValueError(
                f"scale must be (M, 1) = {(qweight.shape[0], 1)}, got {tuple(scale.shape)}"
            )
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight.contiguous())  # (M, K) int8
        self.register_buffer("scale", scale.float().contiguous())  # (M, 1) float32
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> W8A8Linear:
        """Round-to-nearest int8 per output channel of a float (M, K) weight (one scale per row,
        the same rounding as the activations')."""
        q, scale = quantize_per_token_int8(weight.detach().float())
        return cls(q, scale, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = w8a8_linear(x, self.qweight, self.scale)  # (..., M) in x.dtype
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def dequantized_weight(self) -> torch.Tensor:
        """(M, K) float32 q * scale: for tests and error measurements."""
        return self.qweight.float() * self.scale

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, w8a8"
