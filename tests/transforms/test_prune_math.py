"""Pruning numerics: exact masks, Wanda / SparseGPT vs magnitude, structured pruning math."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from miaotui.transforms.prune_math import (
    apply_mask,
    input_norms,
    magnitude_scores,
    n_pruned,
    nm_mask,
    unstructured_mask,
    wanda_scores,
)
from miaotui.transforms.sparsegpt import hessian_from_inputs, sparsegpt_prune
from miaotui.transforms.structured import (
    HeadScores,
    best_layer_span,
    block_influence,
    head_dim_indices,
    head_scores,
    least_squares_correction,
    least_squares_correction_from_gram,
    mlp_channel_scores,
    rank_layers,
    select_channels,
    select_heads,
    slice_linear_cols,
    slice_linear_rows,
)

FAST = settings(max_examples=40, deadline=None)


def correlated_layer(seed: int = 0, n: int = 512, m_out: int = 64, k_in: int = 256):
    """w (M, K) and inputs x (n, K) = z @ A + noise, with a few outlier channels (x10)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 32, generator=g)
    a = torch.randn(32, k_in, generator=g)
    x = z @ a / 6 + 0.5 * torch.randn(n, k_in, generator=g)
    outliers = torch.randperm(k_in, generator=g)[:12]
    x[:, outliers] *= 10
    w = torch.randn(m_out, k_in, generator=g)
    return w, x


def out_err(w: torch.Tensor, w_hat: torch.Tensor, x: torch.Tensor) -> float:
    return float(torch.linalg.norm(w @ x.T - w_hat @ x.T))


# ----------------------------------------------------------------------------- scores


def test_scores():
    w, x = correlated_layer()
    assert torch.equal(magnitude_scores(w), w.abs())
    norms = input_norms(x)
    assert torch.allclose(norms, x.pow(2).sum(0).sqrt())
    assert torch.allclose(input_norms(x.reshape(8, 64, -1)), norms)
    assert torch.allclose(wanda_scores(w, norms), w.abs() * norms[None, :])
    with pytest.raises(ValueError):
        wanda_scores(w, norms[:-1])


# ----------------------------------------------------------------------------- masks


@FAST
@given(
    rows=st.integers(1, 9),
    cols=st.integers(1, 40),
    sparsity=st.floats(0.0, 1.0),
    per_row=st.booleans(),
    seed=st.integers(0, 2**16),
    ties=st.booleans(),
)
def test_unstructured_mask_exact_count(rows, cols, sparsity, per_row, seed, ties):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(rows, cols, generator=g)
    if ties:  # few distinct values: lots of ties
        scores = scores.round()
    mask = unstructured_mask(scores, sparsity, per_row=per_row)
    assert mask.dtype == torch.bool and mask.shape == scores.shape
    if per_row:
        zeros = (~mask).sum(dim=1)
        assert (zeros == round(sparsity * cols)).all()
        for r in range(rows):  # kept scores dominate pruned ones within the row
            if mask[r].any() and (~mask[r]).any():
                assert scores[r][mask[r]].min() >= scores[r][~mask[r]].max()
    else:
        assert int((~mask).sum()) == round(sparsity * rows * cols)
        if mask.any() and (~mask).any():
            assert scores[mask].min() >= scores[~mask].max()
    assert torch.equal(mask, unstructured_mask(scores, sparsity, per_row=per_row))


def test_mask_ties_deterministic():
    scores = torch.ones(2, 8)
    mask = unstructured_mask(scores, 0.5, per_row=True)
    # Among equal scores the lower index is kept.
    assert mask[:, :4].all() and not mask[:, 4:].any()
    layer = unstructured_mask(scores, 0.25)
    assert layer.flatten()[:12].all() and not layer.flatten()[12:].any()
    nm = nm_mask(torch.zeros(1, 8), 2, 4)
    assert nm.tolist() == [[True, True, False, False, True, True, False, False]]


def test_mask_rejects_bad_sparsity():
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError):
            unstructured_mask(torch.randn(4, 4), bad)
    assert n_pruned(10, 0.25) == round(2.5)


