"""Vectorised PyTorch decoders for GGUF / GGML tensor types.

Two entry points:

* :func:`dequantize` turns the raw bytes of one GGUF tensor into a float32 ``torch.Tensor``.
* :func:`unpack_affine` turns them into integer codes plus per-group scale/offset
  (:class:`AffineGroups`) so quantized matmul kernels can work on the codes directly.

Everything is done with whole-tensor torch ops (byte views, shifts, masks): there is no Python
loop over blocks or rows. The results are bit-identical to gguf-py's numpy reference decoder
(``gguf/quants.py``), which the tests check.

Block layouts follow ``ggml/src/ggml-common.h`` (``block_q4_0`` ... ``block_q8_K``); the comment
above each unpacker gives the byte layout of one block. ``QK_K`` = 256 (super-block size of the
k-quants). All multi-byte fields are little-endian. In the 32-element "legacy" blocks the 4-bit
codes are stored as ``qs[j] = x[j] | x[j + 16] << 4`` (element j in the low nibble, element
j + 16 in the high nibble); the k-quants use the same idea over 64/128-element chunks (see each
unpacker).

Input: ``raw`` is what ``gguf.GGUFReader`` puts in ``ReaderTensor.data``: a (read-only) numpy
memmap of ``uint8`` of shape ``(rows, bytes_per_row)`` for block types, or a typed array for
F32/F16 (BF16 is given as bytes). Any array or tensor holding the same bytes in the same order is
accepted. The bytes are wrapped without copying; the decoders only read them and every returned
tensor owns fresh memory (never aliases the memmap).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import gguf
import numpy as np
import torch

from miaotui.errors import ModelFormatError, UnsupportedModelError

T = gguf.GGMLQuantizationType
QK_K = 256

__all__ = [
    "AffineGroups",
    "dequantize",
    "supported_affine_types",
    "supported_types",
    "unpack_affine",
]


@dataclass(frozen=True)
class AffineGroups:
    """Integer codes of a quantized tensor plus one affine map per group of ``group_size``
    consecutive elements along the last (contiguous) dimension.

    For every element ``(r, k)`` with group ``g = k // group_size``::

        value[r, k] = q[r, k] * scale[r, g] + offset[r, g]      # offset None -> + 0

    computed in float32, which reproduces the GGUF dequantized value exactly (the tests compare
    bit-for-bit with gguf-py). When ``symmetric_zero`` is not None, ``offset`` equals
    ``-symmetric_zero * scale`` exactly, so a kernel may instead compute
    ``value = (q - symmetric_zero) * scale`` and ignore ``offset``.

    Fields:
        q: integer codes, shape ``shape`` (``(rows, K)`` for a matrix). dtype ``torch.uint8`` for
            the 4-bit types (codes 0..15), ``torch.int8`` for all others.
        scale: float32, shape ``(*shape[:-1], K // group_size)``.
        offset: float32 like ``scale``, or None when the type has no additive term.
        group_size: number of consecutive elements sharing one scale/offset.
        symmetric_zero: see above; None when the offset is not a fixed multiple of the scale.
        qtype: the GGML type the codes came from.
        bits: number of significant bits of the codes (q spans at most 2**bits values).

    Per type (d, dmin, m are the fp16/fp32 block fields, sc/mn the sub-block scales/mins):

    ====  =====  =========  =========  =============  ====  ==
    type  q      q range    scale      offset         zero  gs
    ====  =====  =========  =========  =============  ====  ==
    Q4_0  uint8  0..15      d          -8*d           8     32
    Q4_1  uint8  0..15      d          m              -     32
    Q5_0  int8   -16..15    d          None           -     32
    Q5_1  int8   0..31      d          m              -     32
    Q8_0  int8   -128..127  d          None           -     32
    Q2_K  int8   0..3       d*sc       -dmin*mn       -     16
    Q3_K  int8   -4..3      d*(sc-32)  None           -     16
    Q4_K  uint8  0..15      d*sc       -dmin*mn       -     32
    Q5_K  int8   0..31      d*sc       -dmin*mn       -     32
    Q6_K  int8   -32..31    d*sc       None           -     16
    Q8_K  int8   -128..127  d (fp32)   None           -     256
    ====  =====  =========  =========  =============  ====  ==

    (Q2_K: sc = scales[i] & 15, mn = scales[i] >> 4; Q3_K: 6-bit sc; Q4_K/Q5_K: 6-bit sc and
    mn from the packed 12-byte field; Q6_K: int8 sc.) Every product ``q * scale`` is exact in
    float32 for the types with an offset, so fused multiply-add kernels give the same values.
    """

    q: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor | None
    group_size: int
    symmetric_zero: int | None = None
    qtype: gguf.GGMLQuantizationType | None = None
    bits: int = 8

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.q.shape)

    def dequantize(self) -> torch.Tensor:
        """Reconstruct the float32 values (``q * scale + offset``), same result as
        :func:`dequantize`."""
        return _reconstruct(self)


# --------------------------------------------------------------------------------------------
# byte helpers


def _as_bytes(raw: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A flat uint8 torch view of ``raw``'s bytes, without copying.

    GGUFReader hands out read-only memmaps; ``torch.from_numpy`` warns about those because the
    tensor would be writable. The decoders below only read from this view and every result is a
    new tensor, so the warning is suppressed locally.
    """
    if isinstance(raw, torch.Tensor):
        t = raw.detach()
        if not t.is_contiguous():
            t = t.contiguous()
        return t.reshape(-1).view(torch.uint8)
    arr = np.asarray(raw)
    if not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr)
    arr = arr.reshape(-1).view(np.uint8)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*")
        return torch.from_numpy(arr)


