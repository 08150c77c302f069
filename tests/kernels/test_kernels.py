"""Quantized linear kernels vs an independent float reference.

Every compiled path (rows, tiles, gemm) is checked three ways against a float weight built here
from the integer codes (not from the packing code under test):
1. the documented numerics: y == x_hat @ W^T + bias up to fp32 rounding, x_hat being the int8
   per-32-block quantized activations (integer paths) or x itself (gemm path);
2. the rigorous activation-rounding bound |y - x @ W^T| <= sum_k |W| * d_b / 2 per element;
3. the relative error of the whole output: ~0.5 % expected for Gaussian x (rounding step
   amax/127 with amax ~ 2.2 sigma over 32 values, RMS step/sqrt(12)), asserted <= 1e-2.
"""

from __future__ import annotations

import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from miaotui.kernels import (
    PackedInt8,
    dequantize_packed,
    kernels_available,
    linear_int4,
    linear_int8,
    load_kernels,
    pack_int4,
    pack_int8,
)
from miaotui.kernels.build import cpu_supports_kernels
from miaotui.kernels.ops import _compiled_ops
from miaotui.kernels.reference import (
    activation_error_bound,
    dequantize_activations,
    quantize_activations,
    unpack_int4_codes,
)

COMPILED_PATHS = ["rows", "tiles", "gemm", None]  # None: the path chosen by N
REL_TOL = 1e-2  # output-norm tolerance from the int8 activation rounding (~0.5 % expected)


def _w_int8(q: torch.Tensor, scale: torch.Tensor, g: int) -> torch.Tensor:
    return q.double() * scale.double().repeat_interleave(g, dim=1)


def _w_int4(
    q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, g: int
) -> torch.Tensor:
    s = scale.double().repeat_interleave(g, dim=1)
    if offset is None:
        return (q.double() - 8) * s
    return q.double() * s + offset.double().repeat_interleave(g, dim=1)


def _check(y, x, w, bias, path) -> None:
    """y (N, M) float32 from the kernel; x (N, K) float32, w (M, K) float64 exact weight."""
    w32 = w.float()
    b = torch.zeros(w.shape[0], dtype=torch.float64) if bias is None else bias.double()
    exact = x.double() @ w.t() + b
    err = (y.double() - exact).abs()
    if path == "gemm":  # dequantize + fp32 GEMM: exact up to fp32 rounding
        assert err.max() <= 1e-5 * (x.double().abs() @ w.abs().t()).max() + 1e-6
        return
    xq, d = quantize_activations(x)
    x_hat = dequantize_activations(xq, d).double()
    simulated = x_hat @ w.t() + b
    fp32_slack = 1e-5 * (x_hat.abs() @ w.abs().t()) + 1e-6
    assert ((y.double() - simulated).abs() <= fp32_slack).all(), "differs from x_hat @ W^T"
    bound = activation_error_bound(x, w32).double()
    assert (err <= bound * (1 + 1e-5) + fp32_slack).all(), "exceeds the activation-rounding bound"
    if y.numel() >= 16:
        rel = (y.double() - exact).norm() / (exact - b).norm()
        assert rel <= REL_TOL, f"relative error {rel:.3g}"


def test_compiled_kernels_are_used_on_this_machine():
    if not cpu_supports_kernels():
        pytest.skip("CPU without AVX2: the PyTorch fallback is the only path")
    assert kernels_available()
    assert load_kernels().int8_linear is not None
    # The default path quantizes activations, so it differs from the exact product.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 64, generator=g)
    p = pack_int8(
        torch.randint(-127, 128, (8, 64), generator=g, dtype=torch.int8), torch.ones(8, 2), 32
    )
    y = linear_int8(x, p)
    assert torch.equal(y, linear_int8(x, p, path="rows"))
    assert not torch.equal(y, linear_int8(x, p, path="reference"))


