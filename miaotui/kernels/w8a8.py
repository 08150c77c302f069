"""W8A8 numerics: int8 weights (one scale per output row, or per group) times int8 activations
quantized per token on the fly, multiplied exactly in int32 (`torch._int_mm`) and rescaled in
float32. Pure functions, tensor in, tensor out; conventions as in transforms/quant_math.py."""

import torch
from torch import Tensor

INT8_MAX = 127  # -128 is left unused so that the int8 grid is symmetric about 0


def quantize_per_token_int8(x: Tensor) -> tuple[Tensor, Tensor]:
    """Dynamic symmetric int8 per row: x (..., K) -> (xq int8 (..., K), x_scale float32 (..., 1)).

    For activations x (N, K) that is one scale per token (for a weight (M, K), one per output
    channel). Bound: |x - xq * x_scale| <= x_scale / 2.
    """
    x = x.float()
    scale = x.abs().amax(-1, keepdim=True) / INT8_MAX
    # scale 0 means an all-zero row: x / tiny stays 0, nothing divides by zero.
    safe = scale.clamp(min=torch.finfo(torch.float32).tiny)
    return torch.round(x / safe).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8), scale


def _int8_mm(a: Tensor, b: Tensor) -> Tensor:
    """Exact int32 product of int8 (N, K) and (K, M)."""
    try:
        # torch 2.13 CPU: any shape; CUDA needs N > 16 and K, M multiples of 8.
        return torch._int_mm(a, b)
    except RuntimeError:
        # float64 holds every partial sum exactly (|sum| <= K * 2^14 << 2^53).
        return (a.double() @ b.double()).to(torch.int32)


def int8_matmul(xq: Tensor, x_scale: Tensor, wq: Tensor, w_scale: Tensor) -> Tensor:
    """(xq * x_scale) @ (wq * w_scale).T with int32 accumulation -> float32 (N, M).

    xq int8 (N, K), x_scale (N, 1) per token; wq int8 (M, K), w_scale (M, K // G). Per-row weight
    scales (G = K) take one integer matmul; grouped scales take one per group, summed in float32.
    The integer part is exact (needs K < 2^17 for int32); the result equals the float64 matmul of
    the dequantized operands up to float32 rounding. Against the unquantized float product, with
    e_x = x_scale / 2 and e_w = w_scale / 2 expanded to (M, K) (the round-trip bounds),
    |x @ w.T - y|[n, m] <= sum_k |x[n, k]| e_w[m, k] + e_x[n] |w[m, k]| + e_x[n] e_w[m, k].
    """
    n, k = xq.shape
    m, ng = w_scale.shape
    if wq.shape != (m, k) or k % ng != 0:
        raise ValueError(f"wq {tuple(wq.shape)} / w_scale {tuple(w_scale.shape)} do not fit K={k}")
    if ng == 1:
        return _int8_mm(xq, wq.t()).float() * w_scale.t() * x_scale
    g = k // ng
    out = torch.zeros(n, m, dtype=torch.float32, device=xq.device)
    for j in range(ng):
        cols = slice(j * g, (j + 1) * g)
        out += _int8_mm(xq[:, cols], wq[:, cols].t()).float() * w_scale[:, j]
    return out * x_scale


def w8a8_linear(x: Tensor, wq: Tensor, w_scale: Tensor) -> Tensor:
    """y = x @ W.T with x quantized per token to int8 on the fly: x (..., K) -> (..., M), x.dtype."""
    xq, x_scale = quantize_per_token_int8(x.reshape(-1, x.shape[-1]))
    y = int8_matmul(xq, x_scale, wq, w_scale)
    return y.reshape(*x.shape[:-1], wq.shape[0]).to(x.dtype)