@FAST
@given(
    rows=st.integers(1, 6),
    groups=st.integers(1, 10),
    nm=st.sampled_from([(2, 4), (1, 4), (4, 8), (0, 2), (3, 3)]),
    seed=st.integers(0, 2**16),
)
def test_nm_mask_pattern(rows, groups, nm, seed):
    n, m = nm
    scores = torch.randn(rows, groups * m, generator=torch.Generator().manual_seed(seed))
    mask = nm_mask(scores, n, m)
    g = mask.reshape(rows, groups, m)
    assert (g.sum(-1) == n).all()
    s = scores.reshape(rows, groups, m)
    kept = torch.where(g, s, torch.tensor(math.inf)).amin(-1)
    pruned = torch.where(~g, s, torch.tensor(-math.inf)).amax(-1)
    assert (kept >= pruned).all()


def test_nm_mask_errors():
    with pytest.raises(ValueError, match="multiple"):
        nm_mask(torch.randn(4, 10), 2, 4)
    with pytest.raises(ValueError):
        nm_mask(torch.randn(4, 8), 5, 4)


def test_apply_mask_exact_zeros():
    w = torch.tensor([[1.5, -2.0, float("nan"), -0.5], [float("inf"), 3.0, -1.0, 2.0]])
    mask = torch.tensor([[True, False, False, True], [False, True, True, False]])
    out = apply_mask(w, mask)
    assert (out[~mask] == 0).all() and not torch.signbit(out[~mask]).any()
    assert torch.equal(out[mask], w[mask])
    assert out.dtype == w.dtype and w[0, 1] == -2.0  # input untouched
    with pytest.raises(ValueError):
        apply_mask(w, mask.float())


def test_pruned_weights_are_zero_bf16():
    w, x = correlated_layer()
    wb = w.bfloat16()
    mask = unstructured_mask(wanda_scores(wb, input_norms(x)), 0.7, per_row=True)
    out = apply_mask(wb, mask)
    assert out.dtype == torch.bfloat16
    assert int((out == 0).sum()) == int((~mask).sum()) == 64 * round(0.7 * 256)


# ----------------------------------------------------------------------------- quality


@pytest.mark.parametrize("seed", [0, 1])
def test_wanda_and_sparsegpt_beat_magnitude_unstructured(seed):
    w, x = correlated_layer(seed)
    mag = apply_mask(w, unstructured_mask(magnitude_scores(w), 0.5))
    wanda = apply_mask(w, unstructured_mask(wanda_scores(w, input_norms(x)), 0.5, per_row=True))
    sgpt, mask = sparsegpt_prune(w, hessian_from_inputs(x), 0.5, block_size=64)
    e_mag, e_wanda, e_sgpt = out_err(w, mag, x), out_err(w, wanda, x), out_err(w, sgpt, x)
    assert e_wanda < 0.8 * e_mag
    assert e_sgpt < 0.8 * e_mag
    assert e_sgpt < e_wanda  # the OBS update helps on top of a good mask
    assert int((~mask).sum()) == w.numel() // 2


@pytest.mark.parametrize("seed", [0, 1])
def test_wanda_and_sparsegpt_beat_magnitude_2_4(seed):
    w, x = correlated_layer(seed)
    mag = apply_mask(w, nm_mask(magnitude_scores(w), 2, 4))
    wanda = apply_mask(w, nm_mask(wanda_scores(w, input_norms(x)), 2, 4))
    sgpt, mask = sparsegpt_prune(w, hessian_from_inputs(x), nm=(2, 4), block_size=64)
    e_mag, e_wanda, e_sgpt = out_err(w, mag, x), out_err(w, wanda, x), out_err(w, sgpt, x)
    assert e_wanda < 0.8 * e_mag
    assert e_sgpt < 0.8 * e_mag
    assert (mask.reshape(64, -1, 4).sum(-1) == 2).all()
    assert ((sgpt == 0) | mask).all() and (sgpt[~mask] == 0).all()


# ----------------------------------------------------------------------------- SparseGPT


