"""AWQ (Lin et al. 2023, "AWQ: Activation-aware Weight Quantization for LLM Compression"),
following the reference implementation (mit-han-lab/llm-awq, auto_scale.py and auto_clip.py).

Input channels that carry large activations matter most, so they are scaled up before
round-to-nearest quantization (smaller relative rounding error) and the activations are scaled
down by the same factor: W x = (W diag(s)) (diag(s)^-1 x). The scale is s = mean|x|^alpha with
alpha found by a grid search on the layer's output error; then each group's clipping range is
searched the same way.

Contract with the caller: ``awq_quantize`` returns the codes of W diag(s), not of W. The caller
must fold 1/s into the op that produces this layer's input, so the layer sees x / s:
- after an RMSNorm: ``norm.weight /= s``;
- after a linear (e.g. v_proj before o_proj, up_proj before down_proj): ``prev.weight /= s[:, None]``
  (and ``prev.bias /= s``), which needs prev's output channels to map one-to-one onto K.
Linears that share one input (q, k, v; gate, up) must share one s: pass their weights
concatenated along M, then split the codes.
"""

import torch
from torch import Tensor

from miaotui.transforms.quant_math import (
    decode,
    encode,
    fake_quantize,
    quantize_weight,
    split_groups,
    weight_params,
)


def awq_search_scale(
    w: Tensor,
    x_calib: Tensor,
    bits: int = 4,
    group_size: int | None = 32,
    symmetric: bool = True,
    grid: int = 20,
) -> Tensor:
    """Per-input-channel scale s (K,) minimizing ||Q(W diag(s)) diag(s)^-1 X^T - W X^T||^2.

    s = mean|x|^alpha / sqrt(max * min) for alpha in {0, 1/grid, ..., (grid-1)/grid}; alpha = 0
    is s = 1, plain round-to-nearest, so on the calibration set the result is never worse than it.
    x_calib (n, K) or (..., K): inputs of this layer.
    """
    wf = w.float()
    x = x_calib.reshape(-1, x_calib.shape[-1]).float()
    if x.shape[1] != wf.shape[1]:
        raise ValueError(f"x_calib has {x.shape[1]} channels, the weight has K={wf.shape[1]}")
    x_mean = x.abs().mean(0)
    # ||X D^T||^2 = sum(D (X^T X) * D) for D = W_hat - W: M K^2 instead of M K n per grid point.
    gram = x.t() @ x if x.shape[0] > x.shape[1] else None  # (K, K)
    best_err, best_s = float("inf"), torch.ones_like(x_mean)
    for i in range(grid):
        s = x_mean.pow(i / grid).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        d = fake_quantize(wf * s, bits, group_size, symmetric) / s - wf  # (M, K)
        err = ((d @ gram) * d).sum().item() if gram is not None else (x @ d.t()).pow(2).sum().item()
        if err < best_err:
            best_err, best_s = err, s
    return best_s


def awq_search_clip(
    w: Tensor,
    x_calib: Tensor,
    bits: int = 4,
    group_size: int | None = 32,
    symmetric: bool = True,
    grid: int = 20,
    max_shrink: float = 0.5,
) -> Tensor:
    """Per-group clipping bound c (M, K // G): quantizing clamp(w, -c, c) minimizes each group's
    share of the output error, sum_n (x_g . (Q(w_g) - w_g))^2, over c = absmax * (1 - i / grid)
    for i < max_shrink * grid (the reference's auto_clip). w and x_calib as the layer sees them,
    i.e. W diag(s) and X / s after scaling.
    """
    wg = split_groups(w, group_size)  # (M, ng, G)
    m, ng, g = wg.shape
    xg = x_calib.reshape(-1, ng, g).float()  # (n, ng, G)
    gram = torch.einsum("ngk,ngl->gkl", xg, xg)  # (ng, G, G): per-group X_g^T X_g
    absmax = wg.abs().amax(-1)  # (M, ng)
    best_err = torch.full_like(absmax, float("inf"))
    best = absmax.clone()
    for i in range(max(1, int(max_shrink * grid))):
        bound = absmax * (1 - i / grid)
        wc = torch.minimum(torch.maximum(wg, -bound[..., None]), bound[..., None])
        scale, offset = weight_params(wc, bits, symmetric)
        off = None if offset is None else offset[..., None]
        diff = decode(encode(wc, scale[..., None], off, bits), scale[..., None], off) - wg
        err = torch.einsum("mgk,gkl,mgl->mg", diff, gram, diff)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, bound, best)
    return best


def awq_quantize(
    w: Tensor,
    x_calib: Tensor,
    bits: int = 4,
    group_size: int | None = 32,
    symmetric: bool = True,
    grid: int = 20,
    clip: bool = True,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """AWQ: (codes, scale, offset | None, s) where the codes quantize W diag(s).

    The caller folds 1/s into the previous op (module docstring). ``clip=False`` skips the clipping
    search; the reference skips it for q_proj and k_proj, whose outputs meet in q k^T.
    The paper's setting is symmetric=False (min/max with offset); group_size must divide K.
    """
    s = awq_search_scale(w, x_calib, bits, group_size, symmetric, grid)
    ws = w.float() * s
    if clip:
        x_scaled = x_calib.reshape(-1, x_calib.shape[-1]).float() / s
        bound = awq_search_clip(ws, x_scaled, bits, group_size, symmetric, grid)[..., None]
        wg = split_groups(ws, group_size)
        ws = torch.minimum(torch.maximum(wg, -bound), bound).reshape(ws.shape)
    codes, scale, offset = quantize_weight(ws, bits, group_size, symmetric)
    return codes, scale, offset, s
