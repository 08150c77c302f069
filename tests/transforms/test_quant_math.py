"""Quantization numerics against float references: hand-worked codes for each convention, round
trips within the documented bounds (hypothesis), the W8A8 integer matmul against float matmul,
and the int8 KV cache."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from miaotui.transforms import quant_math as qm

SETTINGS = settings(max_examples=60, deadline=None)


def _weight(seed: int, m: int, k: int, magnitude: float, zero_group: int | None, g: int):
    w = torch.randn(m, k, generator=torch.Generator().manual_seed(seed)) * magnitude
    if zero_group is not None:
        w[m // 2, zero_group * g : (zero_group + 1) * g] = 0  # an all-zero group
    return w


def _expand(t: torch.Tensor, k: int) -> torch.Tensor:
    """(M, ng) per-group values -> (M, K) per-element."""
    return t.repeat_interleave(k // t.shape[1], dim=1)


def _assert_within_half_step(w, deq, scale, w_range):
    """|w - deq| <= scale / 2, plus float32 rounding relative to the group's value range."""
    k = w.shape[1]
    bound = _expand(scale, k) / 2 + 1e-6 * _expand(w_range, k)
    err = (w - deq).abs()
    assert torch.isfinite(deq).all()
    assert (err <= bound).all(), f"max excess {(err - bound).max().item()}"


# Hand-worked examples: the value conventions the kernels rely on.


def test_int8_convention_by_hand():
    w = torch.tensor([[127.0, -63.5, 0.4, -127.0], [0.0, 0.0, 0.0, 0.0]])
    q, scale = qm.quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (2, 1)
    assert scale.tolist() == [[1.0], [0.0]]
    assert q.tolist() == [[127, -64, 0, -127], [0, 0, 0, 0]]  # -63.5 rounds half to even
    assert torch.equal(qm.dequantize_int8(q, scale), torch.tensor([[127.0, -64, 0, -127], [0] * 4]))


def test_int4_symmetric_convention_by_hand():
    w = torch.tensor([[7.5, -7.5, 1.0, -3.2] * 8])  # one group of 32, absmax 7.5 -> scale 1
    q, scale, offset = qm.quantize_int4(w, group_size=32, symmetric=True)
    assert offset is None and q.dtype == torch.uint8
    assert scale.tolist() == [[1.0]]
    # value = (q - 8) * scale: 7.5 clamps to code 15 (7), -7.5 rounds to code 0 (-8)
    assert q[0, :4].tolist() == [15, 0, 9, 5]
    assert qm.dequantize_int4(q, scale)[0, :4].tolist() == [7.0, -8.0, 1.0, -3.0]


def test_int4_asymmetric_convention_by_hand():
    w = torch.tensor([[1.0, 16.0, 2.4, 9.0] * 8])  # min 1, max 16 -> scale 1, offset 1
    q, scale, offset = qm.quantize_int4(w, group_size=32, symmetric=False)
    assert scale.tolist() == [[1.0]] and offset.tolist() == [[1.0]]
    assert q[0, :4].tolist() == [0, 15, 1, 8]  # value = q * scale + offset
    assert qm.dequantize_int4(q, scale, offset)[0, :4].tolist() == [1.0, 16.0, 2.0, 9.0]


# Round trips within the documented bounds.


