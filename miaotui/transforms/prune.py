"""Pruning a built model: `prune_model(model, spec, ctx) -> model`, the numerics of
prune_math / sparsegpt / structured wired into the decoder blocks.

Unstructured and N:M (every projection of every decoder block; embeddings and the output head
stay dense). Shapes do not change: pruned weights are exactly 0 in the nn.Linear weights, so a
quantizer applied next ("prune-wanda-0.5+int4-rtn-g32") quantizes the pruned matrices.

    magnitude   |W|, one threshold per weight matrix (N:M: per group of m inputs).
    wanda       |W_ij| * ||X_j||, per output row (Sun et al. 2023).
    sparsegpt   OBS pruning with weight update from H = 2 X^T X / n (Frantar & Alistarh 2023).

Wanda and SparseGPT calibrate sequentially, as both papers do: block i is calibrated on the
hidden states produced by the already pruned blocks 0..i-1, then pruned. A layer that ends up at
least `SPARSE_MIN_SPARSITY` sparse is swapped for a CSR `SparseLinear`; below the measured
crossover it stays dense (see `SPARSE_MIN_SPARSITY`).

Structured (shapes shrink; the config is replaced to match, so the engine sizes its KV cache
from it and a checkpoint of the result reloads as an ordinary smaller model):

    layers      drop round(s * n_layers) blocks with the lowest Block Influence (ShortGPT,
                1 - mean cos(h_in, h_out) on calibration hidden states); the rest are
                renumbered (attention.layer indexes the KV cache).
    heads       the same number of heads in every layer, GQA groups kept uniform
                (`structured.select_heads`); see `head_plan` for how s maps to heads.
    channels    the same intermediate size F - round(s * F) in every layer; channel score
                ||act_j|| * ||W_down[:, j]|| (Wanda-sp / FLAP style).

Heads and channels are scored block by block on the sequential calibration inputs too. With
`spec.recover` (default) the projection after the removed structures (w_down after channels,
wo after heads) is refit by ridge least squares on those activations
(`structured.least_squares_correction_from_gram`, ridge `RECOVERY_DAMP`). Layers have no
recovery. Counts are uniform across layers, so ModelConfig (one n_heads, n_kv_heads,
intermediate_size) stays exact and the engine's KV cache needs no per-layer sizes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from miaotui.errors import InvalidRequestError, UnsupportedModelError
from miaotui.model.attention import AttentionMetadata, build_attention_metadata
from miaotui.model.kv_cache import KVCache
from miaotui.model.sparse_linear import SparseLinear
from miaotui.model.transformer import Transformer
from miaotui.transforms import structured as st
from miaotui.transforms.calibrate import (
    Calibration,
    LinearStats,
    _linear_hook,
    calibrate,
    calibration_windows,
)
from miaotui.transforms.prune_math import (
    apply_mask,
    magnitude_scores,
    nm_mask,
    unstructured_mask,
    wanda_scores,
)
from miaotui.transforms.sparsegpt import sparsegpt_prune
from miaotui.transforms.spec import PruneSpec, TransformContext

log = logging.getLogger(__name__)

UNSTRUCTURED = ("magnitude", "wanda", "sparsegpt")
STRUCTURED = ("layers", "heads", "channels")
BLOCK = 16
"""KV-cache block size of the calibration forward passes."""
# Measured by bench/bench_sparse.py on this CPU, SmolLM2 shapes, fp32: CSR x dense beats dense
# `torch.mm` only from ~91 % sparsity at N=1 (decode; 95 % is the lowest tested point that wins),
# from ~69 % at N=16 and ~81 % at N=512. Decode has the highest crossover, so a layer goes sparse
# from 0.92 on: there it wins at every batch size measured, and below it every layer stays a
# dense nn.Linear (zeros included) -- 25 %, 50 % and 2:4 stay dense.
SPARSE_MIN_SPARSITY = 0.92
"""Fraction of zero weights from which a layer runs on the CSR kernel (decode crossover)."""
RECOVERY_DAMP = 0.5
"""Ridge of the least-squares recovery, relative to mean(diag(G_kk)). The numerics' default
(1e-3) overfits 4096 calibration tokens when ~1200 weights per output row are refit: on
SmolLM2-135M it made perplexity worse than plain slicing; 0.3-1 made it better."""


def prune_model(model: Transformer, spec: PruneSpec, ctx: TransformContext) -> Transformer:
    """Prune `model` (float weights) in place as `spec` says; returns it."""
    if spec.method in STRUCTURED and spec.nm is not None:
        raise InvalidRequestError(
            f"N:M ({spec.nm[0]}:{spec.nm[1]}) applies to magnitude, wanda or sparsegpt, "
            f"not to structured method {spec.method!r}"
        )
    for name, m in model.named_modules():
        if name.startswith("layers.") and hasattr(m, "packed"):  # QuantLinear
            raise UnsupportedModelError(
                f"{name} is quantized; prune float weights (prune first, then quantize)"
            )
    if spec.method in UNSTRUCTURED:
        _prune_unstructured(model, spec, ctx)
        sparsify_model(model)
    elif spec.method == "layers":
        _prune_layers(model, spec, ctx)
    elif spec.method == "heads":
        _prune_heads(model, spec, ctx)
    elif spec.method == "channels":
        _prune_channels(model, spec, ctx)
    else:
        raise InvalidRequestError(
            f"unknown prune method {spec.method!r}; one of {', '.join(UNSTRUCTURED + STRUCTURED)}"
        )
    return model


# ----------------------------------------------------------------------------- unstructured


def prune_weight(w: torch.Tensor, spec: PruneSpec, stats: LinearStats | None) -> torch.Tensor:
    """One weight (M, K) pruned by `spec`; `stats` (calibration inputs) for wanda/sparsegpt."""
    if spec.method == "sparsegpt":
        w_new, _ = sparsegpt_prune(w, stats.hessian(), spec.sparsity, nm=spec.nm)
        return w_new
    if spec.method == "wanda":
        scores = wanda_scores(w, stats.input_norm())
    else:
        scores = magnitude_scores(w)
    if spec.nm is not None:
        mask = nm_mask(scores, *spec.nm)
    else:
        mask = unstructured_mask(scores, spec.sparsity, per_row=spec.method == "wanda")
    return apply_mask(w, mask)


def _prune_unstructured(model: Transformer, spec: PruneSpec, ctx: TransformContext) -> None:
    if spec.nm is not None:
        n, m = spec.nm
        for name, lin in _block_linears(model):
            if not 0 < n < m or lin.in_features % m:
                raise InvalidRequestError(
                    f"{n}:{m} needs 0 < n < m and m dividing every layer's input width; "
                    f"{name} has {lin.in_features} inputs"
                )
    if spec.method == "magnitude":
        for _, lin in _progress(_block_linears(model), ctx.progress, "pruning"):
            _set_weight(lin, prune_weight(lin.weight, spec, None))
        return

    def prune_block(block: nn.Module, stats: dict[str, LinearStats]) -> None:
        with _one_thread():
            for name, s in stats.items():
                lin = block.get_submodule(name)
                _set_weight(lin, prune_weight(lin.weight, spec, s))

    names = [n for n, m in model.layers[0].named_modules() if isinstance(m, nn.Linear)]
    for_each_block(model, ctx, names, prune_block, gram=spec.method == "sparsegpt")


@dataclass
class _Window:
    """One calibration sequence at the input of the block being processed."""

    x: torch.Tensor
    """(T, C) hidden states."""
    rope: dict[bool, tuple[torch.Tensor, torch.Tensor]]
    meta: AttentionMetadata


@torch.no_grad()
def for_each_block(
    model: Transformer,
    ctx: TransformContext,
    names: list[str],
    fn: Callable[[nn.Module, dict[str, LinearStats]], None],
    gram: bool = False,
) -> None:
    """Sequential calibration (SparseGPT / Wanda / FLAP style): block i sees the hidden states
    produced by the already transformed blocks < i. For every block, the input statistics of
    its linears `names` (e.g. "feed_forward.w_down") are collected over the calibration
    windows, `fn(block, stats)` transforms the block in place, and the windows are run through
    the transformed block to become the next block's inputs."""
    cfg = dataclasses.replace(ctx.calibration, gram=gram, sample_rows=0, hidden_states=False)
    windows = _embed_windows(model, calibration_windows(ctx.tokenizer, cfg))
    for block in _progress(list(model.layers), ctx.progress, "pruning"):
        stats = {n: LinearStats() for n in names}
        mods = {n: block.get_submodule(n) for n in names}
        hooks = [mods[n].register_forward_hook(_linear_hook(stats[n], cfg)) for n in names]
        try:
            _run_block(block, windows, update=False)
        finally:
            for h in hooks:
                h.remove()
        fn(block, stats)
        _run_block(block, windows, update=True)


