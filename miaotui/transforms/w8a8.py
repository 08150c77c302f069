"""W8A8: int8 weights (one scale per output row) times int8 activations quantized per token on
the fly, multiplied with an integer matmul (`torch._int_mm`) and rescaled in float32.

The numerics are `quant_math.w8a8_linear`; this module only holds the codes. With SmoothQuant
the outlier scale was already folded into the preceding norm and the weight columns before the
codes were made, so the module itself never knows whether it was smoothed.
"""

from __future__ import annotations

import torch
from torch import nn

from miaotui.transforms.quant_math import quantize_int8, w8a8_linear


class W8A8Linear(nn.Module):
    """y = x W^T (+ b): x quantized per token to int8, W int8 per output channel."""

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
        """Round-to-nearest int8 per output channel of a float (M, K) weight."""
        q, scale = quantize_int8(weight.detach().float())
        return cls(q, scale, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = w8a8_linear(x, self.qweight, self.scale)  # (..., M) in x.dtype
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def dequantized_weight(self) -> torch.Tensor:
        """(M, K) float32 q * scale: for tests and error measurements."""
        return self.qweight.float() * self.scale

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, w8a8"
