"""A GGUF file's header read straight from a memory map: metadata values and tensor views.

The `gguf` package's reader builds a numpy memmap per field part (about a million for a 49k-token
vocabulary) and takes seconds; this reads the same header with `struct` in a fraction of that,
and leaves every tensor's bytes in the file as a numpy view (shaped as `gguf.GGUFReader` shapes
them: block types as uint8 (..., row_bytes), float types in their own dtype).

Layout (GGUF v2/v3, github.com/ggml-org/ggml docs/gguf.md): magic "GGUF", u32 version, u64 tensor
count, u64 key/value count; key/values (string key, u32 type, value); tensor infos (string name,
u32 n_dims, u64 dims[n_dims], u32 type, u64 offset); tensor data at the next multiple of
`general.alignment` (default 32). Every read is bounds-checked: a lying file raises
ModelFormatError, never IndexError, and never allocates beyond the file size.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from miaotui.errors import ModelFormatError

# ggml_type id -> (name, values per block, bytes per block)   (ggml.h, gguf-py constants.py)
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
}
_NUMPY_TYPES = {
    "F32": np.float32,
    "F16": np.float16,
    "F64": np.float64,
    "I8": np.int8,
    "I16": np.int16,
    "I32": np.int32,
    "I64": np.int64,
}
# GGUF value types: id -> struct format of a scalar (8 string, 9 array handled apart).
_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_ARRAY_DTYPES = {
    0: "<u1",
    1: "<i1",
    2: "<u2",
    3: "<i2",
    4: "<u4",
    5: "<i4",
    6: "<f4",
    7: "?",
    10: "<u8",
    11: "<i8",
    12: "<f8",
}
MAX_DIMS = 4
MAX_ARRAY_DEPTH = 8  # GGUF files in the wild nest arrays at most once


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    dims: tuple[int, ...]
    """As stored: ne0 (the contiguous dimension) first."""
    qtype: str
    data: np.ndarray
    """Read-only view of the file bytes."""


@dataclass(frozen=True)
class GGUFHeader:
    version: int
    metadata: dict[str, Any]
    tensors: list[GGUFTensor]


class _Cursor:
    def __init__(self, buf: mmap.mmap, path: Path):
        self.buf, self.pos, self.size, self.path = buf, 0, len(buf), path

    def fail(self, what: str) -> ModelFormatError:
        return ModelFormatError(
            f"{self.path} is a corrupt or truncated GGUF file ({self.size} bytes): {what} "
            f"at byte {self.pos}"
        )

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"{what} runs past the end of the file")

    def scalar(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self.need(n, what)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v

    def string(self, what: str) -> str:
        n = self.scalar("<Q", what)
        self.need(n, what)
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def strings(self, count: int, what: str) -> list[str]:
        self.need(8 * count, what)  # every string has at least its 8-byte length
        buf, pos, size, out = self.buf, self.pos, self.size, [None] * count
        unpack = struct.Struct("<Q").unpack_from
        for i in range(count):
            if pos + 8 > size:
                self.pos = pos
                raise self.fail(f"{what}[{i}] runs past the end of the file")
            (n,) = unpack(buf, pos)
            pos += 8
            if pos + n > size:
                self.pos = pos
                raise self.fail(f"{what}[{i}] runs past the end of the file")
            out[i] = buf[pos : pos + n].decode("utf-8", errors="replace")
            pos += n
        self.pos = pos
        return out

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype], what)
        if vtype == 8:
            return self.string(what)
        if vtype == 9:
            etype = self.scalar("<I", what)
            count = self.scalar("<Q", what)
            if etype == 8:
                return self.strings(count, what)
            if etype in _ARRAY_DTYPES:
                dtype = np.dtype(_ARRAY_DTYPES[etype])
                self.need(count * dtype.itemsize, what)
                arr = np.frombuffer(self.buf, dtype, count, self.pos)
                self.pos += count * dtype.itemsize
                return arr.tolist()
            if etype == 9:  # arrays of arrays: bounded, a lying file must not exhaust the stack
                if depth >= MAX_ARRAY_DEPTH:
                    raise self.fail(f"{what} nests arrays more than {MAX_ARRAY_DEPTH} deep")
                return [self.value(9, f"{what}[{i}]", depth + 1) for i in range(count)]
            raise self.fail(f"{what} has unknown array element type {etype}")
        raise self.fail(f"{what} has unknown value type {vtype}")


def read_header(path: Path) -> GGUFHeader:
    """Parse `path`'s metadata and tensor table; tensor data stays in the (read-only) map."""
    try:
        with open(path, "rb") as f:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as e:  # ValueError: an empty file cannot be mapped
        raise ModelFormatError(f"cannot map {path}: {e}") from e
    cur = _Cursor(buf, path)
    cur.need(4, "magic")
    if buf[:4] != b"GGUF":
        raise ModelFormatError(
            f"{path} is not a GGUF file (starts with {buf[:4]!r}, expected b'GGUF')"
        )
    cur.pos = 4
    version = cur.scalar("<I", "version")
    if version not in (2, 3):
        raise ModelFormatError(f"{path}: GGUF version {version} is not supported (2 or 3)")
    n_tensors = cur.scalar("<Q", "tensor count")
    n_kv = cur.scalar("<Q", "metadata count")
    # Each key/value and tensor info takes at least 12 / 28 bytes: absurd counts fail here.
    cur.need(12 * n_kv + 28 * n_tensors, "the metadata and tensor table")
    metadata: dict[str, Any] = {}
    for i in range(n_kv):
        key = cur.string(f"metadata key {i}")
        if key in metadata:
            raise cur.fail(f"metadata key {key!r} appears twice")
        metadata[key] = cur.value(cur.scalar("<I", key), key)
    infos = []
    for i in range(n_tensors):
        name = cur.string(f"tensor name {i}")
        n_dims = cur.scalar("<I", name)
        if not 1 <= n_dims <= MAX_DIMS:
            raise cur.fail(f"tensor {name} has {n_dims} dimensions")
        dims = tuple(cur.scalar("<Q", name) for _ in range(n_dims))
        type_id = cur.scalar("<I", name)
        offset = cur.scalar("<Q", name)
        infos.append((name, dims, type_id, offset))
    _check_block_count(metadata, n_tensors, path)
    alignment = metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise ModelFormatError(f"{path}: general.alignment={alignment!r} is not a power of two")
    data_start = -(-cur.pos // alignment) * alignment
    whole = np.frombuffer(buf, np.uint8)
    tensors = [_tensor(whole, path, data_start, *info) for info in infos]
    return GGUFHeader(version, metadata, tensors)


def _check_block_count(metadata: dict[str, Any], n_tensors: int, path: Path) -> None:
    """Loaders loop over the layers the metadata declares: a file cannot have more layers than
    tensors (each has several), so a larger count is a lie to refuse before any loop."""
    arch = metadata.get("general.architecture")
    blocks = metadata.get(f"{arch}.block_count") if isinstance(arch, str) else None
    if isinstance(blocks, int) and blocks > n_tensors:
        raise ModelFormatError(
            f"{path}: {arch}.block_count={blocks}, but the file holds only {n_tensors} tensors"
        )


def _tensor(whole: np.ndarray, path: Path, start: int, name: str, dims, type_id: int, offset: int):
    if type_id not in GGML_TYPES:
        raise ModelFormatError(f"{path}: tensor {name} has unknown GGML type id {type_id}")
    qtype, block, type_size = GGML_TYPES[type_id]
    if any(d <= 0 for d in dims) or dims[0] % block:
        raise ModelFormatError(f"{path}: tensor {name} has bad dimensions {dims} for {qtype}")
    n = int(np.prod(dims, dtype=np.float64))
    nbytes = n // block * type_size
    begin = start + offset
    if begin + nbytes > whole.size:
        raise ModelFormatError(
            f"{path}: tensor {name} ({nbytes} bytes at offset {offset}) lies past the end of "
            f"the file ({whole.size} bytes; truncated?)"
        )
    raw = whole[begin : begin + nbytes]
    shape = tuple(reversed(dims))
    if qtype in _NUMPY_TYPES:
        data = raw.view(_NUMPY_TYPES[qtype]).reshape(shape)
    else:  # block types: rows of bytes, as gguf.GGUFReader shapes them
        data = raw.reshape(*shape[:-1], shape[-1] // block * type_size)
    return GGUFTensor(name, dims, qtype, data)


def check_tokenizer_metadata(meta: dict[str, Any], vocab_size: int) -> None:
    """The tokenizer.ggml.* values have the types the GGUF spec gives them and cover the model's
    vocabulary: a token id the model can emit has a token, and so do BOS and EOS."""
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise ModelFormatError("GGUF file has no tokenizer.ggml.tokens (a list of strings)")
    _check_list(meta, "tokenizer.ggml.tokens", str)
    if len(tokens) < vocab_size:
        raise ModelFormatError(
            f"the GGUF tokenizer has {len(tokens)} tokens, but the model's vocabulary has "
            f"{vocab_size}: ids {len(tokens)}..{vocab_size - 1} have no token"
        )
    for key, kind in (("token_type", int), ("scores", (int, float))):
        if _check_list(meta, f"tokenizer.ggml.{key}", kind) not in (None, len(tokens)):
            raise ModelFormatError(
                f"tokenizer.ggml.{key} has {len(meta[f'tokenizer.ggml.{key}'])} entries for "
                f"{len(tokens)} tokens"
            )
    _check_list(meta, "tokenizer.ggml.merges", str)
    for key in ("bos_token_id", "eos_token_id"):
        tid = meta.get(f"tokenizer.ggml.{key}")
        if tid is not None and (not isinstance(tid, int) or not 0 <= tid < len(tokens)):
            raise ModelFormatError(
                f"tokenizer.ggml.{key}={tid!r} is not a token id (0..{len(tokens) - 1})"
            )
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.chat_template"):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            raise ModelFormatError(f"{key}={meta[key]!r:.60} is not a string")


def _check_list(meta: dict[str, Any], key: str, kind) -> int | None:
    """len(meta[key]) if it is a list of `kind` values, None if absent; raises otherwise."""
    values = meta.get(key)
    if values is None:
        return None
    if not isinstance(values, list) or not all(
        isinstance(v, kind) and not isinstance(v, bool) for v in values
    ):
        raise ModelFormatError(f"{key} is not a list of {getattr(kind, '__name__', 'numbers')}")
    return len(values)