@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.77])
def test_sparsegpt_exact_sparsity(per_row, sparsity):
    w, x = correlated_layer(2, n=256, m_out=24, k_in=100)
    out, mask = sparsegpt_prune(w, hessian_from_inputs(x), sparsity, block_size=32, per_row=per_row)
    assert out.shape == w.shape and out.dtype == w.dtype and mask.dtype == torch.bool
    assert (out[~mask] == 0).all()
    if per_row:
        assert ((~mask).sum(1) == round(sparsity * 100)).all()
    else:
        assert int((~mask).sum()) == round(sparsity * w.numel())
    # Every 32-column block is within one weight (per row: per row) of the target.
    for c in range(0, 100, 32):
        blk = ~mask[:, c : c + 32]
        cnt = blk.sum(1) if per_row else blk.sum()
        target = sparsity * blk.shape[1] * (1 if per_row else blk.shape[0])
        assert (cnt - target).abs().max() <= 1


def test_sparsegpt_nm_and_dtype():
    w, x = correlated_layer(3, n=256, m_out=16, k_in=64)
    out, mask = sparsegpt_prune(w.bfloat16(), hessian_from_inputs(x), nm=(1, 4), block_size=16)
    assert out.dtype == torch.bfloat16
    assert (mask.reshape(16, -1, 4).sum(-1) == 1).all()
    assert (out[~mask] == 0).all()


def test_sparsegpt_lazy_block_updates_match_unblocked():
    """Blocking only defers the OBS updates of later columns: for N:M (mask chosen per group
    of m columns either way) any block size gives the same result as one block."""
    w, x = correlated_layer(6, n=256, m_out=16, k_in=64)
    h = hessian_from_inputs(x)
    ref, ref_mask = sparsegpt_prune(w, h, nm=(2, 4), block_size=64)
    for bs in (4, 8, 24):
        out, mask = sparsegpt_prune(w, h, nm=(2, 4), block_size=bs)
        assert torch.equal(mask, ref_mask)
        assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)


def test_sparsegpt_zero_sparsity_is_identity():
    w, x = correlated_layer(4, n=128, m_out=8, k_in=32)
    out, mask = sparsegpt_prune(w, hessian_from_inputs(x), 0.0)
    assert mask.all() and torch.equal(out, w)


def test_sparsegpt_dead_inputs_and_errors():
    w, x = correlated_layer(5, n=128, m_out=8, k_in=32)
    x[:, :5] = 0  # inputs never active: their weights are free to go
    out, mask = sparsegpt_prune(w, hessian_from_inputs(x), 0.25, block_size=8)
    assert int((~mask).sum()) == 64 and torch.isfinite(out).all()
    assert (out[:, :5] == 0).all()
    h = hessian_from_inputs(x)
    with pytest.raises(ValueError):
        sparsegpt_prune(w, h[:-1, :-1], 0.5)
    with pytest.raises(ValueError):
        sparsegpt_prune(w, h, nm=(2, 4), block_size=6)
    with pytest.raises(ValueError):
        sparsegpt_prune(w[:, :30], h[:30, :30], nm=(2, 4))
    with pytest.raises(ValueError):
        sparsegpt_prune(w, h, 1.2)


# ----------------------------------------------------------------------------- layers


def test_block_influence():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(32, 16, generator=g)
    assert block_influence(h, h) == pytest.approx(0.0, abs=1e-9)
    assert block_influence(h, 3 * h, "angular") == pytest.approx(0.0, abs=1e-6)
    assert block_influence(h, -h) == pytest.approx(2.0)
    assert block_influence(h, -h, "angular") == pytest.approx(1.0)
    e = torch.eye(2)
    assert block_influence(e[:1], e[1:]) == pytest.approx(1.0)
    assert block_influence(e[:1], e[1:], "angular") == pytest.approx(0.5)
    with pytest.raises(ValueError):
        block_influence(h, h, "l2")


def test_rank_layers_and_best_span():
    g = torch.Generator().manual_seed(1)
    h0 = torch.randn(64, 32, generator=g)
    # Residual stream: layers 1 and 2 barely change it, 0 and 3 a lot.
    deltas = [1.0, 0.01, 0.02, 1.5]
    hidden = [h0]
    for d in deltas:
        hidden.append(hidden[-1] + d * torch.randn(64, 32, generator=g))
    pairs = list(zip(hidden[:-1], hidden[1:], strict=True))
    assert rank_layers(pairs) == [1, 2, 0, 3]
    assert rank_layers(pairs, "angular")[:2] == [1, 2]
    start, dist = best_layer_span(hidden, 2)
    assert start == 1 and 0 <= dist < 0.05
    with pytest.raises(ValueError):
        best_layer_span(hidden, 5)


