"""SparseGPT one-shot pruning of one linear layer (Frantar & Alistarh 2023, "SparseGPT: Massive
Language Models Can Be Accurately Pruned in One-Shot").

Given a weight ``W (M, K)`` and the layer-input Hessian ``H = 2/n X^T X`` (``K x K``), each
row is pruned to minimise the layer's output error ``||W X^T - W' X^T||``. Columns are
processed left to right in blocks of ``block_size``:

1. ``Hinv = chol(H^-1)`` as the *upper* Cholesky factor of the dampened inverse Hessian; its
   row ``i`` (from the diagonal on) is the OBS update direction for column ``i`` once columns
   ``< i`` are fixed (the "sequential elimination" trick that makes all rows share one
   inverse).
2. Adaptive mask selection: at the start of every block (or every ``m`` columns for N:M) the
   weights to prune are those with the smallest OBS saliency ``w^2 / Hinv_cc^2`` of the
   *current*, already-updated weights.
3. Each column in turn: pruned weights are set to 0, and the error ``(w - q) / Hinv_cc`` is
   propagated to the not-yet-processed columns of the block (``W[:, i:] -= err * Hinv[i, i:]``);
   after the block, its accumulated error is propagated to all later columns at once.

Sparsity is exact. Unstructured: every column block zeroes exactly
``floor(Z * c2 / K) - floor(Z * c1 / K)`` weights for block columns ``[c1, c2)``, where
``Z = round(s * M * K)``, selected jointly over all rows of the block as in the reference
implementation; with ``per_row=True`` it is the same with ``Z = round(s * K)`` in every row
separately. So the layer (or every row) has exactly ``Z`` zeros and every block is within
one weight of ``s``. N:M: every
group of ``m`` consecutive columns keeps exactly ``n`` weights in every row.
"""

from __future__ import annotations

import torch

from miaotui.transforms.prune_math import _check_sparsity, _keep_top, n_pruned

__all__ = ["hessian_from_inputs", "sparsegpt_prune"]


def hessian_from_inputs(x: torch.Tensor) -> torch.Tensor:
    """``H = 2/n X^T X`` (fp32, ``K x K``) from layer inputs ``x (..., K)``.

    Over several batches, average the per-batch Hessians weighted by their token counts.
    """
    xf = x.detach().reshape(-1, x.shape[-1]).float()
    n = max(xf.shape[0], 1)
    return (2.0 / n) * (xf.T @ xf)


def _inverse_hessian_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1``; more damping on failure."""
    k = h.shape[0]
    eye = torch.eye(k, dtype=h.dtype, device=h.device)
    mean_diag = torch.diagonal(h).mean().clamp_min(1e-12)
    lam = damp
    for _ in range(8):
        hd = h + (lam * mean_diag) * eye
        chol, info = torch.linalg.cholesky_ex(hd)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(chol)
            up, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0 and torch.isfinite(up).all():
                return up
        lam = max(lam * 10.0, 1e-6)
    raise ValueError(
        "Hessian is not positive definite even with damping "
        f"{lam:g} * mean(diag H); check the calibration inputs for NaN/inf"
    )


def _prune_lowest(scores: torch.Tensor, n_prune: int, per_row: bool) -> torch.Tensor:
    """Bool mask (True = prune) of the ``n_prune`` lowest scores, per row or jointly.

    Ties: the higher column (flat) index is pruned first, matching ``prune_math``.
    """
    if per_row:
        return ~_keep_top(scores, scores.shape[1] - n_prune)
    flat = scores.reshape(1, -1)
    return ~_keep_top(flat, flat.shape[1] - n_prune).reshape(scores.shape)


@torch.no_grad()
def sparsegpt_prune(
    w: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float = 0.5,
    nm: tuple[int, int] | None = None,
    block_size: int = 128,
    damp: float = 0.01,
    per_row: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``w (M, K)`` with SparseGPT; returns ``(w_pruned, mask)`` with ``mask`` True = keep.

    ``nm=(n, m)`` keeps ``n`` of every ``m`` consecutive input weights per row (``sparsity``
    is then ignored); ``block_size`` must be a multiple of ``m``. ``damp`` is the relative
    diagonal dampening of ``H``. ``w_pruned`` has ``w``'s dtype and device, computation is
    fp32; pruned weights are exactly ``0``. ``hessian`` may be any positive multiple of
    ``X^T X`` (the scale cancels).
    """
    if w.dim() != 2:
        raise ValueError(f"w must be (M, K), got shape {tuple(w.shape)}")
    m_out, k_in = w.shape
    if hessian.shape != (k_in, k_in):
        raise ValueError(
            f"hessian must be (K, K) = ({k_in}, {k_in}) for w {tuple(w.shape)}, "
            f"got {tuple(hessian.shape)}"
        )
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if damp < 0:
        raise ValueError(f"damp must be >= 0, got {damp}")
    if nm is not None:
        pn, pm = nm
        if pm <= 0 or not 0 <= pn <= pm:
            raise ValueError(f"nm must be (n, m) with 0 <= n <= m, m > 0, got {nm}")
        if k_in % pm != 0:
            raise ValueError(f"K={k_in} is not a multiple of m={pm} for {pn}:{pm} sparsity")
        if block_size % pm != 0:
            raise ValueError(f"block_size={block_size} must be a multiple of m={pm}")
    else:
        sparsity = _check_sparsity(sparsity)

    dev = w.device
    W = w.detach().to(torch.float32).clone()
    H = hessian.detach().to(device=dev, dtype=torch.float32).clone()
    if not (torch.isfinite(H).all() and torch.isfinite(W).all()):
        raise ValueError("w and hessian must be finite")

    # Inputs that are always zero carry no information: their weights can go freely.
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    Hinv = _inverse_hessian_cholesky(H, damp)
    pruned = torch.zeros(m_out, k_in, dtype=torch.bool, device=dev)
    # Exact total: the zeros are spread over the column blocks by integer cumulative rounding.
    n_total = 0 if nm is not None else n_pruned(k_in if per_row else m_out * k_in, sparsity)

    for c1 in range(0, k_in, block_size):
        c2 = min(c1 + block_size, k_in)
        cnt = c2 - c1
        W1 = W[:, c1:c2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[c1:c2, c1:c2]
        d1 = torch.diagonal(Hinv1)

        if nm is None:
            n_blk = n_total * c2 // k_in - n_total * c1 // k_in
            mask1 = _prune_lowest(W1.pow(2) / d1.pow(2).unsqueeze(0), n_blk, per_row)
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)

        for i in range(cnt):
            if nm is not None and i % pm == 0:
                sal = W1[:, i : i + pm].pow(2) / d1[i : i + pm].pow(2).unsqueeze(0)
                mask1[:, i : i + pm] = ~_keep_top(sal, pn)
            col = W1[:, i]
            q = torch.where(mask1[:, i], torch.zeros((), device=dev), col)
            Q1[:, i] = q
            err = (col - q) / d1[i]
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err

        W[:, c1:c2] = Q1
        pruned[:, c1:c2] = mask1
        if c2 < k_in:
            W[:, c2:] -= Err1 @ Hinv[c1:c2, c2:]

    keep = ~pruned
    W = torch.where(keep, W, torch.zeros((), device=dev))
    return W.to(w.dtype), keep
