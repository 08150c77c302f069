"""Shape-changing (structured) pruning math, model-agnostic: which layers, MLP channels and
attention heads to remove, the slicing helpers, and a least-squares recovery of the next
projection.

Conventions: hidden states are ``(n tokens, C)``; a linear weight is ``(out, in)``; index
tensors are sorted ``int64``.

* Layers: :func:`block_influence` is ShortGPT's Block Influence, ``1 - mean_t cos(h_in_t,
  h_out_t)`` (Men et al. 2024, "ShortGPT: Layers in Large Language Models are More Redundant
  Than You Expect"), or with ``metric="angular"`` the mean angular distance ``arccos(cos) / pi``
  (Gromov et al. 2024, "The Unreasonable Ineffectiveness of the Deeper Layers"), in ``[0, 1]``.
  :func:`rank_layers` orders layers from least to most influential; :func:`best_layer_span`
  finds Gromov's best block of ``k`` consecutive layers to drop.
* MLP channels: :func:`mlp_channel_scores` = ``||act_j||_2 * ||W_down[:, j]||_2`` -- the norm
  of channel ``j``'s contribution to the MLP output is bounded by exactly this product (Wanda's
  score summed over the column, as in Wanda-sp / FLAP-style channel pruning).
* Attention heads with grouped-query attention (GQA): see :func:`head_scores` and
  :func:`select_heads`.
* Recovery: :func:`least_squares_correction` refits the next projection on the kept channels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "HeadScores",
    "HeadSelection",
    "best_layer_span",
    "block_influence",
    "head_dim_indices",
    "head_scores",
    "least_squares_correction",
    "least_squares_correction_from_gram",
    "mlp_channel_scores",
    "rank_layers",
    "select_channels",
    "select_heads",
    "slice_linear_cols",
    "slice_linear_rows",
]

_METRICS = ("cosine", "angular")


def _tokens(h: torch.Tensor, name: str) -> torch.Tensor:
    if h.dim() < 1:
        raise ValueError(f"{name} must be (n, C), got a scalar")
    return h.detach().reshape(-1, h.shape[-1]).double()


# ----------------------------------------------------------------------------- layers


def block_influence(h_in: torch.Tensor, h_out: torch.Tensor, metric: str = "cosine") -> float:
    """How much a block (or span of blocks) changes the hidden state; low = redundant.

    ``metric="cosine"``: ShortGPT BI = ``1 - mean_t cos(h_in_t, h_out_t)`` in ``[0, 2]``.
    ``metric="angular"``: mean ``arccos(cos) / pi`` in ``[0, 1]`` (Gromov et al. 2024).
    ``h_in`` / ``h_out`` are ``(n, C)`` (or ``(..., C)``) hidden states at the block's input and
    output for the same tokens. Zero vectors count as orthogonal to everything.
    """
    if metric not in _METRICS:
        raise ValueError(f"metric must be one of {_METRICS}, got {metric!r}")
    a, b = _tokens(h_in, "h_in"), _tokens(h_out, "h_out")
    if a.shape != b.shape:
        raise ValueError(f"h_in {tuple(h_in.shape)} and h_out {tuple(h_out.shape)} differ")
    if a.shape[0] == 0:
        raise ValueError("need at least one token")
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-12).clamp(-1.0, 1.0)
    if metric == "cosine":
        return float(1.0 - cos.mean())
    return float((torch.arccos(cos) / math.pi).mean())


def rank_layers(
    pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], metric: str = "cosine"
) -> list[int]:
    """Layer indices sorted from least to most influential (ties: lower index first).

    ``pairs[i] = (h_in, h_out)`` of layer ``i``. Removing the first ``k`` of the result is
    ShortGPT's layer pruning.
    """
    scores = [block_influence(a, b, metric) for a, b in pairs]
    return sorted(range(len(scores)), key=lambda i: (scores[i], i))


def best_layer_span(hidden: Sequence[torch.Tensor], n_drop: int) -> tuple[int, float]:
    """Gromov et al.'s block to drop: the ``l`` minimising the angular distance between the
    hidden states before layer ``l`` and before layer ``l + n_drop``.

    ``hidden[i]`` is the residual stream entering layer ``i``; ``hidden[L]`` is the last layer's
    output, so ``len(hidden) = L + 1``. Returns ``(l, distance)``; layers ``l .. l+n_drop-1`` go.
    """
    n_layers = len(hidden) - 1
    if not 1 <= n_drop <= n_layers:
        raise ValueError(f"n_drop must be in [1, {n_layers}], got {n_drop}")
    best = min(
        (block_influence(hidden[i], hidden[i + n_drop], "angular"), i)
        for i in range(n_layers - n_drop + 1)
    )
    return best[1], best[0]


# ----------------------------------------------------------------------------- MLP channels


def mlp_channel_scores(w_down: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
    """Importance of every intermediate channel ``j``: ``||act_j||_2 * ||W_down[:, j]||_2``.

    ``w_down (C, F)``; ``act (n, F)`` is the input of the down projection (``silu(gate) * up``
    for a gated MLP). Returns ``(F,)`` fp32.
    """
    if w_down.dim() != 2:
        raise ValueError(f"w_down must be (C, F), got shape {tuple(w_down.shape)}")
    a = act.detach().reshape(-1, act.shape[-1]).float()
    if a.shape[1] != w_down.shape[1]:
        raise ValueError(f"act has {a.shape[1]} channels but w_down {tuple(w_down.shape)}")
    act_norm = torch.linalg.vector_norm(a, dim=0)
    w_norm = torch.linalg.vector_norm(w_down.detach().float(), dim=0).to(act_norm.device)
    return act_norm * w_norm


def select_channels(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Sorted ``int64`` indices of the ``keep`` highest scores (ties: lower index kept)."""
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D, got shape {tuple(scores.shape)}")
    if not 0 <= keep <= scores.numel():
        raise ValueError(f"keep must be in [0, {scores.numel()}], got {keep}")
    order = torch.sort(scores.detach(), descending=True, stable=True).indices
    return torch.sort(order[:keep]).values