# ----------------------------------------------------------------------------- channels


def test_mlp_channel_scores_and_select():
    g = torch.Generator().manual_seed(0)
    w_down = torch.randn(16, 40, generator=g)
    act = torch.randn(100, 40, generator=g)
    s = mlp_channel_scores(w_down, act)
    assert torch.allclose(s, act.norm(dim=0) * w_down.norm(dim=0))
    keep = select_channels(s, 10)
    assert keep.dtype == torch.long and torch.equal(keep, keep.sort().values)
    assert set(keep.tolist()) == set(torch.topk(s, 10).indices.tolist())
    assert select_channels(torch.ones(6), 3).tolist() == [0, 1, 2]
    with pytest.raises(ValueError):
        select_channels(s, 41)


def test_slicing_equals_zeroing_channels():
    """Removing MLP channels by slicing == zeroing them in the full MLP."""
    g = torch.Generator().manual_seed(0)
    c, f = 24, 64
    w_gate, w_up = torch.randn(f, c, generator=g), torch.randn(f, c, generator=g)
    w_down = torch.randn(c, f, generator=g)
    x = torch.randn(50, c, generator=g)
    keep = select_channels(torch.rand(f, generator=g), 40)
    act = torch.nn.functional.silu(x @ w_gate.T) * (x @ w_up.T)
    zeroed = torch.zeros(f)
    zeroed[keep] = 1
    ref = (act * zeroed) @ w_down.T
    act_k = torch.nn.functional.silu(x @ slice_linear_rows(w_gate, keep).T) * (
        x @ slice_linear_rows(w_up, keep).T
    )
    out = act_k @ slice_linear_cols(w_down, keep).T
    assert torch.allclose(out, ref, atol=1e-5)
    assert slice_linear_rows(torch.arange(5.0), torch.tensor([1, 3])).tolist() == [1.0, 3.0]


def correlated_acts(seed: int, n: int = 512, f: int = 96, rank: int = 48):
    g = torch.Generator().manual_seed(seed)
    act = torch.randn(n, rank, generator=g) @ torch.randn(rank, f, generator=g)
    act = act + 0.1 * torch.randn(n, f, generator=g)
    w_next = torch.randn(32, f, generator=g)
    return w_next, act


def lsq_err(w_next, act, keep, w_new):
    return float(torch.linalg.norm(act[:, keep] @ w_new.T - act @ w_next.T))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_least_squares_correction_reduces_error(seed):
    w_next, act_all = correlated_acts(seed, n=1024)
    act, held = act_all[:512], act_all[512:]  # fit on calibration, check on held-out tokens
    keep = select_channels(mlp_channel_scores(w_next, act), 64)
    plain = slice_linear_cols(w_next, keep)
    fixed = least_squares_correction(w_next, act, keep)
    assert fixed.shape == plain.shape and fixed.dtype == w_next.dtype
    e_plain, e_fixed = lsq_err(w_next, act, keep, plain), lsq_err(w_next, act, keep, fixed)
    assert e_fixed < 0.5 * e_plain  # the kept channels span most of what was removed
    assert lsq_err(w_next, held, keep, fixed) < 0.5 * lsq_err(w_next, held, keep, plain)
    gram = act.double().T @ act.double()
    assert torch.allclose(least_squares_correction_from_gram(w_next, gram, keep), fixed)


@FAST
@given(
    seed=st.integers(0, 2**16),
    keep=st.integers(1, 20),
    damp=st.sampled_from([0.0, 1e-3, 1e-1, 10.0]),
)
def test_least_squares_correction_never_worse(seed, keep, damp):
    g = torch.Generator().manual_seed(seed)
    f = 20
    act = torch.randn(30, f, generator=g) * torch.rand(f, generator=g) * 3
    w_next = torch.randn(7, f, generator=g)
    idx = torch.sort(torch.randperm(f, generator=g)[:keep]).values
    fixed = least_squares_correction(w_next, act, idx, damp=damp)
    e_plain = lsq_err(w_next, act, idx, slice_linear_cols(w_next, idx))
    assert lsq_err(w_next, act, idx, fixed) <= e_plain * (1 + 1e-5) + 1e-5


