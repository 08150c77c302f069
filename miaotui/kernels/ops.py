"""linear_int8 / linear_int4: quantized linear layers on the compiled AVX2 kernels.

Three compiled paths, chosen by the number of activation rows N (thresholds measured with
bench/bench_kernels.py on 2 Zen 3 cores):
- "rows":  N small (decode). Activations quantized to int8 per 32-block, each weight row
           streamed once and dotted against every activation row with integer instructions.
- "tiles": N larger (batched decode, prefill). Same numerics; 8 weight rows repacked on the fly
           so one integer multiply serves 8 rows.
- "gemm":  dequantize 256 weight rows at a time to fp32 and call MKL (exact up to fp32 GEMM
           rounding). Kept for checking and for machines where it wins; never the default here.
"reference" is the plain-PyTorch path (dequantize then matmul), used automatically when the
kernels cannot run (no AVX2, build failure, a non-CPU tensor, autograd), with one warning per reason.
"""

from __future__ import annotations

import functools
import logging
from typing import Literal

import torch

from miaotui.kernels.build import load_kernels
from miaotui.kernels.packed import PackedInt4, PackedInt8
from miaotui.kernels.reference import linear_reference

logger = logging.getLogger(__name__)

KernelPath = Literal["rows", "tiles", "gemm", "reference"]
_PATH_IDS = {"rows": 0, "tiles": 1, "gemm": 2}
# Up to this many activation rows the row kernels win; above, the tile kernels.
ROWS_MAX_N = 2
# From this many rows the dequantize + MKL path would win (no shape measured here reaches it).
GEMM_MIN_N = 1 << 62


@functools.cache
def _warn_once(message: str) -> None:
    logger.warning(message)


def choose_path(n: int) -> KernelPath:
    """The compiled path used for n activation rows."""
    if n <= ROWS_MAX_N:
        return "rows"
    return "gemm" if n >= GEMM_MIN_N else "tiles"


def _compiled_ops(x: torch.Tensor, k: int):
    """The op namespace, or None (after one warning per reason) if this call must fall back."""
    if x.device.type != "cpu":
        _warn_once(f"miaotui kernels run on CPU only; {x.device} tensors use the PyTorch path")
        return None
    if k % 32:
        _warn_once(f"miaotui kernels need K % 32 == 0 (K={k}); using the PyTorch path")
        return None
    if x.requires_grad and torch.is_grad_enabled():
        _warn_once("miaotui kernels have no backward; tensors requiring grad use the PyTorch path")
        return None
    return load_kernels()


def _prepare(x: torch.Tensor, k: int, bias: torch.Tensor | None):
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} input features, the weight expects K={k}")
    x2 = x.reshape(-1, k).to(torch.float32).contiguous()  # (N, K)
    b = None if bias is None else bias.to(torch.float32).contiguous()
    return x2, b


def linear_int8(
    x: torch.Tensor,
    p: PackedInt8,
    bias: torch.Tensor | None = None,
    *,
    path: KernelPath | None = None,
) -> torch.Tensor:
    """x (..., K) @ W^T (+ bias) -> (..., M) in x's dtype for a PackedInt8 W (M, K).
    `path` forces a path (tests, benchmarks); by default it follows N."""
    m, k = p.shape
    ops = None if path == "reference" else _compiled_ops(x, k)
    if ops is None:
        return linear_reference(x, p, bias)
    x2, b = _prepare(x, k, bias)
    path_id = _PATH_IDS[path or choose_path(x2.shape[0])]
    y = ops.int8_linear(x2, p.qweight, p.scale, p.group_size, b, path_id)  # (N, M)
    return y.reshape(*x.shape[:-1], m).to(x.dtype)


def linear_int4(
    x: torch.Tensor,
    p: PackedInt4,
    bias: torch.Tensor | None = None,
    *,
    path: KernelPath | None = None,
) -> torch.Tensor:
    """x (..., K) @ W^T (+ bias) -> (..., M) in x's dtype for a PackedInt4 W (M, K).
    `path` forces a path (tests, benchmarks); by default it follows N."""
    m, k = p.shape
    ops = None if path == "reference" else _compiled_ops(x, k)
    if ops is None:
        return linear_reference(x, p, bias)
    x2, b = _prepare(x, k, bias)
    path_id = _PATH_IDS[path or choose_path(x2.shape[0])]
    y = ops.int4_linear(x2, p.qweight, p.scale, p.offset, p.group_size, b, path_id)  # (N, M)
    return y.reshape(*x.shape[:-1], m).to(x.dtype)