@pytest.mark.parametrize(
    "m,k,n,with_bias",
    [
        (7, 64, 1, True),
        (33, 576, 3, False),
        (100, 768, 17, True),
        (64, 96, 64, False),
        (9, 32, 2, True),
    ],
)
@pytest.mark.parametrize("g", [16, 32, 64, "K"])
def test_linear_int8_matches_float_reference(m, k, n, with_bias, g):
    g = k if g == "K" else g
    if k % g:
        pytest.skip("group does not divide K")
    gen = torch.Generator().manual_seed(m * 1000 + k + n + g)
    q = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)
    scale = torch.rand(m, k // g, generator=gen) * 0.02 + 1e-3
    bias = torch.randn(m, generator=gen) if with_bias else None
    x = torch.randn(n, k, generator=gen)
    p = pack_int8(q, scale, g)
    w = _w_int8(q, scale, g)
    assert torch.equal(dequantize_packed(p), w.float())
    for path in COMPILED_PATHS:
        _check(linear_int8(x, p, bias, path=path), x, w, bias, path)


@pytest.mark.parametrize(
    "m,k,n,with_bias",
    [
        (7, 160, 1, False),
        (33, 576, 3, True),
        (100, 768, 17, False),
        (64, 128, 64, True),
        (9, 384, 2, False),
    ],
)
@pytest.mark.parametrize("g", [32, 64, 128])
@pytest.mark.parametrize("with_offset", [False, True])
def test_linear_int4_matches_float_reference(m, k, n, with_bias, g, with_offset):
    if k % g:
        pytest.skip("group does not divide K")
    gen = torch.Generator().manual_seed(m * 1000 + k + n + g)
    q = torch.randint(0, 16, (m, k), generator=gen, dtype=torch.uint8)
    scale = torch.rand(m, k // g, generator=gen) * 0.02 + 1e-3
    offset = torch.randn(m, k // g, generator=gen) * 0.05 if with_offset else None
    bias = torch.randn(m, generator=gen) if with_bias else None
    x = torch.randn(n, k, generator=gen)
    p = pack_int4(q, scale, offset, g)
    w = _w_int4(q, scale, offset, g)
    assert torch.allclose(dequantize_packed(p).double(), w, rtol=1e-6, atol=1e-7)
    for path in COMPILED_PATHS:
        _check(linear_int4(x, p, bias, path=path), x, w, bias, path)


def test_activation_quantization_matches_torch_bit_for_bit():
    if not kernels_available():
        pytest.skip("kernels not built")
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(200, 256, generator=gen) * torch.rand(200, 256, generator=gen) * 10
    x[0, :32] = 0.0  # an all-zero block: scale 0, codes 0
    x[1, 5] = 1e4  # an outlier
    q, d, ds = load_kernels().quantize_activations(x)
    q_ref, d_ref = quantize_activations(x)
    assert torch.equal(q, q_ref) and torch.equal(d, d_ref)  # incl. ties rounded half to even
    assert torch.equal(ds, d_ref * q_ref.view(200, 8, 32).sum(-1).float())


def test_outliers_extremes_and_zero_rows():
    gen = torch.Generator().manual_seed(3)
    m, k = 24, 128
    q = torch.full((m, k), -128, dtype=torch.int8)  # worst case for the int16 pair sums
    q[::2] = 127
    scale = torch.rand(m, k // 32, generator=gen)
    x = torch.randn(6, k, generator=gen)
    x[0] = 0.0
    x[1, 7] = -300.0
    x[2] = -x[2].abs() * 1000
    p = pack_int8(q, scale, 32)
    for path in COMPILED_PATHS:
        y = linear_int8(x, p, path=path)
        _check(y, x, _w_int8(q, scale, 32), None, path)
        assert torch.equal(y[0], torch.zeros(m))
    q4 = torch.full((m, k), 15, dtype=torch.uint8)
    p4 = pack_int4(q4, scale, scale, 32)
    for path in COMPILED_PATHS:
        _check(linear_int4(x, p4, path=path), x, _w_int4(q4, scale, scale, 32), None, path)


def test_leading_dims_and_dtype_are_kept():
    gen = torch.Generator().manual_seed(4)
    q = torch.randint(0, 16, (40, 64), generator=gen, dtype=torch.uint8)
    p = pack_int4(q, torch.rand(40, 2, generator=gen), None, 32)
    x = torch.randn(2, 3, 64, generator=gen)
    y = linear_int4(x, p)
    assert y.shape == (2, 3, 40) and y.dtype == torch.float32
    assert torch.equal(y.reshape(6, 40), linear_int4(x.reshape(6, 64), p))
    yb = linear_int4(x.to(torch.bfloat16), p)
    assert yb.dtype == torch.bfloat16 and yb.shape == (2, 3, 40)


def test_reference_path_equals_float_matmul():
    gen = torch.Generator().manual_seed(5)
    q = torch.randint(-128, 128, (50, 96), generator=gen, dtype=torch.int8)
    scale = torch.rand(50, 6, generator=gen)
    bias = torch.randn(50, generator=gen)
    x = torch.randn(4, 96, generator=gen)
    w = _w_int8(q, scale, 16)
    y = linear_int8(x, pack_int8(q, scale, 16), bias, path="reference")
    assert torch.allclose(y.double(), x.double() @ w.t() + bias.double(), rtol=1e-5, atol=1e-5)


def test_without_compiled_kernels_the_reference_path_is_used(monkeypatch):
    # What a CPU without AVX2 or a failed build gets: load_kernels() returns None.
    monkeypatch.setattr("miaotui.kernels.ops.load_kernels", lambda: None)
    gen = torch.Generator().manual_seed(6)
    q = torch.randint(0, 16, (24, 128), generator=gen, dtype=torch.uint8)
    scale, offset = torch.rand(24, 2, generator=gen), torch.randn(24, 2, generator=gen)
    x, bias = torch.randn(3, 128, generator=gen), torch.randn(24, generator=gen)
    y = linear_int4(x, pack_int4(q, scale, offset, 64), bias)
    exact = x.double() @ _w_int4(q, scale, offset, 64).t() + bias.double()
    assert torch.allclose(y.double(), exact, rtol=1e-5, atol=1e-5)


def test_tensors_off_cpu_fall_back_with_one_warning(caplog):
    # A meta tensor stands in for a GPU one: the C++ op must not be used for it.
    x = torch.empty(3, 64, device="meta")
    with caplog.at_level(logging.WARNING, logger="miaotui.kernels.ops"):
        assert _compiled_ops(x, 64) is None
        assert _compiled_ops(x, 64) is None
    assert sum("CPU only" in r.getMessage() for r in caplog.records) <= 1
    assert _compiled_ops(torch.empty(3, 64), 64) is load_kernels()


def test_bad_layouts_are_rejected():
    with pytest.raises(ValueError, match="group_size"):
        pack_int8(torch.zeros(4, 64, dtype=torch.int8), torch.ones(4, 2), 24)
    with pytest.raises(ValueError, match="scale"):
        PackedInt8(torch.zeros(4, 64, dtype=torch.int8), torch.ones(4, 3), 32)
    with pytest.raises(ValueError, match="group_size"):
        pack_int4(torch.zeros(4, 64, dtype=torch.uint8), torch.ones(4, 4), None, 16)


@settings(max_examples=30, deadline=None)
@given(
    m=st.integers(1, 9),
    blocks=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_int4_nibble_packing_round_trips(m, blocks, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (m, 32 * blocks), generator=gen, dtype=torch.uint8)
    p = pack_int4(q, torch.ones(m, blocks), None, 32)
    assert torch.equal(unpack_int4_codes(p.qweight), q)
    # Q4_0 order: element j in the low nibble of byte j, element j + 16 in the high nibble.
    assert torch.equal(p.qweight[:, :16] & 0x0F, q[:, :16])
    assert torch.equal(p.qweight[:, :16] >> 4, q[:, 16:32])
