"""Quantization numerics as pure functions: int8/int4 weights and the int8 KV cache. Tensor in,
tensor out; no modules, no I/O. Per-token int8 activations and the W8A8 integer matmul run at
serving time, so they live in kernels/w8a8.py (re-exported here with the other numerics).

Conventions, shared with the kernels in ``miaotui/kernels``:

- A weight W is (M out, K in). Groups are G consecutive columns along K; scale and offset are
  contiguous float32 (M, K // G). ``group_size=None`` means one group per row (G = K).
- int8: codes int8 in -127..127, value = q * scale, scale = absmax / 127 (symmetric).
- int4: codes uint8 in 0..15, one code per byte (packing two per byte is the kernels' business).
  symmetric:  value = (q - 8) * scale, offset None, scale = absmax / 7.5;
  asymmetric: value = q * scale + offset, offset = group min, scale = (max - min) / 15.
- An all-zero group (or, asymmetric, a constant one) gets scale 0 and decodes exactly; nothing
  divides by zero, so no NaN.

Every round trip below is bounded by |w - dequantize(quantize(w))| <= scale / 2 per element (up
to float32 rounding), with the scale of the element's group.
"""

import torch
from torch import Tensor

from miaotui.kernels.w8a8 import int8_matmul as int8_matmul
from miaotui.kernels.w8a8 import quantize_per_token_int8
from miaotui.kernels.w8a8 import w8a8_linear as w8a8_linear

INT8_MAX = 127  # -128 is left unused so that the int8 grid is symmetric about 0
# Symmetric int4: q - 8 spans -8..7. absmax / 7.5 puts +-absmax at +-7.5, which rounds into -8 or
# clamps to 7 with error exactly scale / 2: all 16 codes are used and nothing is clipped by more
# than half a step. absmax / 7 wastes code -8 (error bound absmax / 14 instead of absmax / 15);
# absmax / 8 clips +absmax to 7/8 of itself (error absmax / 8, on the largest, most salient
# weight). 7.5 is also what the GPTQ reference quantizer does (scale = 2 absmax / 15, zero = 8).
INT4_SYM_DIVISOR = 7.5
INT4_MAX = 15


def split_groups(w: Tensor, group_size: int | None) -> Tensor:
    """(M, K) -> (M, K // G, G) float32; raises ValueError when G does not divide K."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight (M out, K in), got shape {tuple(w.shape)}")
    m, k = w.shape
    g = k if group_size is None else group_size
    if g <= 0 or k % g != 0:
        raise ValueError(
            f"group_size={group_size} does not divide K={k} (in-features of the {m}x{k} weight); "
            f"use a positive divisor of {k}, or None for one scale per output row"
        )
    return w.float().reshape(m, k // g, g)


def weight_params(w: Tensor, bits: int, symmetric: bool) -> tuple[Tensor, Tensor | None]:
    """Scale and offset (or None) of the values along the last dim of w: (..., G) -> (...)."""
    w = w.float()
    if bits == 8:
        if not symmetric:
            raise ValueError(
                "int8 weights are symmetric only (value = q * scale); got symmetric=False"
            )
        return w.abs().amax(-1) / INT8_MAX, None
    if bits == 4:
        if symmetric:
            return w.abs().amax(-1) / INT4_SYM_DIVISOR, None
        lo, hi = w.amin(-1), w.amax(-1)
        return (hi - lo) / INT4_MAX, lo
    raise ValueError(f"bits={bits} is not supported; use 4 or 8")


def encode(w: Tensor, scale: Tensor, offset: Tensor | None, bits: int) -> Tensor:
    """Round-to-nearest codes of w for a given scale/offset (broadcast against w).

    Returns int8 codes for bits=8 and uint8 0..15 for bits=4 (offset None selects symmetric).
    """
    w = w.float()
    # scale 0 means a constant group: w - offset (or w) is 0 there, and 0 / tiny stays 0.
    safe = scale.clamp(min=torch.finfo(torch.float32).tiny)
    if bits == 8:
        q = torch.round(w / safe).clamp_(-INT8_MAX, INT8_MAX)
        return q.to(torch.int8)
    if bits != 4:
        raise ValueError(f"bits={bits} is not supported; use 4 or 8")
    if offset is None:
        q = torch.round(w / safe) + 8
    else:
        q = torch.round((w - offset) / safe)
    return q.clamp_(0, INT4_MAX).to(torch.uint8)


def decode(codes: Tensor, scale: Tensor, offset: Tensor | None) -> Tensor:
    """Float32 values of codes (int8: q * scale; uint8: (q - 8) * scale or q * scale + offset)."""
    q = codes.float()
    if codes.dtype == torch.int8:
        return q * scale
    if codes.dtype != torch.uint8:
        raise ValueError(f"codes must be int8 or uint8, got {codes.dtype}")
    if offset is None:
        return (q - 8) * scale
    return q * scale + offset


def quantize_weight(
    w: Tensor, bits: int, group_size: int | None, symmetric: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Round-to-nearest quantization of a (M, K) weight: (codes (M, K), scale, offset | None).

    scale/offset are contiguous float32 (M, K // G). Bound: |w - decode| <= scale / 2 per element.
    """
    wg = split_groups(w, group_size)  # (M, ng, G)
    scale, offset = weight_params(wg, bits, symmetric)
    codes = encode(wg, scale[..., None], None if offset is None else offset[..., None], bits)
    return codes.reshape(w.shape), scale.contiguous(), offset