@SETTINGS
@given(
    seed=st.integers(0, 2**31 - 1),
    m=st.integers(1, 17),
    n_groups=st.integers(1, 4),
    group_size=st.sampled_from([None, 16, 32, 64]),
    magnitude=st.sampled_from([1e-3, 1.0, 300.0]),
    zero_group=st.booleans(),
)
def test_int8_round_trip(seed, m, n_groups, group_size, magnitude, zero_group):
    k = n_groups * (group_size or 48)
    g = group_size or k  # None: one group per row
    w = _weight(seed, m, k, magnitude, 0 if zero_group else None, g)
    q, scale = qm.quantize_int8(w, group_size)
    assert q.dtype == torch.int8 and q.shape == (m, k)
    assert scale.dtype == torch.float32 and scale.shape == (m, k // g) and scale.is_contiguous()
    assert q.min() >= -127
    absmax = w.reshape(m, k // g, g).abs().amax(-1)
    torch.testing.assert_close(scale, absmax / 127)
    _assert_within_half_step(w, qm.dequantize_int8(q, scale), scale, absmax)


@SETTINGS
@given(
    seed=st.integers(0, 2**31 - 1),
    m=st.integers(1, 17),
    n_groups=st.integers(1, 4),
    group_size=st.sampled_from([32, 64, 128]),
    symmetric=st.booleans(),
    magnitude=st.sampled_from([1e-3, 1.0, 300.0]),
    zero_group=st.booleans(),
    shift=st.sampled_from([0.0, 2.0]),
)
def test_int4_round_trip(seed, m, n_groups, group_size, symmetric, magnitude, zero_group, shift):
    k = n_groups * group_size
    w = _weight(seed, m, k, magnitude, 0 if zero_group else None, group_size)
    w = w + shift * magnitude  # off-centre groups, where the asymmetric offset matters
    q, scale, offset = qm.quantize_int4(w, group_size=group_size, symmetric=symmetric)
    assert q.dtype == torch.uint8 and q.shape == (m, k) and q.max() <= 15
    assert scale.shape == (m, k // group_size) and scale.is_contiguous()
    wg = w.reshape(m, k // group_size, group_size)
    if symmetric:
        assert offset is None
        w_range = wg.abs().amax(-1)
    else:
        assert offset.shape == scale.shape
        torch.testing.assert_close(offset, wg.amin(-1))
        w_range = wg.amax(-1) - wg.amin(-1) + wg.abs().amax(-1)
    _assert_within_half_step(w, qm.dequantize_int4(q, scale, offset), scale, w_range)
    # the stated closed-form bounds: absmax / 15 (symmetric), (max - min) / 30 (asymmetric)
    expected = wg.abs().amax(-1) / 7.5 if symmetric else (wg.amax(-1) - wg.amin(-1)) / 15
    torch.testing.assert_close(scale, expected)


@pytest.mark.parametrize("symmetric", [True, False])
def test_zero_and_constant_groups(symmetric):
    """No NaN; zero groups decode to exact zeros; asymmetric decodes constant groups exactly."""
    w = torch.zeros(3, 64)
    w[1, :32] = 0.25
    w[2, 32:] = -4.0
    q, scale, offset = qm.quantize_int4(w, group_size=32, symmetric=symmetric)
    deq = qm.dequantize_int4(q, scale, offset)
    assert torch.isfinite(scale).all() and torch.isfinite(deq).all()
    assert torch.equal(deq[0], w[0])
    if not symmetric:
        assert torch.equal(deq, w)
    q8, s8 = qm.quantize_int8(torch.zeros(2, 32))
    assert torch.equal(qm.dequantize_int8(q8, s8), torch.zeros(2, 32))


def test_bad_group_size_and_bits_raise():
    w = torch.randn(4, 96)
    with pytest.raises(ValueError, match="group_size=64 does not divide K=96"):
        qm.quantize_int4(w, group_size=64)
    with pytest.raises(ValueError, match="group_size=0"):
        qm.quantize_int8(w, group_size=0)
    with pytest.raises(ValueError, match="bits=3"):
        qm.quantize_weight(w, 3, 32, True)
    with pytest.raises(ValueError, match="symmetric"):
        qm.quantize_weight(w, 8, 32, False)


@SETTINGS
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 9),
    k=st.integers(1, 70),
    magnitude=st.sampled_from([1e-3, 1.0, 300.0]),
)
def test_per_token_int8_round_trip(seed, n, k, magnitude):
    x = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * magnitude
    x[0] = 0  # an all-zero token
    xq, x_scale = qm.quantize_per_token_int8(x)
    assert xq.dtype == torch.int8 and x_scale.shape == (n, 1)
    err = (x - xq.float() * x_scale).abs()
    assert (err <= x_scale / 2 + 1e-6 * x.abs().amax(-1, keepdim=True)).all()
    assert torch.equal(xq[0], torch.zeros(k, dtype=torch.int8))


# W8A8: integer matmul against float matmul.


def _w8a8_bound(x, w, x_scale, w_scale):
    """The docstring's bound: rounding errors of both operands carried through the dot product."""
    e_x = x_scale.double() / 2
    e_w = _expand(w_scale, w.shape[1]).double() / 2
    x, w = x.double(), w.double()
    return x.abs() @ e_w.t() + e_x * (w.abs() + e_w).sum(1)[None, :]


@SETTINGS
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 20),
    m=st.integers(1, 20),
    n_groups=st.integers(1, 3),
    grouped=st.booleans(),
)
def test_int8_matmul_against_float(seed, n, m, n_groups, grouped):
    gen = torch.Generator().manual_seed(seed)
    k = 32 * n_groups
    x = torch.randn(n, k, generator=gen)
    x[:, 0] *= 30  # an outlier channel
    w = torch.randn(m, k, generator=gen)
    xq, x_scale = qm.quantize_per_token_int8(x)
    wq, w_scale = qm.quantize_int8(w, 32 if grouped else None)
    y = qm.int8_matmul(xq, x_scale, wq, w_scale)
    assert y.dtype == torch.float32 and y.shape == (n, m)
    # 1. equals the float64 product of the dequantized operands (integer part is exact)
    x_deq = xq.double() * x_scale.double()
    w_deq = _expand(w_scale, k).double() * wq.double()
    torch.testing.assert_close(y.double(), x_deq @ w_deq.t(), rtol=1e-5, atol=1e-5)
    # 2. is within the stated bound of the unquantized float product
    ref = x.double() @ w.double().t()
    slack = 1e-5 * (x.double().abs() @ w.double().abs().t())
    assert ((y.double() - ref).abs() <= _w8a8_bound(x, w, x_scale, w_scale) + slack).all()