def slice_linear_rows(w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Keep output rows ``idx`` of ``w (out, in)`` (also works on a bias ``(out,)``)."""
    return w.index_select(0, idx.to(device=w.device, dtype=torch.long)).contiguous()


def slice_linear_cols(w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Keep input columns ``idx`` of ``w (out, in)``."""
    if w.dim() != 2:
        raise ValueError(f"w must be (out, in), got shape {tuple(w.shape)}")
    return w.index_select(1, idx.to(device=w.device, dtype=torch.long)).contiguous()


# ----------------------------------------------------------------------------- heads


@dataclass(frozen=True)
class HeadScores:
    """``q (n_heads,)``: norm of each q head's contribution to the attention output;
    ``kv (n_kv_heads,)``: norm of each GQA group's (a KV head and its q heads) joint one."""

    q: torch.Tensor
    kv: torch.Tensor


@dataclass(frozen=True)
class HeadSelection:
    """Heads to keep, as sorted head indices in the *original* numbering.

    ``q_heads`` index q heads (rows of q_proj / columns of o_proj, in units of head_dim via
    :func:`head_dim_indices`), ``kv_heads`` index KV heads (rows of k_proj and v_proj). The
    kept q heads of kept KV head ``kv_heads[g]`` are ``q_heads[g*G' : (g+1)*G']`` with
    ``G' = len(q_heads) // len(kv_heads)``, so the usual ``q head i -> kv head i // G'``
    mapping holds in the pruned model.
    """

    q_heads: torch.Tensor
    kv_heads: torch.Tensor

    @property
    def n_heads(self) -> int:
        return int(self.q_heads.numel())

    @property
    def n_kv_heads(self) -> int:
        return int(self.kv_heads.numel())


def head_scores(
    w_o: torch.Tensor, attn_out: torch.Tensor, n_heads: int, n_kv_heads: int
) -> HeadScores:
    """Score attention heads of a GQA layer from calibration data.

    ``w_o (C, n_heads * head_dim)`` is the output projection; ``attn_out (n, n_heads *
    head_dim)`` its input (the concatenated per-head attention outputs, q head ``h`` in columns
    ``h*hd:(h+1)*hd``, q heads ``g*G:(g+1)*G`` sharing KV head ``g``, ``G = n_heads /
    n_kv_heads``). A head's score is ``||O_h W_o[:, h]^T||_F`` -- the exact size of what it
    adds to the layer output -- and a group's is the same for the sum over its q heads (heads of
    a group can cancel or reinforce, which the sum of the q scores would miss).
    """
    if w_o.dim() != 2:
        raise ValueError(f"w_o must be (C, n_heads*head_dim), got shape {tuple(w_o.shape)}")
    if n_heads <= 0 or n_kv_heads <= 0 or n_heads % n_kv_heads != 0:
        raise ValueError(
            f"n_heads={n_heads} must be a positive multiple of n_kv_heads={n_kv_heads}"
        )
    width = w_o.shape[1]
    if width % n_heads != 0:
        raise ValueError(f"o_proj input width {width} is not a multiple of n_heads={n_heads}")
    hd = width // n_heads
    o = attn_out.detach().reshape(-1, attn_out.shape[-1]).float()
    if o.shape[1] != width:
        raise ValueError(f"attn_out width {o.shape[1]} != o_proj input width {width}")
    wf = w_o.detach().float().to(o.device)
    group = n_heads // n_kv_heads
    q = torch.empty(n_heads, device=o.device)
    kv = torch.empty(n_kv_heads, device=o.device)
    for g in range(n_kv_heads):
        total = None
        for h in range(g * group, (g + 1) * group):
            sl = slice(h * hd, (h + 1) * hd)
            contrib = o[:, sl] @ wf[:, sl].T
            q[h] = torch.linalg.vector_norm(contrib)
            total = contrib if total is None else total + contrib
        kv[g] = torch.linalg.vector_norm(total)
    return HeadScores(q=q, kv=kv)


def select_heads(
    scores: HeadScores, keep: int, mode: str = "group", n_kv_heads: int | None = None
) -> HeadSelection:
    """Choose heads to keep so that every kept KV group has the same number of q heads.

    ``mode="group"`` (default): ``keep`` is the number of KV groups kept; the lowest-scoring
    groups are removed whole -- a KV head with all its q heads. This shrinks q/k/v/o
    projections *and the KV cache*, which is what bounds memory and decode speed; on models
    with few KV heads (SmolLM2-135M: 9 q / 3 KV) it is coarse, one group being a third of
    the attention.

    ``mode="within_group"``: ``keep`` is the total number of q heads kept and must be a
    multiple of ``n_kv_heads``; every group keeps its ``keep / n_kv_heads`` best q heads and all
    KV heads stay. Finer (less quality lost per parameter) but it saves only q/o projection
    work, not KV cache.

    Both keep the group size uniform because GQA attention maps q head ``i`` to KV head
    ``i // G`` with one ``G`` for the layer (``repeat_interleave`` of K/V); removing q heads
    unevenly would need a per-head KV index map the model does not have.
    """
    n_heads = scores.q.numel()
    n_kv = scores.kv.numel() if n_kv_heads is None else n_kv_heads
    if n_kv != scores.kv.numel() or n_heads % n_kv != 0:
        raise ValueError(f"scores ({n_heads} q, {scores.kv.numel()} kv) do not match n_kv={n_kv}")
    group = n_heads // n_kv
    if mode == "group":
        if not 1 <= keep <= n_kv:
            raise ValueError(f"mode='group': keep must be in [1, {n_kv}] KV groups, got {keep}")
        kv_idx = select_channels(scores.kv, keep)
        q_idx = (kv_idx.unsqueeze(1) * group + torch.arange(group, device=kv_idx.device)).reshape(
            -1
        )
        return HeadSelection(q_heads=q_idx, kv_heads=kv_idx)
    if mode == "within_group":
        if not (n_kv <= keep <= n_heads and keep % n_kv == 0):
            raise ValueError(
                f"mode='within_group': keep must be a multiple of n_kv_heads={n_kv} in "
                f"[{n_kv}, {n_heads}] q heads, got {keep}"
            )
        per = keep // n_kv
        parts = [
            g * group + select_channels(scores.q[g * group : (g + 1) * group], per)
            for g in range(n_kv)
        ]
        kv_idx = torch.arange(n_kv, device=scores.q.device)
        return HeadSelection(q_heads=torch.cat(parts), kv_heads=kv_idx)
    raise ValueError(f"mode must be 'group' or 'within_group', got {mode!r}")


def head_dim_indices(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Row/column indices covered by ``heads``: ``[h*head_dim, (h+1)*head_dim)`` for each."""
    heads = heads.to(torch.long)
    return (heads.unsqueeze(1) * head_dim + torch.arange(head_dim, device=heads.device)).reshape(-1)


# ----------------------------------------------------------------------------- recovery


def least_squares_correction_from_gram(
    w_next: torch.Tensor, gram: torch.Tensor, keep_idx: torch.Tensor, damp: float = 1e-3
) -> torch.Tensor:
    """:func:`least_squares_correction` from the Gram matrix ``G = act^T act (F, F)``.

    ``G`` is additive over calibration batches, so it can be accumulated without keeping the
    activations.
    """
    if w_next.dim() != 2:
        raise ValueError(f"w_next must be (M, F), got shape {tuple(w_next.shape)}")
    f = w_next.shape[1]
    if gram.shape != (f, f):
        raise ValueError(f"gram must be (F, F) = ({f}, {f}), got {tuple(gram.shape)}")
    if damp < 0:
        raise ValueError(f"damp must be >= 0, got {damp}")
    idx = keep_idx.to(device=gram.device, dtype=torch.long)
    if idx.numel() and (idx.min() < 0 or idx.max() >= f):
        raise ValueError(f"keep_idx out of range [0, {f})")
    W = w_next.detach().to(device=gram.device, dtype=torch.float64)
    G = gram.detach().double()
    W_k = W[:, idx]  # plain slicing
    if idx.numel() == 0:
        return W_k.to(w_next.dtype).to(w_next.device)
    G_kk = G[idx][:, idx]
    G_kall = G[idx]  # (k, F)
    # min_V ||A_k V^T - A W^T||^2 + lam ||V - W_k||^2, ridge *towards the plain slice*: at the
    # optimum the objective is <= its value at V = W_k (the plain-slicing error), and the
    # error term alone is <= the objective, so the correction can never be worse than slicing
    # on the calibration data.
    lam = damp * float(torch.diagonal(G_kk).mean().clamp_min(1e-12))
    lhs = G_kk + lam * torch.eye(idx.numel(), dtype=G.dtype, device=G.device)
    rhs = G_kall @ W.T + lam * W_k.T  # (k, M)
    chol, info = torch.linalg.cholesky_ex(lhs)
    if int(info) == 0:
        V = torch.cholesky_solve(rhs, chol).T
    else:  # singular even with the ridge (lam = 0 and rank-deficient): minimum-norm solution
        V = torch.linalg.lstsq(lhs, rhs).solution.T

    def err(v: torch.Tensor) -> torch.Tensor:  # ||A_k v^T - A W^T||_F^2 via the Gram matrix
        return (v @ G_kk * v).sum() - 2.0 * (v @ G_kall * W).sum() + (W @ G * W).sum()

    if not torch.isfinite(V).all() or err(V) > err(W_k):  # guard against round-off
        V = W_k
    return V.to(device=w_next.device, dtype=w_next.dtype)


def least_squares_correction(
    w_next: torch.Tensor, act: torch.Tensor, keep_idx: torch.Tensor, damp: float = 1e-3
) -> torch.Tensor:
    """Refit the next projection on the kept channels: ``w_next (M, F) -> w_new (M, k)``.

    After removing channels of ``act (n, F)`` (the next projection's input, e.g. MLP
    intermediate channels before ``down_proj``), solve the ridge-regularised least squares

        ``min_V ||act[:, keep] V^T - act W^T||_F^2 + lam ||V - W[:, keep]||_F^2``

    so the kept channels take over, as far as they linearly can, what the removed ones
    contributed. This is the layer-wise output reconstruction of Kwon et al. 2022 ("A Fast
    Post-Training Pruning Framework for Transformers", least-squares mask tuning) and of
    FLAP / SliceGPT-style recovery without retraining. ``lam = damp * mean(diag(G_kk))``; the
    ridge pulls towards plain slicing, and the result never has a larger calibration error
    than plain slicing (checked, falling back to the slice on round-off). Computed in fp64.
    """
    a = act.detach().reshape(-1, act.shape[-1]).double()
    if a.shape[1] != w_next.shape[-1]:
        raise ValueError(f"act has {a.shape[1]} channels, w_next {tuple(w_next.shape)}")
    return least_squares_correction_from_gram(w_next, a.T @ a, keep_idx, damp)
