"""linear_int8 / linear_int4: quantized linear layers on the compiled AVX2 kernels.

Three compiled paths, chosen in C++ by the number of activation rows N (thresholds measured with
bench/bench_kernels.py on 2 Zen 3 cores):
- "rows":  N <= 2 (int8) / 3 (int4): decode. Activations quantized to int8 per 32-block, each
           weight row streamed once and dotted against every activation row with integer
           instructions.
- "tiles": larger N (batched decode, prefill). Same numerics; 8 weight rows repacked on the fly
           so one integer multiply serves 8 rows.
- "gemm":  dequantize 256 weight rows at a time to fp32 and call MKL: exact up to fp32 GEMM
           rounding, slower than "tiles" at every N measured here; kept for checking.
"reference" is the plain-PyTorch path (dequantize then matmul), used automatically when the
kernels cannot run (no AVX2, build failure, a non-CPU tensor, autograd), with one warning per
reason. Shape handling and dtype conversion happen in C++ to keep the per-call cost low.
"""

from __future__ import annotations

import functools
import logging
from types import ModuleType
from typing import Literal

import torch

from miaotui.kernels.build import load_kernels
from miaotui.kernels.packed import PackedInt4, PackedInt8
from miaotui.kernels.reference import linear_reference

logger = logging.getLogger(__name__)

KernelPath = Literal["rows", "tiles", "gemm", "reference"]
_PATH_IDS = {None: -1, "rows": 0, "tiles": 1, "gemm": 2}
_PATH_NAMES: dict[int, KernelPath] = {0: "rows", 1: "tiles", 2: "gemm"}


@functools.cache
def _warn_once(message: str) -> None:
    logger.warning(message)


def _compiled_ops(x: torch.Tensor, k: int) -> ModuleType | None:
    """The compiled module, or None (after one warning per reason) if this call must fall back."""
    if x.is_cpu and k % 32 == 0 and not (x.requires_grad and torch.is_grad_enabled()):
        return load_kernels()
    if not x.is_cpu:
        _warn_once(f"miaotui kernels run on CPU only; {x.device.type} tensors use the PyTorch path")
    elif k % 32:
        _warn_once(f"miaotui kernels need K % 32 == 0 (K={k}); using the PyTorch path")
    else:
        _warn_once("miaotui kernels have no backward; tensors requiring grad use the PyTorch path")
    return None


def choose_path(n: int, bits: int) -> KernelPath:
    """The path linear_int8 (bits=8) / linear_int4 (bits=4) take for n activation rows here."""
    ops = load_kernels()
    return "reference" if ops is None else _PATH_NAMES[ops.choose_path(n, bits)]


def linear_int8(
    x: torch.Tensor,
    p: PackedInt8,
    bias: torch.Tensor | None = None,
    *,
    path: KernelPath | None = None,
) -> torch.Tensor:
    """x (..., K) @ W^T (+ bias) -> (..., M) in x's dtype for a PackedInt8 W (M, K).
    `path` forces a path (tests, benchmarks); by default it follows N."""
    ops = None if path == "reference" else _compiled_ops(x, p.qweight.shape[1])
    if ops is None:
        return linear_reference(x, p, bias)
    return ops.int8_linear(x, p.qweight, p.scale, p.group_size, bias, _PATH_IDS[path])


def linear_int4(
    x: torch.Tensor,
    p: PackedInt4,
    bias: torch.Tensor | None = None,
    *,
    path: KernelPath | None = None,
) -> torch.Tensor:
    """x (..., K) @ W^T (+ bias) -> (..., M) in x's dtype for a PackedInt4 W (M, K).
    `path` forces a path (tests, benchmarks); by default it follows N."""
    ops = None if path == "reference" else _compiled_ops(x, p.qweight.shape[1] * 2)
    if ops is None:
        return linear_reference(x, p, bias)
    return ops.int4_linear(x, p.qweight, p.scale, p.offset, p.group_size, bias, _PATH_IDS[path])