def _blocks(raw: np.ndarray | torch.Tensor, qtype: T, shape: tuple[int, ...]) -> torch.Tensor:
    """(n_blocks, type_size) uint8 view of the tensor's blocks, after checking sizes."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    k = shape[-1] if shape else 1
    if k % block_size != 0:
        raise ModelFormatError(
            f"tensor of type {qtype.name} has row length {k}, which is not a multiple of its "
            f"block size {block_size}"
        )
    n_blocks = math.prod(shape) // block_size
    data = _as_bytes(raw)
    if data.numel() != n_blocks * type_size:
        raise ModelFormatError(
            f"tensor of type {qtype.name} and shape {tuple(shape)} needs "
            f"{n_blocks * type_size} bytes, got {data.numel()}"
        )
    return data.view(n_blocks, type_size)


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The little-endian fp16 field at byte ``start`` of every block, as (n_blocks,) float32."""
    return blocks[:, start : start + 2].contiguous().view(torch.float16).reshape(-1).float()


def _bits(x: torch.Tensor, chunk: int, shifts: tuple[int, ...], mask: int) -> torch.Tensor:
    """Unpack bit fields: ``x`` (n, m) uint8 is cut in chunks of ``chunk`` bytes; for each chunk
    the fields ``(byte >> s) & mask`` for s in ``shifts`` are laid out one after another
    (all bytes of the chunk at shift s[0], then all at s[1], ...). Returns (n, m * len(shifts)).

    This is the ordering every GGML layout uses, e.g. Q4_0 (chunk 16, shifts 0/4): element j is
    the low nibble of qs[j] and element 16 + j its high nibble.

    (One whole-tensor op per bit position, at most 8; ``torch.stack`` of these measured faster
    than a single broadcast shift against a tensor of shifts.)
    """
    n = x.shape[0]
    x = x.reshape(n, -1, chunk)
    width = mask.bit_length()
    fields = []
    for s in shifts:
        if s == 0:
            fields.append(x & mask)
        elif s + width >= 8:  # top field: the shift alone clears the other bits
            fields.append(x >> s)
        else:
            fields.append((x >> s).bitwise_and_(mask))
    return torch.stack(fields, dim=-2).reshape(n, -1)