@pytest.mark.parametrize("x_code,w_code", [(127, 127), (127, -127), (-127, -127)])
def test_int8_matmul_extreme_codes_do_not_saturate(x_code, w_code):
    """Full-scale codes on a real shape (AVX2 int8 dot products can saturate int16 pairs)."""
    n, k, m = 33, 576, 40
    xq = torch.full((n, k), x_code, dtype=torch.int8)
    wq = torch.full((m, k), w_code, dtype=torch.int8)
    wq[::2, ::3] = -w_code
    y = qm.int8_matmul(xq, torch.ones(n, 1), wq, torch.ones(m, 1))
    assert torch.equal(y.double(), xq.double() @ wq.double().t())


def test_int8_matmul_fallback_without_int_mm(monkeypatch):
    """When torch._int_mm refuses the shape (CUDA limits), the float64 fallback is still exact."""

    def refuse(a, b):
        raise RuntimeError("unsupported shape")

    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(5, 64, generator=gen), torch.randn(7, 64, generator=gen)
    xq, x_scale = qm.quantize_per_token_int8(x)
    wq, w_scale = qm.quantize_int8(w)
    expected = (xq.double() * x_scale.double()) @ (wq.double() * w_scale.double()).t()
    monkeypatch.setattr(torch, "_int_mm", refuse)
    torch.testing.assert_close(qm.int8_matmul(xq, x_scale, wq, w_scale).double(), expected)


def test_w8a8_linear_keeps_leading_dims_and_dtype():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 64, generator=gen, dtype=torch.float64)
    w = torch.randn(10, 64, generator=gen)
    wq, w_scale = qm.quantize_int8(w)
    y = qm.w8a8_linear(x, wq, w_scale)
    assert y.shape == (2, 3, 10) and y.dtype == torch.float64
    ref = x @ w.double().t()
    assert ((y - ref).abs().max() / ref.abs().max()).item() < 0.02


# KV cache.


@SETTINGS
@given(
    seed=st.integers(0, 2**31 - 1),
    lead=st.lists(st.integers(1, 5), min_size=1, max_size=2),
    kvh=st.integers(1, 4),
    d=st.sampled_from([8, 64]),
)
def test_kv_int8_round_trip(seed, lead, kvh, d):
    x = torch.randn(*lead, kvh, d, generator=torch.Generator().manual_seed(seed)) * 3
    x[..., 0, :] = 0  # a head whose values are all zero
    q, scale = qm.quantize_kv_int8(x)
    assert q.dtype == torch.int8 and q.shape == x.shape and scale.shape == (*lead, kvh, 1)
    deq = qm.dequantize_kv_int8(q, scale, dtype=torch.float32)
    torch.testing.assert_close(scale, x.abs().amax(-1, keepdim=True) / 127)
    assert ((x - deq).abs() <= scale / 2 + 1e-6 * x.abs().amax(-1, keepdim=True)).all()
    assert qm.dequantize_kv_int8(q, scale, dtype=torch.bfloat16).dtype == torch.bfloat16
