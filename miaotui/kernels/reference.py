"""Plain-PyTorch reference of the packed formats and of the kernels' numerics.

Numerics of the compiled integer paths (as llama.cpp's Q8_0 activations): each row of x is cut
into 32-blocks, and block b is quantized to int8 with d_b = amax_b / 127,
xq_k = round_half_even(x_k * 127 / amax_b), x_hat_k = d_b * xq_k. The kernels then return
W_deq @ x_hat exactly up to fp32 accumulation order, so against the exact float product

    |y_n - (W_deq @ x_n)| <= sum_k |W_deq[n, k]| * d_b(k) / 2        (per output element),

i.e. the only error is the activation rounding, at most half a step of 1/127 of the block's
largest |x| per element. For Gaussian-like activations (amax ~ 2.2 sigma over 32 values) that is
a relative RMS error of ~0.5 % of the output norm (step / sqrt(12) / sigma), independent of K.
The dequantize + GEMM path is exact up to fp32 GEMM rounding.
"""

from __future__ import annotations

import torch

from miaotui.kernels.packed import INT4_BLOCK, PackedInt4, PackedInt8

ACT_BLOCK = 32  # activation values per int8 scale (Q8_0)
REFERENCE_CHUNK_ROWS = 4096  # dequantized rows at a time in the fallback, bounds its memory


def unpack_int4_codes(qweight: torch.Tensor) -> torch.Tensor:
    """uint8 (M, K/2) packed nibbles -> uint8 (M, K) codes 0..15."""
    m, half = qweight.shape
    blocks = qweight.reshape(m, half // (INT4_BLOCK // 2), INT4_BLOCK // 2)  # (M, K/32, 16)
    low, high = blocks & 0x0F, blocks >> 4  # elements j and j + 16 of each block
    return torch.cat([low, high], dim=2).reshape(m, half * 2)


def _expand_groups(v: torch.Tensor, group_size: int) -> torch.Tensor:
    return v.repeat_interleave(group_size, dim=1)


def dequantize_packed(p: PackedInt8 | PackedInt4) -> torch.Tensor:
    """The float32 (M, K) weight a packed weight stands for."""
    if isinstance(p, PackedInt8):
        return p.qweight.to(torch.float32) * _expand_groups(p.scale, p.group_size)
    q = unpack_int4_codes(p.qweight).to(torch.float32)
    scale = _expand_groups(p.scale, p.group_size)
    if p.offset is None:
        return (q - 8.0) * scale
    return q * scale + _expand_groups(p.offset, p.group_size)


def _dequantize_rows(p: PackedInt8 | PackedInt4, r0: int, r1: int) -> torch.Tensor:
    if isinstance(p, PackedInt8):
        return dequantize_packed(PackedInt8(p.qweight[r0:r1], p.scale[r0:r1], p.group_size))
    offset = None if p.offset is None else p.offset[r0:r1]
    return dequantize_packed(PackedInt4(p.qweight[r0:r1], p.scale[r0:r1], offset, p.group_size))


def linear_reference(
    x: torch.Tensor, p: PackedInt8 | PackedInt4, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x (N, K) @ W^T (+ bias) -> (N, M) in x's dtype, dequantizing a few thousand rows at a time
    so the full float weight never exists. Works on any device; the fallback of the kernels."""
    m, _ = p.shape
    chunks = []
    for r0 in range(0, m, REFERENCE_CHUNK_ROWS):
        w = _dequantize_rows(p, r0, min(m, r0 + REFERENCE_CHUNK_ROWS)).to(x.dtype)
        chunks.append(x @ w.t())
    y = torch.cat(chunks, dim=-1)
    return y if bias is None else y + bias.to(y.dtype)


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (N, K) float32 -> (int8 codes (N, K), block scales d (N, K/32)), the same arithmetic as
    the kernels (so the codes match bit for bit)."""
    n, k = x.shape
    blocks = x.reshape(n, k // ACT_BLOCK, ACT_BLOCK)
    amax = blocks.abs().amax(dim=2, keepdim=True)  # (N, K/32, 1)
    d = amax / 127.0
    # 127 / amax as one IEEE division (a Python scalar / tensor would be 127 * (1 / amax)).
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    q = torch.round(blocks * inv).to(torch.int8)
    return q.reshape(n, k), d.reshape(n, k // ACT_BLOCK)


def dequantize_activations(q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """int8 codes (N, K) and block scales (N, K/32) -> x_hat (N, K) float32."""
    return q.to(torch.float32) * d.repeat_interleave(ACT_BLOCK, dim=1)


def activation_error_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """(N, M) bound on |kernel - x @ w^T| from the int8 activation rounding alone:
    sum_k |w[m, k]| * d_b(k) / 2, for x (N, K) and w (M, K) float32."""
    _, d = quantize_activations(x)
    half_step = d.repeat_interleave(ACT_BLOCK, dim=1) / 2  # (N, K)
    return half_step @ w.abs().t()
