"""GPTQ, AWQ and SmoothQuant against float references on a small layer with correlated inputs and
outlier channels: each must beat round-to-nearest (RTN) on the output error ||W X^T - W_hat X^T||,
measured with plain float matmuls on calibration and held-out inputs."""

import pytest
import torch

from miaotui.transforms import quant_math as qm
from miaotui.transforms.awq import awq_quantize
from miaotui.transforms.gptq import gptq_quantize, hessian_accumulator
from miaotui.transforms.smoothquant import apply_smoothing, smooth_scales

M, K, N_CALIB, GROUP = 64, 256, 512, 64


@pytest.fixture(scope="module")
def layer():
    """w (M, K); calibration and held-out inputs x = z @ A, with 4 channels 20x larger."""
    gen = torch.Generator().manual_seed(1)
    mixing = torch.randn(K, K, generator=gen) / K**0.5
    outliers = torch.randperm(K, generator=gen)[:4]

    def inputs(n):
        x = torch.randn(n, K, generator=gen) @ mixing
        x[:, outliers] *= 20
        return x

    w = torch.randn(M, K, generator=gen)
    return w, inputs(N_CALIB), inputs(N_CALIB)


def output_error(w, w_hat, x):
    """Relative ||W X^T - W_hat X^T||_F, in float64."""
    x, w, w_hat = x.double(), w.double(), w_hat.double()
    return ((x @ (w - w_hat).t()).norm() / (x @ w.t()).norm()).item()


def rtn(w, bits=4, group_size=GROUP, symmetric=True):
    return qm.dequantize_weight(*qm.quantize_weight(w, bits, group_size, symmetric))


def test_hessian_accumulator_matches_one_shot():
    x = torch.randn(3, 50, 16, generator=torch.Generator().manual_seed(0))
    h, n = None, 0
    for batch in (x[0], x[1, :7], x[1, 7:], x[2]):
        h, n = hessian_accumulator(h, n, batch)
    flat = x.reshape(-1, 16).double()
    assert n == 150
    torch.testing.assert_close(h.double(), 2 * flat.t() @ flat / 150, rtol=1e-5, atol=1e-5)


