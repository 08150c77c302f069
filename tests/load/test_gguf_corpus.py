"""Hand-made GGUF files that lie about themselves: each one must raise a MiaotuiError subclass
with a message naming the problem (no other exception, no hang, no allocation driven by a
declared count or size), opened the way `miaotui serve` opens a model (bench/fuzz_gguf.py's
`load_model_file`: header, checkpoint, tokenizer, every tensor decoded).

The files are written byte by byte here (GGUF v3, github.com/ggml-org/ggml docs/gguf.md); the
valid base file is checked against the `gguf` package's reader first, so that every case
differs from a file both readers accept only by the lie it tells."""

from __future__ import annotations

import struct
import tracemalloc
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pytest

from bench.fuzz_gguf import load_model_file
from miaotui.errors import MiaotuiError, ModelFormatError, UnsupportedModelError

pytestmark = pytest.mark.timeout(60)

# GGUF value type ids (gguf.md): scalars, 8 string, 9 array.
U32, I32, F32, STR, ARR, U64 = 4, 5, 6, 8, 9, 10
DIM, FFN, VOCAB = 8, 16, 16
TOKENS = [chr(ord("a") + i) for i in range(VOCAB - 2)] + ["ab", "<|endoftext|>"]


@dataclass(frozen=True)
class KV:
    key: str
    vtype: int
    value: object
    etype: int | None = None
    """Element type of an array."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dims: tuple[int, ...]
    """ne0 (contiguous) first, as stored."""
    type_id: int = 0
    offset: int | None = None
    """None: packed after the previous tensor (32-byte aligned)."""
    n_dims: int | None = None
    """None: len(dims)."""


@dataclass(frozen=True)
class Spec:
    kvs: tuple[KV, ...]
    tensors: tuple[TensorInfo, ...]
    magic: bytes = b"GGUF"
    version: int = 3
    n_tensors: int | None = None
    n_kv: int | None = None
    data: bytes | None = None
    """Tensor data; None: random floats of the right size."""
    boundaries: list[tuple[str, int]] = field(default_factory=list, compare=False)


def _str(s: str | bytes) -> bytes:
    raw = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(raw)) + raw


_FMT = {U32: "<I", I32: "<i", F32: "<f", U64: "<Q", 7: "<?"}


def _value(vtype: int, value, etype: int | None = None) -> bytes:
    if isinstance(value, bytes):  # raw bytes after a (possibly unknown) value type
        return value
    if vtype == STR:
        return _str(value)
    if vtype == ARR:
        body = b"".join(_value(etype, v) for v in value)
        return struct.pack("<IQ", etype, len(value)) + body
    return struct.pack(_FMT[vtype], value)


def _nbytes(t: TensorInfo) -> int:
    return int(np.prod(t.dims)) * 4  # the base file is all F32


def serialize(spec: Spec) -> tuple[bytes, list[tuple[str, int]]]:
    """The file's bytes and its section boundaries (label, offset)."""
    out = bytearray(spec.magic)
    marks = [("magic", len(out))]
    out += struct.pack("<I", spec.version)
    marks.append(("version", len(out)))
    out += struct.pack("<Q", len(spec.tensors) if spec.n_tensors is None else spec.n_tensors)
    out += struct.pack("<Q", len(spec.kvs) if spec.n_kv is None else spec.n_kv)
    marks.append(("counts", len(out)))
    for kv in spec.kvs:
        out += _str(kv.key)
        marks.append((f"key {kv.key}", len(out)))
        out += struct.pack("<I", kv.vtype) + _value(kv.vtype, kv.value, kv.etype)
        marks.append((f"value {kv.key}", len(out)))
    offset = 0
    for t in spec.tensors:
        out += _str(t.name)
        out += struct.pack("<I", len(t.dims) if t.n_dims is None else t.n_dims)
        out += b"".join(struct.pack("<Q", d) for d in t.dims)
        out += struct.pack("<IQ", t.type_id, offset if t.offset is None else t.offset)
        marks.append((f"tensor info {t.name}", len(out)))
        offset += -(-_nbytes(t) // 32) * 32
    out += bytes(-len(out) % 32)
    marks.append(("data start", len(out)))
    if spec.data is not None:
        out += spec.data
    else:
        rng = np.random.default_rng(0)
        for t in spec.tensors:
            out += rng.standard_normal(_nbytes(t) // 4).astype(np.float32).tobytes()
            out += bytes(-len(out) % 32)
            marks.append((f"data of {t.name}", len(out)))
    return bytes(out), marks


def base_spec() -> Spec:
    kvs = (
        KV("general.architecture", STR, "llama"),
        KV("llama.block_count", U32, 1),
        KV("llama.context_length", U32, 64),
        KV("llama.embedding_length", U32, DIM),
        KV("llama.feed_forward_length", U32, FFN),
        KV("llama.attention.head_count", U32, 2),
        KV("llama.attention.head_count_kv", U32, 1),
        KV("llama.attention.layer_norm_rms_epsilon", F32, 1e-5),
        KV("llama.vocab_size", U32, VOCAB),
        KV("tokenizer.ggml.model", STR, "gpt2"),
        KV("tokenizer.ggml.tokens", ARR, TOKENS, STR),
        KV("tokenizer.ggml.token_type", ARR, [1] * (VOCAB - 1) + [3], I32),
        KV("tokenizer.ggml.merges", ARR, ["a b"], STR),
        KV("tokenizer.ggml.eos_token_id", U32, VOCAB - 1),
    )
    b = "blk.0."
    tensors = (
        TensorInfo("token_embd.weight", (DIM, VOCAB)),
        TensorInfo("output_norm.weight", (DIM,)),
        TensorInfo(b + "attn_norm.weight", (DIM,)),
        TensorInfo(b + "attn_q.weight", (DIM, DIM)),
        TensorInfo(b + "attn_k.weight", (DIM, DIM // 2)),
        TensorInfo(b + "attn_v.weight", (DIM, DIM // 2)),
        TensorInfo(b + "attn_output.weight", (DIM, DIM)),
        TensorInfo(b + "ffn_norm.weight", (DIM,)),
        TensorInfo(b + "ffn_gate.weight", (DIM, FFN)),
        TensorInfo(b + "ffn_up.weight", (DIM, FFN)),
        TensorInfo(b + "ffn_down.weight", (FFN, DIM)),
    )
    return Spec(kvs, tensors)


def with_kv(spec: Spec, key: str, vtype: int | None = None, value=None, etype=None) -> Spec:
    """`spec` with `key` replaced (or removed when vtype is None, or appended if new)."""
    kvs = [kv for kv in spec.kvs if kv.key != key]
    if vtype is not None:
        kvs.append(KV(key, vtype, value, etype))
    return replace(spec, kvs=tuple(kvs))


def with_tensor(spec: Spec, index: int, **changes) -> Spec:
    tensors = list(spec.tensors)
    tensors[index] = replace(tensors[index], **changes)
    return replace(spec, tensors=tuple(tensors))


def write(tmp_path: Path, data: bytes, name: str = "case.gguf") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def assert_refused(path: Path, kind: type[MiaotuiError], *fragments: str) -> MiaotuiError:
    """Loading `path` raises `kind` whose message has every fragment, and allocates at most a
    small multiple of the file size (Python objects for its values) plus a fixed margin."""
    tracemalloc.start()
    try:
        with pytest.raises(MiaotuiError) as e:
            load_model_file(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(e.value, kind), f"{type(e.value).__name__}: {e.value}"
    message = str(e.value)
    for fragment in fragments:
        assert fragment in message, message
    assert peak < 64 * path.stat().st_size + (8 << 20), f"peak {peak} bytes"
    return e.value


# ---- the base file is valid for both readers ----------------------------------------------------


def test_base_file_loads_and_matches_the_gguf_reader(tmp_path):
    import gguf

    from miaotui.load.gguf_parse import read_header

    path = write(tmp_path, serialize(base_spec())[0])
    load_model_file(path)  # no exception
    ours, ref = read_header(path), gguf.GGUFReader(str(path))
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    for mine, theirs in zip(ours.tensors, ref.tensors):
        np.testing.assert_array_equal(mine.data, theirs.data)
    assert ours.metadata["tokenizer.ggml.tokens"] == TOKENS
    assert ref.fields["tokenizer.ggml.tokens"].contents() == TOKENS


# ---- the corpus ---------------------------------------------------------------------------------


def _boundaries() -> list[tuple[str, int]]:
    data, marks = serialize(base_spec())
    cuts = [(label, off) for label, off in marks if off < len(data)]
    cuts += [("inside the counts", 10), ("last byte missing", len(data) - 1)]
    return cuts


@pytest.mark.parametrize("label,cut", _boundaries(), ids=[b[0] for b in _boundaries()])
def test_truncated_at_every_section_boundary(tmp_path, label, cut):
    data = serialize(base_spec())[0][:cut]
    kind = ModelFormatError
    fragments = ("too small",) if cut < 8 else ()
    assert_refused(write(tmp_path, data), kind, *fragments)


BIG = 1 << 62


def _cases() -> dict[str, tuple[Spec | bytes, type[MiaotuiError], tuple[str, ...]]]:
    s = base_spec()
    valid = serialize(s)[0]
    nested = struct.pack("<IQ", ARR, 1) * 100_000 + struct.pack("<IQ", U32, 0)
    deep = bytearray(serialize(with_kv(s, "general.deep", U32, 0))[0])
    return {
        "wrong magic": (b"GGML" + valid[4:], ModelFormatError, ("not a GGUF file",)),
        "empty file": (b"", ModelFormatError, ("too small",)),
        "version 1": (replace(s, version=1), ModelFormatError, ("version 1",)),
        "version 99": (replace(s, version=99), ModelFormatError, ("version 99",)),
        "absurd tensor count": (replace(s, n_tensors=BIG), ModelFormatError, ("past the end",)),
        "absurd metadata count": (replace(s, n_kv=2**64 - 1), ModelFormatError, ("past the end",)),
        "absurd string length": (
            valid[:24] + struct.pack("<Q", BIG) + valid[32:],
            ModelFormatError,
            ("metadata key 0", "past the end"),
        ),
        "absurd array count": (
            _array_count_lie(valid, "tokenizer.ggml.token_type", BIG),
            ModelFormatError,
            ("tokenizer.ggml.token_type", "past the end"),
        ),
        "absurd string array count": (
            _array_count_lie(valid, "tokenizer.ggml.tokens", BIG),
            ModelFormatError,
            ("tokenizer.ggml.tokens", "past the end"),
        ),
        "arrays nested 100000 deep": (
            _replace_value(deep, "general.deep", struct.pack("<I", ARR) + nested),
            ModelFormatError,
            ("nests arrays",),
        ),
        "zero dimensions": (with_tensor(s, 1, dims=(), n_dims=0), ModelFormatError, ("0 dim",)),
        "five dimensions": (
            with_tensor(s, 1, dims=(DIM, 1, 1, 1, 1)),
            ModelFormatError,
            ("5 dimensions",),
        ),
        "absurd dimensions": (
            with_tensor(s, 3, dims=(1 << 40, 1 << 40)),
            ModelFormatError,
            ("attn_q", "past the end"),
        ),
        "dimensions overflowing 64 bits": (
            with_tensor(s, 3, dims=(2**64 - 1,) * 4),
            ModelFormatError,
            ("attn_q",),
        ),
        "a zero dimension": (with_tensor(s, 3, dims=(DIM, 0)), ModelFormatError, ("bad dim",)),
        "dimension not a multiple of the block": (
            with_tensor(s, 3, type_id=2, dims=(33, DIM)),
            ModelFormatError,
            ("Q4_0",),
        ),
        "offset past the end": (with_tensor(s, 5, offset=BIG), ModelFormatError, ("past the end",)),
        "offset just past the end": (
            with_tensor(s, 5, offset=len(valid)),
            ModelFormatError,
            ("attn_v", "past the end"),
        ),
        "duplicate tensor names": (
            with_tensor(s, 4, name="blk.0.attn_q.weight"),
            ModelFormatError,
            ("twice",),
        ),
        "duplicate metadata keys": (
            replace(s, kvs=(*s.kvs, KV("llama.block_count", U32, 1))),
            ModelFormatError,
            ("llama.block_count", "twice"),
        ),
        "unknown tensor type id": (
            with_tensor(s, 3, type_id=99),
            ModelFormatError,
            ("unknown GGML type id 99",),
        ),
        "unknown metadata value type": (
            with_kv(s, "general.x", 99, b""),
            ModelFormatError,
            ("unknown value type 99",),
        ),
        "unknown array element type": (
            _replace_value(
                bytearray(serialize(with_kv(s, "general.x", U32, 0))[0]),
                "general.x",
                struct.pack("<IIQ", ARR, 77, 0),
            ),
            ModelFormatError,
            ("unknown array element type 77",),
        ),
        "alignment not a power of two": (
            with_kv(s, "general.alignment", U32, 24),
            ModelFormatError,
            ("alignment",),
        ),
        "absurd block count": (
            with_kv(s, "llama.block_count", U64, BIG),
            ModelFormatError,
            ("block_count",),
        ),
        "no architecture": (with_kv(s, "general.architecture"), ModelFormatError, ("arch",)),
        "unknown architecture": (
            with_kv(s, "general.architecture", STR, "mamba"),
            UnsupportedModelError,
            ("mamba",),
        ),
        "head count a string": (
            with_kv(s, "llama.attention.head_count", STR, "two"),
            ModelFormatError,
            ("head_count",),
        ),
        "zero kv heads": (
            with_kv(s, "llama.attention.head_count_kv", U32, 0),
            MiaotuiError,
            (),
        ),
        "head count not dividing the q rows": (
            with_kv(s, "llama.attention.head_count", U32, 3),
            ModelFormatError,
            ("inconsistent GGUF metadata",),
        ),
        "norm epsilon a string": (
            with_kv(s, "llama.attention.layer_norm_rms_epsilon", STR, "tiny"),
            ModelFormatError,
            ("tiny",),
        ),
        "shape against the metadata": (
            with_tensor(s, 0, dims=(DIM, VOCAB - 1)),
            ModelFormatError,
            ("tok_embeddings", "shape"),
        ),
        "a layer's tensor missing": (
            replace(s, tensors=s.tensors[:3] + s.tensors[4:]),
            ModelFormatError,
            ("lacks tensors",),
        ),
        "tokenizer without tokens": (
            with_kv(s, "tokenizer.ggml.tokens"),
            ModelFormatError,
            ("tokenizer.ggml.tokens",),
        ),
        "tokenizer missing tokens": (
            with_kv(s, "tokenizer.ggml.tokens", ARR, TOKENS[:10], STR),
            ModelFormatError,
            ("10 tokens", "16"),
        ),
        "tokens not strings": (
            with_kv(s, "tokenizer.ggml.tokens", ARR, list(range(VOCAB)), U32),
            ModelFormatError,
            ("tokenizer.ggml.tokens",),
        ),
        "token types for fewer tokens": (
            with_kv(s, "tokenizer.ggml.token_type", ARR, [1] * 3, I32),
            ModelFormatError,
            ("token_type", "3 entries"),
        ),
        "eos id outside the tokens": (
            with_kv(s, "tokenizer.ggml.eos_token_id", U32, 1000),
            ModelFormatError,
            ("eos_token_id=1000",),
        ),
        "merge of a missing token": (
            with_kv(s, "tokenizer.ggml.merges", ARR, ["a c"], STR),
            ModelFormatError,
            ("tokenizer",),
        ),
        "unknown tokenizer model": (
            with_kv(s, "tokenizer.ggml.model", STR, "wordpiece"),
            UnsupportedModelError,
            ("wordpiece",),
        ),
    }


def _array_count_lie(data: bytes, key: str, count: int) -> bytes:
    """`data` with the element count of array `key` set to `count`."""
    at = data.index(_str(key)) + len(_str(key)) + 8  # after the key, value type, element type
    return data[:at] + struct.pack("<Q", count) + data[at + 8 :]


def _replace_value(data: bytearray, key: str, typed_value: bytes) -> bytes:
    """`data` with the u32 value of `key` (4 type + 4 value bytes) replaced by `typed_value`
    (a value type and its value), the metadata kept in place."""
    at = data.index(_str(key)) + len(_str(key))
    return bytes(data[:at] + typed_value + data[at + 8 :])


CASES = _cases()


@pytest.mark.parametrize("name", list(CASES))
def test_lying_file_raises_a_miaotui_error(tmp_path, name):
    content, kind, fragments = CASES[name]
    data = content if isinstance(content, bytes) else serialize(content)[0]
    assert_refused(write(tmp_path, data), kind, *fragments)


def test_every_case_differs_from_the_valid_file(tmp_path):
    """No case passes by accident of a broken base: each one's bytes differ from the base's,
    and the base loads."""
    valid = serialize(base_spec())[0]
    load_model_file(write(tmp_path, valid))
    for name, (content, _, _) in CASES.items():
        data = content if isinstance(content, bytes) else serialize(content)[0]
        assert data != valid, name