def test_least_squares_keep_all_is_identity():
    w_next, act = correlated_acts(3, f=32, rank=32)
    out = least_squares_correction(w_next, act, torch.arange(32))
    assert torch.allclose(out, w_next, atol=1e-4)


# ----------------------------------------------------------------------------- heads


def gqa_layer(seed=0, n_heads=9, n_kv=3, hd=8, c=32, n=64, weak_group=None, weak_heads=()):
    g = torch.Generator().manual_seed(seed)
    attn = torch.randn(n, n_heads * hd, generator=g)
    if weak_group is not None:
        grp = n_heads // n_kv
        attn[:, weak_group * grp * hd : (weak_group + 1) * grp * hd] *= 0.01
    for h in weak_heads:
        attn[:, h * hd : (h + 1) * hd] *= 0.01
    w_o = torch.randn(c, n_heads * hd, generator=g)
    return w_o, attn


def test_head_scores_values():
    w_o, attn = gqa_layer()
    s = head_scores(w_o, attn, n_heads=9, n_kv_heads=3)
    assert s.q.shape == (9,) and s.kv.shape == (3,)
    h = 4
    ref = torch.linalg.norm(attn[:, h * 8 : (h + 1) * 8] @ w_o[:, h * 8 : (h + 1) * 8].T)
    assert s.q[h] == pytest.approx(float(ref), rel=1e-5)
    grp = attn[:, 24:48] @ w_o[:, 24:48].T
    assert s.kv[1] == pytest.approx(float(torch.linalg.norm(grp)), rel=1e-5)
    with pytest.raises(ValueError):
        head_scores(w_o, attn, n_heads=9, n_kv_heads=2)


def _assert_consistent(sel, n_heads, n_kv):
    group = n_heads // n_kv
    q, kv = sel.q_heads, sel.kv_heads
    assert torch.equal(q, q.sort().values) and torch.equal(kv, kv.sort().values)
    assert sel.n_heads % sel.n_kv_heads == 0
    new_group = sel.n_heads // sel.n_kv_heads
    # The pruned model's mapping q head i -> kv head i // new_group points at the KV head the
    # q head used in the original model.
    for i, h in enumerate(q.tolist()):
        assert h // group == kv[i // new_group]


def test_select_heads_whole_groups():
    w_o, attn = gqa_layer(weak_group=1)
    s = head_scores(w_o, attn, 9, 3)
    sel = select_heads(s, keep=2, mode="group")
    assert sel.kv_heads.tolist() == [0, 2]
    assert sel.q_heads.tolist() == [0, 1, 2, 6, 7, 8]
    _assert_consistent(sel, 9, 3)
    cols = head_dim_indices(sel.q_heads, 8)
    assert cols.tolist() == list(range(0, 24)) + list(range(48, 72))


def test_select_heads_within_groups():
    w_o, attn = gqa_layer(weak_heads=(1, 3, 8))
    s = head_scores(w_o, attn, 9, 3)
    sel = select_heads(s, keep=6, mode="within_group")
    assert sel.kv_heads.tolist() == [0, 1, 2]
    assert sel.q_heads.tolist() == [0, 2, 4, 5, 6, 7]
    _assert_consistent(sel, 9, 3)
    with pytest.raises(ValueError):
        select_heads(s, keep=5, mode="within_group")  # would leave uneven groups
    with pytest.raises(ValueError):
        select_heads(s, keep=0, mode="group")


@FAST
@given(
    n_kv=st.integers(1, 4),
    group=st.integers(1, 4),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_select_heads_consistent_property(n_kv, group, seed, data):
    n_heads = n_kv * group
    g = torch.Generator().manual_seed(seed)
    s = HeadScores(q=torch.rand(n_heads, generator=g), kv=torch.rand(n_kv, generator=g))
    keep_g = data.draw(st.integers(1, n_kv))
    _assert_consistent(select_heads(s, keep_g, "group"), n_heads, n_kv)
    keep_q = n_kv * data.draw(st.integers(1, group))
    _assert_consistent(select_heads(s, keep_q, "within_group"), n_heads, n_kv)