def dequantize_weight(codes: Tensor, scale: Tensor, offset: Tensor | None = None) -> Tensor:
    """(M, K) codes with (M, K // G) scale/offset -> float32 (M, K); G is K // scale.shape[1]."""
    m, k = codes.shape
    ng = scale.shape[-1]
    if scale.shape != (m, ng) or k % ng != 0:
        raise ValueError(f"scale shape {tuple(scale.shape)} does not fit codes {(m, k)}")
    qg = codes.reshape(m, ng, k // ng)
    off = None if offset is None else offset[..., None]
    return decode(qg, scale[..., None], off).reshape(m, k)


def fake_quantize(w: Tensor, bits: int, group_size: int | None, symmetric: bool) -> Tensor:
    """dequantize(quantize(w)) in float32: the round-to-nearest (RTN) weight a kernel would see."""
    return dequantize_weight(*quantize_weight(w, bits, group_size, symmetric))


def quantize_int8(w: Tensor, group_size: int | None = None) -> tuple[Tensor, Tensor]:
    """Symmetric int8: codes int8 (M, K) in -127..127 and scale (M, K // G), value = q * scale.

    group_size None gives one scale per output row, shape (M, 1).
    Bound: |w - dequantize_int8(q, scale)| <= scale / 2 = absmax(group) / 254 per element.
    """
    codes, scale, _ = quantize_weight(w, 8, group_size, symmetric=True)
    return codes, scale


def dequantize_int8(q: Tensor, scale: Tensor) -> Tensor:
    """int8 codes (M, K) and scale (M, K // G) -> float32 q * scale."""
    return dequantize_weight(q, scale)


def quantize_int4(
    w: Tensor, group_size: int = 32, symmetric: bool = True
) -> tuple[Tensor, Tensor, Tensor | None]:
    """int4 codes uint8 0..15 (M, K), scale (M, K // G), offset (M, K // G) or None.

    symmetric:  value = (q - 8) * scale, scale = absmax / 7.5, offset None;
                bound |w - deq| <= scale / 2 = absmax(group) / 15.
    asymmetric: value = q * scale + offset, offset = min, scale = (max - min) / 15;
                bound |w - deq| <= scale / 2 = (max - min) / 30.
    """
    return quantize_weight(w, 4, group_size, symmetric)


def dequantize_int4(q: Tensor, scale: Tensor, offset: Tensor | None = None) -> Tensor:
    """uint8 codes (M, K) -> float32 (q - 8) * scale, or q * scale + offset when offset is given."""
    return dequantize_weight(q, scale, offset)


def quantize_kv_int8(x: Tensor) -> tuple[Tensor, Tensor]:
    """KV cache int8, one scale per token per head: x (..., KVH, D) -> (q int8, scale (..., KVH, 1)).

    Bound: |x - q * scale| <= scale / 2 = absmax over D / 254.
    """
    return quantize_per_token_int8(x)


def dequantize_kv_int8(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """q int8 (..., KVH, D), scale (..., KVH, 1) -> q * scale in dtype."""
    return (q.float() * scale).to(dtype)
