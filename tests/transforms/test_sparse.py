"""Sparse storage (bitmask, CSR) and the sparse matmul kernel."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from miaotui.kernels.sparse import (
    BitmaskSparse,
    compress,
    csr_nbytes,
    decompress,
    pack_bits,
    semi_structured_available,
    sparse_linear,
    to_csr,
    unpack_bits,
)
from miaotui.transforms.prune_math import apply_mask, nm_mask, unstructured_mask

FAST = settings(max_examples=40, deadline=None)


def random_sparse(m: int, k: int, sparsity: float, seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, k, generator=g)
    mask = unstructured_mask(torch.rand(m, k, generator=g), sparsity)
    return apply_mask(w, mask).to(dtype)


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality (tells -0.0 from 0.0 and compares NaN payloads)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(ints), b.contiguous().view(ints))


# ----------------------------------------------------------------------------- bitmask


@FAST
@given(numel=st.integers(0, 100), seed=st.integers(0, 2**16))
def test_pack_unpack_bits(numel, seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(numel, generator=g) < 0.5
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (numel + 7) // 8
    assert torch.equal(unpack_bits(packed, numel), mask)


def test_bit_order_little_endian():
    mask = torch.tensor([True] + [False] * 7 + [False, True])
    assert pack_bits(mask).tolist() == [1, 2]


@FAST
@given(
    m=st.integers(1, 17),
    k=st.integers(1, 23),
    sparsity=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]),
)
def test_compress_round_trip_exact(m, k, sparsity, seed, dtype):
    w = random_sparse(m, k, sparsity, seed, dtype)
    b = compress(w)
    assert b.nnz == int((w != 0).sum())
    out = decompress(b)
    assert bits_equal(out, w)
    assert b.nbytes == b.nnz * w.element_size() + (m * k + 7) // 8
    assert b.dense_nbytes == m * k * w.element_size()
    assert torch.equal(b.mask(), w != 0)


def test_compress_with_explicit_mask_keeps_special_values():
    w = torch.tensor([[0.0, -0.0, float("nan"), 1.0], [float("-inf"), 0.0, 2.5, -0.0]])
    mask = torch.tensor([[True, True, True, False], [True, False, True, True]])
    b = BitmaskSparse.compress(w, mask)
    assert b.nnz == 6
    out = b.decompress()
    expected = torch.where(mask, w, torch.zeros(()))
    assert bits_equal(out, expected)  # kept -0.0 stays -0.0, NaN stays NaN
    with pytest.raises(ValueError):
        BitmaskSparse.compress(w, mask[:, :2])


def test_compressed_size_beats_dense():
    w = random_sparse(576, 1536, 0.5, 0)
    b = compress(w)
    assert b.nbytes < 0.54 * b.dense_nbytes
    assert b.nbytes < csr_nbytes(to_csr(w))  # bitmask is the compact storage format


# ----------------------------------------------------------------------------- CSR + kernel


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_to_csr(index_dtype):
    w = random_sparse(40, 30, 0.8, 1)
    c = to_csr(w, index_dtype=index_dtype)
    assert c.layout == torch.sparse_csr
    assert c.crow_indices().dtype == index_dtype
    assert c._nnz() == int((w != 0).sum())
    assert torch.equal(c.to_dense(), w)
    assert torch.equal(compress(w).to_csr().to_dense(), w)
    per = 4 if index_dtype == torch.int32 else 8
    assert csr_nbytes(c) == c._nnz() * (4 + per) + 41 * per


def test_to_csr_empty_rows_and_all_zero():
    w = torch.zeros(5, 7)
    w[2, 3] = 1.5
    assert torch.equal(to_csr(w).to_dense(), w)
    assert torch.equal(sparse_linear(torch.ones(2, 7), to_csr(w)), torch.ones(2, 7) @ w.T)
    z = torch.zeros(4, 6)
    assert torch.equal(sparse_linear(torch.randn(3, 6), to_csr(z)), torch.zeros(3, 4))


@FAST
@given(
    m=st.integers(1, 48),
    k=st.integers(1, 48),
    n=st.integers(1, 20),
    sparsity=st.sampled_from([0.0, 0.3, 0.5, 0.9, 0.99, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_sparse_linear_matches_dense(m, k, n, sparsity, seed):
    w = random_sparse(m, k, sparsity, seed)
    x = torch.randn(n, k, generator=torch.Generator().manual_seed(seed + 1))
    ref = (x.double() @ w.double().T).float()
    tol = 1e-5 * (x.abs().double() @ w.abs().double().T).max().item() + 1e-6
    for ws in (to_csr(w), to_csr(w, index_dtype=torch.int64), w.to_sparse(), compress(w)):
        out = sparse_linear(x, ws)
        assert out.shape == (n, m) and out.dtype == torch.float32
        assert (out - ref).abs().max().item() <= tol


def test_sparse_linear_batched_bias_and_dtypes():
    w = random_sparse(64, 96, 0.75, 3)
    bias = torch.randn(64)
    x = torch.randn(2, 5, 96)
    out = sparse_linear(x, to_csr(w), bias)
    assert out.shape == (2, 5, 64)
    assert torch.allclose(out, torch.nn.functional.linear(x, w, bias), atol=1e-4)
    xb = x.bfloat16()
    outb = sparse_linear(xb, to_csr(w.bfloat16()))  # no bf16 CPU kernel: fp32 inside
    assert outb.dtype == torch.bfloat16
    refb = torch.nn.functional.linear(xb.float(), w.bfloat16().float())
    assert torch.allclose(outb.float(), refb, atol=5e-2, rtol=1e-2)


def test_sparse_linear_2_4_pattern():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(32, 64, generator=g)
    w = apply_mask(w, nm_mask(w.abs(), 2, 4))
    x = torch.randn(7, 64, generator=g)
    assert torch.allclose(sparse_linear(x, to_csr(w)), x @ w.T, atol=1e-4)


def test_sparse_linear_errors():
    w = random_sparse(8, 6, 0.5, 0)
    with pytest.raises(TypeError):
        sparse_linear(torch.randn(2, 6), w)  # dense weight
    with pytest.raises(ValueError):
        sparse_linear(torch.randn(2, 5), to_csr(w))


def test_semi_structured_probe():
    ok, reason = semi_structured_available("cpu")
    assert isinstance(ok, bool) and isinstance(reason, str)
    if not ok:  # expected on CPU: torch's 2:4 kernels are CUDA-only
        assert reason
