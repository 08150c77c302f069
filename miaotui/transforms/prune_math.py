"""Unstructured and N:M pruning numerics as pure functions (tensor in, tensor out).

Conventions: a weight ``w`` is ``(M out, K in)``; calibration inputs ``x`` are ``(n, K)``;
a mask is a bool tensor shaped like the weight with ``True = keep``.

Scores (higher = more important):

* :func:`magnitude_scores` -- ``|W|``.
* :func:`wanda_scores` -- ``|W_ij| * ||X_j||_2`` (Sun et al. 2023, "A Simple and Effective
  Pruning Approach for Large Language Models"). ``||X_j||_2`` is the L2 norm of input feature
  ``j`` over all calibration tokens (:func:`input_norms`). Wanda compares scores within each
  output row (``per_row=True``); magnitude pruning is usually done per layer.

Masks have an *exact* count: :func:`unstructured_mask` zeroes exactly
``round(sparsity * numel)`` weights (or ``round(sparsity * K)`` in every row when
``per_row``), Python's ``round``. Ties are broken deterministically: among equal scores the
weight with the lower flat index (lower column index within a row) is kept. NaN scores sort
as the largest, so a NaN-scored weight is kept. :func:`nm_mask` keeps the ``n`` largest of
every ``m`` consecutive weights along ``K`` with the same tie rule.
"""

from __future__ import annotations

import torch

__all__ = [
    "apply_mask",
    "input_norms",
    "magnitude_scores",
    "n_pruned",
    "nm_mask",
    "unstructured_mask",
    "wanda_scores",
]


def magnitude_scores(w: torch.Tensor) -> torch.Tensor:
    """``|w|`` in fp32 (same shape as ``w``)."""
    return w.detach().float().abs()


def input_norms(x: torch.Tensor) -> torch.Tensor:
    """L2 norm of every input feature over all tokens: ``x (..., K) -> (K,)`` in fp32.

    Accumulating over batches: ``sqrt(sum_b input_norms(x_b) ** 2)``.
    """
    if x.dim() < 1:
        raise ValueError(f"x must have a feature dimension, got shape {tuple(x.shape)}")
    xf = x.detach().reshape(-1, x.shape[-1]).float()
    return torch.linalg.vector_norm(xf, ord=2, dim=0)


def wanda_scores(w: torch.Tensor, x_norm: torch.Tensor) -> torch.Tensor:
    """Wanda importance ``|W_ij| * ||X_j||_2`` for ``w (M, K)`` and ``x_norm (K,)``."""
    if w.dim() != 2:
        raise ValueError(f"w must be (M, K), got shape {tuple(w.shape)}")
    if x_norm.shape != (w.shape[1],):
        raise ValueError(
            f"x_norm must be (K,) = ({w.shape[1]},) to match w {tuple(w.shape)}, "
            f"got {tuple(x_norm.shape)}"
        )
    return magnitude_scores(w) * x_norm.detach().float().to(w.device).unsqueeze(0)


def _check_sparsity(sparsity: float) -> float:
    s = float(sparsity)
    if not 0.0 <= s <= 1.0:  # also rejects NaN
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity!r}")
    return s


def n_pruned(numel: int, sparsity: float) -> int:
    """Number of weights zeroed out of ``numel`` at ``sparsity``: ``round(sparsity * numel)``."""
    return int(round(_check_sparsity(sparsity) * numel))


def _keep_top(scores2d: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Bool mask keeping the ``n_keep`` largest entries of every row of ``scores2d``.

    A stable descending sort keeps, among equal scores, the lower column index.
    """
    rows, cols = scores2d.shape
    mask = torch.zeros(rows, cols, dtype=torch.bool, device=scores2d.device)
    if n_keep <= 0 or cols == 0:
        return mask
    if n_keep >= cols:
        return mask.fill_(True)
    order = torch.sort(scores2d, dim=1, descending=True, stable=True).indices
    mask.scatter_(1, order[:, :n_keep], True)
    return mask


def unstructured_mask(scores: torch.Tensor, sparsity: float, per_row: bool = False) -> torch.Tensor:
    """Keep-mask zeroing exactly ``round(sparsity * count)`` lowest-scoring weights.

    ``per_row=False``: one threshold over the whole tensor (``count = numel``).
    ``per_row=True``: every row (last dimension) independently (``count = K``), as Wanda does.
    """
    if scores.dim() == 0:
        raise ValueError("scores must have at least one dimension")
    if scores.is_complex():
        raise ValueError("scores must be real")
    s = scores.detach()
    if per_row:
        k = s.shape[-1]
        flat = s.reshape(-1, k)
        mask = _keep_top(flat, k - n_pruned(k, sparsity))
    else:
        numel = s.numel()
        flat = s.reshape(1, -1)
        mask = _keep_top(flat, numel - n_pruned(numel, sparsity))
    return mask.reshape(s.shape)


def nm_mask(scores: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """N:M keep-mask: the ``n`` largest of every ``m`` consecutive weights along the last dim.

    Raises ``ValueError`` when the last dimension is not a multiple of ``m`` or ``0 <= n <= m``
    does not hold.
    """
    if m <= 0 or not 0 <= n <= m:
        raise ValueError(f"need 0 <= n <= m and m > 0 for an N:M pattern, got n={n}, m={m}")
    if scores.dim() == 0:
        raise ValueError("scores must have at least one dimension")
    k = scores.shape[-1]
    if k % m != 0:
        raise ValueError(f"last dimension {k} is not a multiple of m={m} for {n}:{m} sparsity")
    groups = scores.detach().reshape(-1, m)
    return _keep_top(groups, n).reshape(scores.shape)


def apply_mask(w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """New tensor equal to ``w`` where ``mask`` is True and exactly ``+0.0`` elsewhere.

    (``torch.where`` rather than ``w * mask``: a masked NaN/inf becomes 0, not NaN, and no
    ``-0.0`` appears.)
    """
    if mask.shape != w.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != weight shape {tuple(w.shape)}")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor (True = keep), got {mask.dtype}")
    return torch.where(mask.to(w.device), w, torch.zeros((), dtype=w.dtype, device=w.device))