def _run_block(block: nn.Module, windows: list[_Window], update: bool) -> None:
    att = block.attention
    longest = max(w.x.shape[0] for w in windows)
    slots = (-(-longest // BLOCK) + 1) * BLOCK
    # A scratch cache with this block's (possibly pruned) KV heads, at its cache index.
    cache = KVCache(
        att.layer + 1, slots, att.n_kv_heads, att.head_dim, windows[0].x.dtype, windows[0].x.device
    )
    for w in windows:
        y = block(w.x, w.rope, w.meta, cache)
        if update:
            w.x = y


def _embed_windows(model: Transformer, seqs: list[list[int]]) -> list[_Window]:
    """Each sequence embedded, with its RoPE tables and addressing."""
    c = model.config
    device = model.rotary.cos.device
    table = list(range(1, -(-max(len(s) for s in seqs) // BLOCK) + 1))  # block 0: padding
    out = []
    for s in seqs:
        meta = build_attention_metadata([0], [len(s)], [table], BLOCK, c.sliding_window, device)
        x = model.tok_embeddings(torch.tensor(s, device=device))  # (T, C)
        if c.embed_scale != 1.0:
            x = x * torch.tensor(c.embed_scale, dtype=x.dtype)
        rope = {False: model.rotary(meta.positions)}
        rope[True] = model.rotary_local(meta.positions) if model.rotary_local else rope[False]
        out.append(_Window(x, rope, meta))
    return out


def weight_sparsity(w: torch.Tensor) -> float:
    """Fraction of exactly-zero entries of `w`."""
    return float((w == 0).sum()) / max(w.numel(), 1)


def sparsify_model(model: Transformer, min_sparsity: float = SPARSE_MIN_SPARSITY) -> int:
    """Swap every block linear at least `min_sparsity` sparse for a CSR SparseLinear (and back to
    nn.Linear below it); returns the number of sparse layers."""
    count = 0
    for name, mod in list(model.named_modules()):
        if not name.startswith("layers.") or not isinstance(mod, (nn.Linear, SparseLinear)):
            continue
        sparse = weight_sparsity(mod.weight) >= min_sparsity
        if sparse and isinstance(mod, nn.Linear):
            _replace(model, name, SparseLinear.from_linear(mod))
        elif not sparse and isinstance(mod, SparseLinear):
            _replace(model, name, mod.to_linear())
        count += sparse
    if count:
        log.info("%d layers at >= %.0f%% sparsity run on the CSR kernel", count, 100 * min_sparsity)
    return count


# ----------------------------------------------------------------------------- layers


def _prune_layers(model: Transformer, spec: PruneSpec, ctx: TransformContext) -> None:
    n = len(model.layers)
    drop = round(spec.sparsity * n)
    if not 1 <= drop < n:
        raise InvalidRequestError(
            f"prune-layers-{spec.sparsity} removes {drop} of {n} layers; choose a sparsity "
            f"in [{0.5 / n:.3f}, {(n - 0.5) / n:.3f})"
        )
    cal = _calibrate(model, ctx, names=[], hidden_states=True)
    order = st.rank_layers(list(zip(cal.block_inputs, cal.block_outputs)))
    removed = sorted(order[:drop])
    log.info("removing layers %s (lowest block influence)", removed)
    remove_layers(model, removed)


def remove_layers(model: Transformer, removed: list[int]) -> Transformer:
    """Drop the decoder blocks `removed` and renumber the rest (KV-cache index, config)."""
    gone = set(removed)
    kept = [b for i, b in enumerate(model.layers) if i not in gone]
    for i, block in enumerate(kept):
        # A block keeps its own sliding flag (gemma3), which the config's every-n-th-layer
        # pattern may no longer describe; checkpoint.py saves the per-layer flag.
        block.attention.layer = i
    model.layers = nn.ModuleList(kept)
    model.config = dataclasses.replace(model.config, n_layers=len(kept))
    return model


# ----------------------------------------------------------------------------- heads


def head_plan(n_heads: int, n_kv_heads: int, sparsity: float) -> tuple[str, int]:
    """(mode, keep) for `structured.select_heads` removing the fraction of q heads closest to
    `sparsity`: whole GQA groups ("group", keep = KV groups; shrinks the KV cache too) or the
    same number of q heads in every group ("within_group", keep = q heads). Ties go to whole
    groups, which also save KV-cache reads."""
    group = n_heads // n_kv_heads
    cands = [("group", k, 1 - k / n_kv_heads) for k in range(1, n_kv_heads + 1)]
    cands += [("within_group", p * n_kv_heads, 1 - p / group) for p in range(1, group + 1)]
    mode, keep, frac = min(cands, key=lambda c: (abs(c[2] - sparsity), c[0] != "group"))
    if frac == 0:
        options = sorted({round(c[2], 3) for c in cands if c[2] > 0})
        raise InvalidRequestError(
            f"prune-heads-{sparsity} would remove no head of {n_heads} q / {n_kv_heads} KV "
            f"heads; removable fractions: {options}"
        )
    return mode, keep


def gram_head_scores(w_o: torch.Tensor, gram: torch.Tensor, n_heads: int, n_kv: int):
    """`structured.head_scores` from the Gram matrix G = O^T O of wo's input instead of the
    samples O: ||O_h W_h^T||_F^2 = sum(W_h G_hh * W_h)."""
    hd = w_o.shape[1] // n_heads
    group = n_heads // n_kv
    w, g = w_o.detach().double(), gram.double()

    def norm(cols: slice) -> float:
        return float((w[:, cols] @ g[cols, cols] * w[:, cols]).sum().clamp_min(0).sqrt())

    q = torch.tensor([norm(slice(h * hd, (h + 1) * hd)) for h in range(n_heads)])
    kv = torch.tensor([norm(slice(k * group * hd, (k + 1) * group * hd)) for k in range(n_kv)])
    return st.HeadScores(q=q, kv=kv)


def _prune_heads(model: Transformer, spec: PruneSpec, ctx: TransformContext) -> None:
    c = model.config
    mode, keep = head_plan(c.n_heads, c.n_kv_heads, spec.sparsity)

    def prune_block(block: nn.Module, stats: dict[str, LinearStats]) -> None:
        att, gram = block.attention, stats["attention.wo"].gram
        scores = gram_head_scores(att.wo.weight, gram, att.n_heads, att.n_kv_heads)
        remove_heads(att, st.select_heads(scores, keep, mode), gram if spec.recover else None)

    for_each_block(model, ctx, ["attention.wo"], prune_block, gram=True)
    att = model.layers[0].attention
    model.config = dataclasses.replace(c, n_heads=att.n_heads, n_kv_heads=att.n_kv_heads)
    log.info("kept %d q / %d KV heads per layer (%s)", att.n_heads, att.n_kv_heads, mode)


def remove_heads(att: nn.Module, sel: st.HeadSelection, wo_gram: torch.Tensor | None) -> None:
    """Keep heads `sel` of one Attention: rows of wq (q heads) and wk/wv (KV heads), columns of
    wo; with `wo_gram` (Gram matrix of wo's input) wo is refit by least squares."""
    q_idx = st.head_dim_indices(sel.q_heads, att.head_dim)
    kv_idx = st.head_dim_indices(sel.kv_heads, att.head_dim)
    att.wq = _sliced_rows(att.wq, q_idx)
    att.wk = _sliced_rows(att.wk, kv_idx)
    att.wv = _sliced_rows(att.wv, kv_idx)
    if wo_gram is not None:
        w_o = st.least_squares_correction_from_gram(att.wo.weight, wo_gram, q_idx, RECOVERY_DAMP)
    else:
        w_o = st.slice_linear_cols(att.wo.weight, q_idx)
    att.wo = _linear(w_o, att.wo.bias)
    att.n_heads, att.n_kv_heads = sel.n_heads, sel.n_kv_heads


# ----------------------------------------------------------------------------- MLP channels


def _prune_channels(model: Transformer, spec: PruneSpec, ctx: TransformContext) -> None:
    f = model.config.intermediate_size
    keep = f - round(spec.sparsity * f)
    if not 1 <= keep < f:
        raise InvalidRequestError(f"prune-channels-{spec.sparsity} keeps {keep} of {f} channels")

    def prune_block(block: nn.Module, stats: dict[str, LinearStats]) -> None:
        s, mlp = stats["feed_forward.w_down"], block.feed_forward
        # ||act_j||_2 over the calibration tokens is sqrt(sq_norm_j): a one-row "sample".
        scores = st.mlp_channel_scores(mlp.w_down.weight, s.input_norm().unsqueeze(0))
        remove_channels(mlp, st.select_channels(scores, keep), s.gram if spec.recover else None)

    for_each_block(model, ctx, ["feed_forward.w_down"], prune_block, gram=spec.recover)
    model.config = dataclasses.replace(model.config, intermediate_size=keep)
    log.info("kept %d of %d MLP channels per layer", keep, f)


def remove_channels(mlp: nn.Module, idx: torch.Tensor, down_gram: torch.Tensor | None) -> None:
    """Keep intermediate channels `idx` of one GatedMLP; refit w_down when `down_gram` is given."""
    mlp.w_gate = _sliced_rows(mlp.w_gate, idx)
    mlp.w_up = _sliced_rows(mlp.w_up, idx)
    if down_gram is not None:
        w_down = st.least_squares_correction_from_gram(
            mlp.w_down.weight, down_gram, idx, RECOVERY_DAMP
        )
    else:
        w_down = st.slice_linear_cols(mlp.w_down.weight, idx)
    mlp.w_down = _linear(w_down, mlp.w_down.bias)


# ----------------------------------------------------------------------------- helpers


def _calibrate(
    model: Transformer,
    ctx: TransformContext,
    names: list[str],
    gram: bool = False,
    hidden_states: bool = False,
) -> Calibration:
    cfg = dataclasses.replace(
        ctx.calibration, gram=gram, hidden_states=hidden_states, sample_rows=0
    )
    windows = calibration_windows(ctx.tokenizer, cfg)
    return calibrate(model, windows, cfg, names=names, progress=ctx.progress)


def _block_linears(model: Transformer) -> list[tuple[str, nn.Linear]]:
    return [
        (n, m)
        for n, m in model.named_modules()
        if n.startswith("layers.") and isinstance(m, nn.Linear)
    ]


def _set_weight(lin: nn.Linear, w: torch.Tensor) -> None:
    lin.weight = nn.Parameter(w.to(lin.weight.dtype).contiguous(), requires_grad=False)


def _linear(w: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An nn.Linear holding `w (out, in)` and `bias` (no random init)."""
    lin = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(w.detach().clone().contiguous(), requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    return lin


def _sliced_rows(lin: nn.Linear, idx: torch.Tensor) -> nn.Linear:
    bias = None if lin.bias is None else st.slice_linear_rows(lin.bias, idx)
    return _linear(st.slice_linear_rows(lin.weight, idx), bias)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    owner, _, attr = name.rpartition(".")
    setattr(model.get_submodule(owner), attr, new)


@contextlib.contextmanager
def _one_thread():
    """SparseGPT's column loop is thousands of tiny ops per matrix: on 2 shared cores a second
    intra-op thread makes it ~10x slower (measured 1.5 s vs 20 s for a 1536x576 weight)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _progress(items: list, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="layer", leave=False)