# GPTQ


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_beats_rtn(layer, act_order, symmetric):
    w, x, x_test = layer
    h, n = hessian_accumulator(None, 0, x[:200])
    h, n = hessian_accumulator(h, n, x[200:])
    codes, scale, offset, perm = gptq_quantize(
        w, h, bits=4, group_size=GROUP, symmetric=symmetric, act_order=act_order
    )
    assert codes.dtype == torch.uint8 and codes.shape == (M, K) and codes.max() <= 15
    assert scale.shape == (M, K // GROUP) and (offset is None) == symmetric
    assert (perm is not None) == act_order
    # Codes are in the original column order: the kernels' plain dequantization applies.
    w_hat = qm.dequantize_int4(codes, scale, offset)
    w_rtn = rtn(w, symmetric=symmetric)
    # GPTQ minimizes the calibration error; it must also generalize to held-out inputs.
    assert output_error(w, w_hat, x) < 0.9 * output_error(w, w_rtn, x)
    assert output_error(w, w_hat, x_test) < output_error(w, w_rtn, x_test)


def test_gptq_act_order_uses_static_groups(layer):
    """With act_order, each original group keeps the scale of plain RTN on the original W."""
    w, x, _ = layer
    h, _ = hessian_accumulator(None, 0, x)
    _, scale, offset, perm = gptq_quantize(w, h, 4, GROUP, symmetric=False, act_order=True)
    wg = w.reshape(M, K // GROUP, GROUP)
    torch.testing.assert_close(scale, (wg.amax(-1) - wg.amin(-1)) / 15)
    torch.testing.assert_close(offset, wg.amin(-1))
    assert torch.equal(perm, torch.argsort(h.diagonal(), descending=True, stable=True))


def test_gptq_int8_beats_rtn(layer):
    w, x, x_test = layer
    h, _ = hessian_accumulator(None, 0, x)
    codes, scale, offset, _ = gptq_quantize(w, h, bits=8, group_size=None)
    assert codes.dtype == torch.int8 and scale.shape == (M, 1) and offset is None
    w_hat = qm.dequantize_int8(codes, scale)
    assert output_error(w, w_hat, x_test) < 0.8 * output_error(w, rtn(w, 8, None), x_test)


def _obs_reference(w, h, group_size, symmetric, order, static, damp=0.01):
    """GPTQ as the paper's equations, one column at a time, in float64 with an explicit inverse:
    quantize column q, spread delta = -(w_q - Q(w_q)) / [H^-1]_qq * H^-1_{:,q} over the rest,
    then remove q from H^-1 (H^-1 - H^-1_{:,q} H^-1_{q,:} / [H^-1]_qq), which zeroes its row and
    column so done columns receive no further updates. No blocks, no Cholesky."""
    w, h = w.double().clone(), h.double()
    h = h + damp * h.diagonal().mean() * torch.eye(K, dtype=torch.float64)
    hinv = torch.linalg.inv(h)
    wg = w.reshape(w.shape[0], K // group_size, group_size)
    static_params = [qm.weight_params(wg[:, i].float(), 4, symmetric) for i in range(wg.shape[1])]
    out = torch.empty_like(w)
    for q in order.tolist():
        gi = q // group_size
        if static:
            scale, offset = static_params[gi]
        elif q % group_size == 0:  # dynamic groups (identity order): current weights of the group
            scale, offset = qm.weight_params(w[:, q : q + group_size].float(), 4, symmetric)
        code = qm.encode(w[:, q].float(), scale, offset, 4)
        out[:, q] = qm.decode(code, scale, offset).double()
        delta = (w[:, q] - out[:, q]) / hinv[q, q]
        w -= delta[:, None] * hinv[q][None, :]
        hinv = hinv - hinv[:, q : q + 1] @ hinv[q : q + 1, :] / hinv[q, q]
    return out.float()


@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_matches_per_column_obs_reference(layer, act_order):
    """Lazy batches + Cholesky of the inverse Hessian must equal the plain per-column updates."""
    w, x, _ = layer
    w = w[:8]
    h, _ = hessian_accumulator(None, 0, x)
    order = (
        torch.argsort(h.diagonal(), descending=True, stable=True) if act_order else torch.arange(K)
    )
    expected = _obs_reference(w, h, GROUP, symmetric=True, order=order, static=act_order)
    codes, scale, offset, _ = gptq_quantize(
        w, h, 4, GROUP, symmetric=True, act_order=act_order, block_size=48
    )
    torch.testing.assert_close(
        qm.dequantize_int4(codes, scale, offset), expected, atol=1e-4, rtol=0
    )


def test_gptq_with_diagonal_hessian_is_rtn_and_handles_dead_columns():
    """Uncorrelated inputs leave nothing to compensate: GPTQ reduces to RTN. A column that never
    saw input (diag H = 0) is zeroed, as in the reference, without NaN."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(5, 128, generator=gen)
    diag = torch.rand(128, generator=gen) + 0.1
    diag[7] = 0
    codes, scale, offset, _ = gptq_quantize(w, torch.diag(diag), 4, 32, symmetric=False, damp=0.0)
    w_dead = w.clone()
    w_dead[:, 7] = 0
    torch.testing.assert_close(qm.dequantize_int4(codes, scale, offset), rtn(w_dead, 4, 32, False))


def test_gptq_rejects_bad_arguments():
    w, h = torch.randn(4, 96), torch.eye(96)
    with pytest.raises(ValueError, match="group_size=64 does not divide K=96"):
        gptq_quantize(w, h, group_size=64)
    with pytest.raises(ValueError, match="hessian shape"):
        gptq_quantize(w, torch.eye(32))
    with pytest.raises(ValueError, match="not positive definite"):
        gptq_quantize(w, -torch.eye(96), damp=0.0)


# AWQ


@pytest.mark.parametrize("symmetric", [True, False])
def test_awq_beats_rtn(layer, symmetric):
    w, x, x_test = layer
    codes, scale, offset, s = awq_quantize(w, x, bits=4, group_size=GROUP, symmetric=symmetric)
    assert s.shape == (K,) and (s > 0).all()
    # The caller's contract: the previous op feeds x / s, the kernel computes codes @ (x / s).
    w_kernel = qm.dequantize_int4(codes, scale, offset)
    y = (x_test.double() / s.double()) @ w_kernel.double().t()
    ref = x_test.double() @ w.double().t()
    err_awq = ((y - ref).norm() / ref.norm()).item()
    err_rtn = output_error(w, rtn(w, symmetric=symmetric), x_test)
    assert err_awq < 0.9 * err_rtn
    # The clipping search helps on top of the scale search.
    c2, s2, o2, sc2 = awq_quantize(w, x, 4, GROUP, symmetric=symmetric, clip=False)
    err_noclip = output_error(w, qm.dequantize_int4(c2, s2, o2) / sc2, x_test)
    assert err_awq < err_noclip < err_rtn


# SmoothQuant


def test_smooth_scales_formula():
    s = smooth_scales(torch.tensor([4.0, 1.0, 0.0]), torch.tensor([1.0, 4.0, 2.0]), alpha=0.5)
    torch.testing.assert_close(s, torch.tensor([2.0, 0.5, 1e-5]))  # zero activations clamp


def test_smoothquant_reduces_w8a8_error(layer):
    w, x, x_test = layer
    ref = x_test.double() @ w.double().t()

    def w8a8_error(weight, inputs):
        wq, w_scale = qm.quantize_int8(weight)
        y = qm.w8a8_linear(inputs, wq, w_scale).double()
        return ((y - ref).norm() / ref.norm()).item()

    s = smooth_scales(x.abs().amax(0), w.abs().amax(0), alpha=0.5)
    # The caller divides the previous norm's weight by s, i.e. the layer sees x / s.
    smoothed = w8a8_error(apply_smoothing(w, s), x_test / s)
    assert smoothed < 0.5 * w8a8_error(w, x_test)
