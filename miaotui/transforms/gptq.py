"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers"), following the reference implementation (IST-DASLab/gptq, gptq.py):
columns are quantized one at a time and the rounding error of each is spread over the columns
not yet quantized, weighted by the inverse Hessian of the layer's squared output error
||W X^T - W_hat X^T||^2, whose Hessian is H = 2 X^T X / n.

Pure functions: tensors in, codes out, in the layouts of ``quant_math`` (original column order,
so the kernels need no permutation).
"""

import torch
from torch import Tensor

from miaotui.transforms.quant_math import decode, encode, split_groups, weight_params


def hessian_accumulator(h: Tensor | None, num_rows: int, x: Tensor) -> tuple[Tensor, int]:
    """One step of the running GPTQ Hessian H = 2 X^T X / n over all rows seen so far.

    Start from ``(None, 0)`` and feed each activation batch x (..., K) as it arrives (e.g. from a
    forward hook): ``h, n = hessian_accumulator(h, n, x)``. Returns float32 (K, K) and the new row
    count. Keeping the running mean (as the reference does) rather than the sum keeps the
    magnitudes bounded however many batches are fed.
    """
    x = x.reshape(-1, x.shape[-1]).float()
    b = x.shape[0]
    total = num_rows + b
    if h is None:
        h = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
    if total == 0:
        return h, 0
    h = h * (num_rows / total) + (x.t() @ x) * (2.0 / total)
    return h, total


def _inverse_hessian_factor(h: Tensor, damp: float) -> Tensor:
    """Upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1 = U^T U, float64.

    With J the reversal permutation and J H J = L L^T, U = J L^-1 J: one Cholesky and one
    triangular inverse, where inverting H and factoring the inverse took two of each.
    """
    k = h.shape[0]
    eye = torch.eye(k, dtype=h.dtype, device=h.device)
    h = h + damp * h.diagonal().mean() * eye
    chol, info = torch.linalg.cholesky_ex(h.flip(0, 1))
    if info.item() != 0:
        raise ValueError(
            f"the Hessian is not positive definite even with damp={damp}; use a larger damp "
            "(e.g. 0.1) or more calibration tokens"
        )
    return torch.linalg.solve_triangular(chol, eye, upper=False).flip(0, 1)


def gptq_quantize(
    w: Tensor,
    hessian: Tensor,
    bits: int = 4,
    group_size: int | None = 32,
    symmetric: bool = True,
    act_order: bool = True,
    damp: float = 0.01,
    block_size: int = 128,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Quantize w (M, K) with GPTQ, given H = 2 X^T X / n (K, K) from ``hessian_accumulator``.

    Returns (codes (M, K), scale (M, K // G), offset (M, K // G) | None, perm | None) in the
    conventions of ``quant_math`` (bits=8: int8, value = q * scale; bits=4: uint8 0..15). Codes
    are in the ORIGINAL column order; ``perm`` is the act-order sweep order (columns by
    decreasing diag H), for inspection only.

    - Lazy batch updates: errors of a block of ``block_size`` columns reach later blocks in one
      matmul.
    - Dead columns (diag H = 0, never active in calibration) are set to zero, as in the reference.
    - Groups: without act_order, a group's scale is taken from the already-updated weights when the
      sweep reaches its first column. With act_order, "static groups": every original group's
      scale is computed from W before the permuted sweep, so each group keeps exactly one scale.
      group_size None: one scale per output row, computed before the sweep.
    """
    wg = split_groups(w, group_size)  # validates shape and group size
    m, k = w.shape
    g = wg.shape[-1]
    if hessian.shape != (k, k):
        raise ValueError(
            f"hessian shape {tuple(hessian.shape)} does not match K={k}; expected (K, K)"
        )
    if block_size <= 0:
        raise ValueError(f"block_size={block_size} must be positive")
    weight = w.float().clone()
    h = hessian.double().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    weight[:, dead] = 0

    static = act_order or group_size is None
    if static:
        scale, offset = weight_params(weight.reshape(m, k // g, g), bits, symmetric)
    else:
        scale = torch.zeros(m, k // g, dtype=torch.float32, device=w.device)
        offset = None if (symmetric or bits == 8) else torch.zeros_like(scale)

    order = torch.arange(k, device=w.device)
    perm = None
    if act_order:
        perm = torch.argsort(h.diagonal(), descending=True, stable=True)
        order = perm
        weight = weight[:, perm]
        h = h[perm][:, perm]
    hinv = _inverse_hessian_factor(h, damp).float()
    group_of = (order // g).tolist()  # original group of each swept column

    codes = torch.empty(m, k, dtype=torch.int8 if bits == 8 else torch.uint8, device=w.device)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = weight[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            gi = group_of[j]
            if not static and j % g == 0:
                # Up-to-date group columns: in this block from w1, beyond it with the pending
                # (lazy) update of this block's errors applied.
                ahead = weight[:, i2 : j + g] - err1 @ hinv[i1:i2, i2 : j + g]
                s, o = weight_params(torch.cat([w1[:, i : i + g], ahead], dim=1), bits, symmetric)
                scale[:, gi] = s
                if offset is not None:
                    offset[:, gi] = o
            off = None if offset is None else offset[:, gi]
            col = w1[:, i]
            q = encode(col, scale[:, gi], off, bits)
            codes[:, j] = q
            e = (col - decode(q, scale[:, gi], off)) / hinv1[i, i]
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = e
        weight[:, i2:] -= err1 @ hinv[i1:i2, i2:]

    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return codes, scale.contiguous(), None if offset is None else offset.contiguous(), perm