_NIBBLES = (0, 4)
_CRUMBS = (0, 2, 4, 6)
_BITS = tuple(range(8))


def _k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack the 12-byte ``scales`` field of Q4_K / Q5_K into 8 six-bit scales and 8 mins
    (ggml-quants.c ``get_scale_min_k4``; gguf-py ``Q4_K.get_scale_min``)::

         0 EEAAAAAA    4 eeaaaaaa    8 eeeeEEEE     A..H: scales 0..7 (upper letters: sc,
         1 FFBBBBBB    5 ffbbbbbb    9 ffffFFFF           lower letters: min)
         2 GGCCCCCC    6 ggcccccc   10 ggggGGGG
         3 HHDDDDDD    7 hhdddddd   11 hhhhHHHH
    """
    n = scales.shape[0]
    s = scales.reshape(n, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


# --------------------------------------------------------------------------------------------
# per-type unpackers: blocks (n_blocks, type_size) uint8 -> _Unpacked with
# q (n_blocks, block_size), scale/offset (n_blocks, groups_per_block)


@dataclass(frozen=True)
class _Unpacked:
    # q may be a strided view of the input bytes (Q8_0, Q8_K): read it, never write it, and copy
    # it before handing it out (unpack_affine does).
    q: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor | None
    group_size: int
    symmetric_zero: int | None
    bits: int


def _unpack_q4_0(b: torch.Tensor) -> _Unpacked:
    # block_q4_0 (18 bytes, 32 elements): ggml_half d; uint8 qs[16]
    # x[j] = (qs[j] & 15) - 8, x[j + 16] = (qs[j] >> 4) - 8; value = x * d
    d = _f16(b, 0).unsqueeze(1)
    q = _bits(b[:, 2:18], 16, _NIBBLES, 0x0F)
    return _Unpacked(q, d, -8.0 * d, 32, 8, 4)


def _unpack_q4_1(b: torch.Tensor) -> _Unpacked:
    # block_q4_1 (20 bytes, 32 elements): ggml_half d; ggml_half m; uint8 qs[16]
    # value = q * d + m, q as in Q4_0
    d = _f16(b, 0).unsqueeze(1)
    m = _f16(b, 2).unsqueeze(1)
    q = _bits(b[:, 4:20], 16, _NIBBLES, 0x0F)
    return _Unpacked(q, d, m, 32, None, 4)


def _q5_codes(qh: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    # qh is a little-endian uint32 whose bit j is the 5th bit of element j: byte j // 8, bit j % 8
    # (the 4-byte field is not 4-aligned inside the block, so it is unpacked byte-wise).
    low = _bits(qs, 16, _NIBBLES, 0x0F)
    high = _bits(qh, 1, _BITS, 0x01)
    return low | (high << 4)


def _unpack_q5_0(b: torch.Tensor) -> _Unpacked:
    # block_q5_0 (22 bytes, 32 elements): ggml_half d; uint8 qh[4]; uint8 qs[16]
    # value = (q - 16) * d with q the 5-bit code; we return the signed code q - 16
    d = _f16(b, 0).unsqueeze(1)
    q = _q5_codes(b[:, 2:6], b[:, 6:22]).view(torch.int8) - 16
    return _Unpacked(q, d, None, 32, None, 5)


def _unpack_q5_1(b: torch.Tensor) -> _Unpacked:
    # block_q5_1 (24 bytes, 32 elements): ggml_half d; ggml_half m; uint8 qh[4]; uint8 qs[16]
    # value = q * d + m
    d = _f16(b, 0).unsqueeze(1)
    m = _f16(b, 2).unsqueeze(1)
    q = _q5_codes(b[:, 4:8], b[:, 8:24]).view(torch.int8)
    return _Unpacked(q, d, m, 32, None, 5)


def _unpack_q8_0(b: torch.Tensor) -> _Unpacked:
    # block_q8_0 (34 bytes, 32 elements): ggml_half d; int8 qs[32]; value = qs * d
    d = _f16(b, 0).unsqueeze(1)
    q = b[:, 2:34].view(torch.int8)  # strided view of the input bytes, see _Unpacked.q
    return _Unpacked(q, d, None, 32, None, 8)


def _unpack_q2_k(b: torch.Tensor) -> _Unpacked:
    # block_q2_K (84 bytes, 256 elements): uint8 scales[16]; uint8 qs[64]; ggml_half d, dmin
    # 16 sub-blocks of 16: scales[i] = sc | mn << 4 (4 bits each);
    # value = d * sc * q - dmin * mn, q = 2-bit code. qs holds two 128-element halves of 32
    # bytes; in each, bits 2s..2s+1 of qs[l] are element 32 * s + l.
    scales = b[:, 0:16]
    q = _bits(b[:, 16:80], 32, _CRUMBS, 0x03).view(torch.int8)
    d = _f16(b, 80).unsqueeze(1)
    dmin = _f16(b, 82).unsqueeze(1)
    scale = d * (scales & 0x0F).float()
    offset = -(dmin * (scales >> 4).float())
    return _Unpacked(q, scale, offset, 16, None, 2)


def _unpack_q3_k(b: torch.Tensor) -> _Unpacked:
    # block_q3_K (110 bytes, 256 elements): uint8 hmask[32]; uint8 qs[64]; uint8 scales[12];
    # ggml_half d. 16 sub-blocks of 16 with 6-bit scales sc (stored + 32):
    # value = d * (sc - 32) * (q2 - (hbit ? 0 : 4)), q2 the low 2 bits laid out as in Q2_K and
    # hbit = bit s of hmask[l] for element 32 * s + l.
    # scales (gguf-py Q3_K): bytes 0..7 carry the low nibbles (byte i: sub-block i low nibble,
    # i + 8 high nibble), bytes 8..11 the top 2 bits (byte i, bits 2s: sub-block 4 * s + i).
    hmask = b[:, 0:32]
    qs = b[:, 32:96]
    sbytes = b[:, 96:108]
    d = _f16(b, 108).unsqueeze(1)
    lo = _bits(sbytes[:, 0:8], 8, _NIBBLES, 0x0F)
    hi = _bits(sbytes[:, 8:12], 4, _CRUMBS, 0x03)
    sc = (lo | (hi << 4)).view(torch.int8) - 32
    hbit = _bits(hmask, 32, _BITS, 0x01)
    q = _bits(qs, 32, _CRUMBS, 0x03).view(torch.int8) - ((hbit ^ 1) << 2).view(torch.int8)
    return _Unpacked(q, d * sc.float(), None, 16, None, 3)


def _unpack_q4_k(b: torch.Tensor) -> _Unpacked:
    # block_q4_K (144 bytes, 256 elements): ggml_half d; ggml_half dmin; uint8 scales[12];
    # uint8 qs[128]. 8 sub-blocks of 32 with 6-bit scale sc and min mn (see _k_scale_min):
    # value = d * sc * q - dmin * mn. qs: four 64-element chunks of 32 bytes, low nibbles
    # are elements 0..31 of the chunk, high nibbles 32..63.
    d = _f16(b, 0).unsqueeze(1)
    dmin = _f16(b, 2).unsqueeze(1)
    sc, mn = _k_scale_min(b[:, 4:16])
    q = _bits(b[:, 16:144], 32, _NIBBLES, 0x0F)
    return _Unpacked(q, d * sc.float(), -(dmin * mn.float()), 32, None, 4)


def _unpack_q5_k(b: torch.Tensor) -> _Unpacked:
    # block_q5_K (176 bytes, 256 elements): ggml_half d; ggml_half dmin; uint8 scales[12];
    # uint8 qh[32]; uint8 qs[128]. As Q4_K with a 5th bit: bit s of qh[l] is the high bit of
    # element 32 * s + l.
    d = _f16(b, 0).unsqueeze(1)
    dmin = _f16(b, 2).unsqueeze(1)
    sc, mn = _k_scale_min(b[:, 4:16])
    high = _bits(b[:, 16:48], 32, _BITS, 0x01)
    q = (_bits(b[:, 48:176], 32, _NIBBLES, 0x0F) | (high << 4)).view(torch.int8)
    return _Unpacked(q, d * sc.float(), -(dmin * mn.float()), 32, None, 5)


def _unpack_q6_k(b: torch.Tensor) -> _Unpacked:
    # block_q6_K (210 bytes, 256 elements): uint8 ql[128]; uint8 qh[64]; int8 scales[16];
    # ggml_half d. 16 sub-blocks of 16: value = d * scales[i] * (q - 32), q 6-bit.
    # ql: two 128-element halves of 64 bytes, low nibbles = elements 0..63, high = 64..127;
    # qh: two halves of 32 bytes, bits 2s..2s+1 of qh[l] = top 2 bits of element 32 * s + l.
    low = _bits(b[:, 0:128], 64, _NIBBLES, 0x0F)
    high = _bits(b[:, 128:192], 32, _CRUMBS, 0x03)
    q = (low | (high << 4)).view(torch.int8) - 32
    sc = b[:, 192:208].contiguous().view(torch.int8)
    d = _f16(b, 208).unsqueeze(1)
    return _Unpacked(q, d * sc.float(), None, 16, None, 6)


def _unpack_q8_k(b: torch.Tensor) -> _Unpacked:
    # block_q8_K (292 bytes, 256 elements): float d; int8 qs[256]; int16 bsums[16] (bsums are
    # per-16 sums used by dot products, not needed to decode). value = qs * d
    d = b[:, 0:4].contiguous().view(torch.float32)
    q = b[:, 4:260].view(torch.int8)  # strided view of the input bytes, see _Unpacked.q
    return _Unpacked(q, d, None, 256, None, 8)


_UNPACKERS: dict[T, Callable[[torch.Tensor], _Unpacked]] = {
    T.Q4_0: _unpack_q4_0,
    T.Q4_1: _unpack_q4_1,
    T.Q5_0: _unpack_q5_0,
    T.Q5_1: _unpack_q5_1,
    T.Q8_0: _unpack_q8_0,
    T.Q2_K: _unpack_q2_k,
    T.Q3_K: _unpack_q3_k,
    T.Q4_K: _unpack_q4_k,
    T.Q5_K: _unpack_q5_k,
    T.Q6_K: _unpack_q6_k,
    T.Q8_K: _unpack_q8_k,
}

_FLOAT_TYPES = (T.F32, T.F16, T.BF16)


def supported_affine_types() -> tuple[gguf.GGMLQuantizationType, ...]:
    """Types :func:`unpack_affine` accepts."""
    return tuple(_UNPACKERS)


def supported_types() -> tuple[gguf.GGMLQuantizationType, ...]:
    """Types :func:`dequantize` accepts."""
    return _FLOAT_TYPES + tuple(_UNPACKERS)


def _unsupported(qtype: T | int, supported: tuple[T, ...], what: str) -> UnsupportedModelError:
    try:
        name = T(qtype).name
    except ValueError:
        name = f"unknown type id {int(qtype)}"
    return UnsupportedModelError(
        f"tensor type {name} is not supported by {what}; supported types: "
        + ", ".join(t.name for t in supported)
    )


def _check_qtype(qtype: T | int) -> T:
    try:
        return T(qtype)
    except ValueError:
        raise _unsupported(qtype, supported_types(), "miaotui") from None


def _reconstruct(a: AffineGroups | _Unpacked) -> torch.Tensor:
    shape = tuple(a.q.shape)
    n_groups = a.scale.numel()
    vals = a.q.reshape(n_groups, a.group_size).float()
    scale = a.scale.reshape(n_groups, 1)
    if a.symmetric_zero is not None:
        # (q - z) * d: exact, and equal to q * d + (-z * d) (both products fit in fp32)
        vals.sub_(a.symmetric_zero).mul_(scale)
    else:
        vals.mul_(scale)
        if a.offset is not None:
            vals.add_(a.offset.reshape(n_groups, 1))
    return vals.reshape(shape)


# --------------------------------------------------------------------------------------------
# public API


def _norm_shape(shape) -> tuple[int, ...]:
    shape = tuple(int(s) for s in shape)
    if not shape:
        shape = (1,)
    return shape


def dequantize(
    raw: np.ndarray | torch.Tensor, qtype: gguf.GGMLQuantizationType, shape: tuple[int, ...]
) -> torch.Tensor:
    """Decode one GGUF tensor to float32.

    Args:
        raw: the tensor's bytes as ``GGUFReader`` gives them (``ReaderTensor.data``): uint8
            ``(rows, bytes_per_row)`` for block types, a typed array for F32/F16; or any
            array/tensor with the same bytes.
        qtype: the tensor's ``gguf.GGMLQuantizationType``.
        shape: the logical shape in torch order (last dimension contiguous), e.g.
            ``tuple(reversed(reader_tensor.shape))``.

    Returns a new float32 tensor of shape ``shape`` (never a view of the memmap).

    Raises:
        UnsupportedModelError: ``qtype`` is not one of :func:`supported_types`.
        ModelFormatError: the byte count does not match ``shape`` and ``qtype``.
    """
    qtype = _check_qtype(qtype)
    shape = _norm_shape(shape)
    if qtype in _FLOAT_TYPES:
        dtype = {T.F32: torch.float32, T.F16: torch.float16, T.BF16: torch.bfloat16}[qtype]
        data = _as_bytes(raw)
        n = math.prod(shape)
        if data.numel() != n * dtype.itemsize:
            raise ModelFormatError(
                f"tensor of type {qtype.name} and shape {shape} needs "
                f"{n * dtype.itemsize} bytes, got {data.numel()}"
            )
        if data.data_ptr() % dtype.itemsize:
            data = data.clone()  # view(dtype) needs an aligned start
        out = data.view(dtype).reshape(shape)
        # F32: the one copy that detaches the result from the (read-only) memmap
        return out.clone() if qtype == T.F32 else out.float()
    unpack = _UNPACKERS.get(qtype)
    if unpack is None:
        raise _unsupported(qtype, supported_types(), "miaotui's dequantizer")
    return _reconstruct(unpack(_blocks(raw, qtype, shape))).reshape(shape)


def unpack_affine(
    raw: np.ndarray | torch.Tensor, qtype: gguf.GGMLQuantizationType, shape: tuple[int, ...]
) -> AffineGroups:
    """Split a quantized GGUF tensor into integer codes and per-group scale/offset; see
    :class:`AffineGroups` for the exact semantics per type. Arguments as for
    :func:`dequantize`.

    Raises:
        UnsupportedModelError: ``qtype`` is not one of :func:`supported_affine_types`.
        ModelFormatError: the byte count does not match ``shape`` and ``qtype``.
    """
    qtype = _check_qtype(qtype)
    shape = _norm_shape(shape)
    unpack = _UNPACKERS.get(qtype)
    if unpack is None:
        raise _unsupported(qtype, supported_affine_types(), "unpack_affine")
    blocks = _blocks(raw, qtype, shape)
    u = unpack(blocks)
    gshape = (*shape[:-1], shape[-1] // u.group_size)
    q = u.q.reshape(shape)  # copies when q is a strided view of the blocks ...
    if q.untyped_storage().data_ptr() == blocks.untyped_storage().data_ptr():
        q = q.clone()  # ... but not always (one block): never alias the read-only input  # q still views the (possibly read-only, memmapped) input bytes
    return AffineGroups(
        q=q,
        scale=u.scale.reshape(gshape),
        offset=None if u.offset is None else u.offset.reshape(gshape),
        group_size=u.group_size,
        symmetric_zero=u.symmetric_zero,
        qtype=qtype,
        bits=u.bits,
    )
