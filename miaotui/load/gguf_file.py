"""GGUF model files, memory-mapped (gguf_parse.py): metadata -> ModelConfig, tensor names ->
ours (names.py), tensor bytes left in place until a layer is built."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from miaotui.config import ModelConfig, RopeScaling
from miaotui.errors import ModelFormatError, UnsupportedModelError
from miaotui.load.checkpoint import Checkpoint, TensorSource
from miaotui.load.gguf_parse import GGUFTensor, read_header
from miaotui.load.names import gguf_to_ours

log = logging.getLogger(__name__)


def read_gguf(path: Path) -> Checkpoint:
    """Open a GGUF file; raises ModelFormatError / UnsupportedModelError with a readable reason."""
    header = read_header(path)
    meta = header.metadata
    config = config_from_gguf(meta)
    tensors = _tensors(header.tensors, config)
    _check_complete(tensors, config, path)
    config = replace(config, tie_embeddings="output.weight" not in tensors)
    return Checkpoint(
        config=config,
        tensors=tensors,
        path=path,
        file_size=path.stat().st_size,
        tokenizer_source={k: v for k, v in meta.items() if k.startswith("tokenizer.")},
        metadata={k: v for k, v in meta.items() if k.startswith("general.") and _is_small(v)},
    )


def _is_small(v: Any) -> bool:
    return not isinstance(v, list) or len(v) < 16


def config_from_gguf(meta: dict[str, Any]) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch is None:
        raise ModelFormatError("GGUF file has no general.architecture")

    def get(key: str, default: Any = None) -> Any:
        v = meta.get(f"{arch}.{key}", default)
        if v is None:
            raise ModelFormatError(f"GGUF file lacks required metadata {arch}.{key}")
        return v

    if arch not in ("llama", "qwen2", "gemma3"):
        raise UnsupportedModelError(
            f"unknown architecture {arch!r} in GGUF file; supported: llama, qwen2, gemma3"
        )

    def positive(key: str, default: Any = None) -> int:
        v = get(key, default)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ModelFormatError(f"GGUF metadata {arch}.{key}={v!r} is not a positive integer")
        return v

    dim = positive("embedding_length")
    n_heads = positive("attention.head_count")
    for key in ("block_count", "feed_forward_length"):
        positive(key)
    head_dim = int(meta.get(f"{arch}.attention.key_length") or dim // n_heads)
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = int(meta.get(f"{arch}.vocab_size") or (len(tokens) if tokens else 0))
    common = dict(
        arch=arch,
        vocab_size=vocab,
        dim=dim,
        n_layers=int(get("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(meta.get(f"{arch}.attention.head_count_kv") or n_heads),
        head_dim=head_dim,
        intermediate_size=int(get("feed_forward_length")),
        norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(meta.get(f"{arch}.rope.freq_base") or 10000.0),
        rope_scaling=_rope_scaling(meta, arch),
        max_seq_len=int(get("context_length", 2048)),
    )
    if arch == "qwen2":
        common["qkv_bias"] = True
    if arch == "gemma3":
        # llama.cpp's gemma3 graph: GeGLU, sqrt(dim) embedding scale, q/k norms, sandwich norms,
        # local layers with base 10000 and a 6-layer pattern (5 local, 1 global).
        window = meta.get("gemma3.attention.sliding_window")
        common.update(
            activation="gelu_tanh",
            embed_scale=dim**0.5,
            qk_norm=True,
            sandwich_norm=True,
            sliding_window=int(window) if window else None,
            sliding_window_pattern=6,
            rope_local_theta=10000.0,
            final_logit_softcap=meta.get("gemma3.final_logit_softcapping"),
        )
    return ModelConfig(**common)


def _rope_scaling(meta: dict[str, Any], arch: str) -> RopeScaling:
    kind = meta.get(f"{arch}.rope.scaling.type")
    factor = meta.get(f"{arch}.rope.scaling.factor")
    if kind == "linear" and factor:
        return RopeScaling(kind="linear", factor=float(factor))
    return RopeScaling()


def _tensors(file_tensors: list[GGUFTensor], config: ModelConfig) -> dict[str, TensorSource]:
    out: dict[str, TensorSource] = {}
    for t in file_tensors:
        name = gguf_to_ours(t.name)
        if name is None:
            log.debug("ignoring GGUF tensor %s", t.name)
            continue
        if name in out:
            raise ModelFormatError(f"GGUF file has tensor {t.name} twice")
        shape = tuple(int(s) for s in reversed(t.dims))
        if len(shape) == 2 and shape[0] == 1 and len(t.data.shape) == 1:
            shape = (shape[1],)
        src = TensorSource(shape=_squeeze(shape), qtype=t.qtype, data=t.data)
        if config.arch == "llama" and name.endswith(("attention.wq.weight", "attention.wk.weight")):
            heads = config.n_heads if ".wq." in name else config.n_kv_heads
            src.row_perm = unpermute_rows(src.shape[0], heads)
        out[name] = src
    return out


def _squeeze(shape: tuple[int, ...]) -> tuple[int, ...]:
    while len(shape) > 1 and shape[0] == 1:
        shape = shape[1:]
    return shape


def unpermute_rows(rows: int, heads: int) -> torch.Tensor:
    """Row order that undoes llama.cpp's q/k permutation (convert_hf_to_gguf `permute`), giving
    the Hugging Face layout used with rotate-half RoPE."""
    half = rows // heads // 2
    # HF -> GGUF was reshape(heads, 2, half).swapaxes(1, 2); GGUF row g holds HF row perm[g].
    hf_of_gguf = torch.arange(rows).view(heads, 2, half).transpose(1, 2).reshape(rows)
    gguf_of_hf = torch.empty_like(hf_of_gguf)
    gguf_of_hf[hf_of_gguf] = torch.arange(rows)
    return gguf_of_hf


def _check_complete(tensors: dict[str, TensorSource], config: ModelConfig, path: Path) -> None:
    needed = ["tok_embeddings.weight", "norm.weight"]
    for i in range(config.n_layers):
        needed += [f"layers.{i}.attention.wq.weight", f"layers.{i}.feed_forward.w_down.weight"]
    missing = [n for n in needed if n not in tensors]
    if missing:
        raise ModelFormatError(f"{path} lacks tensors {missing[:4]} (truncated or not a model?)")
    for name, t in tensors.items():
        if t.data.size == 0 and t.numel > 0:
            raise ModelFormatError(f"{path}: tensor {name} has no data (truncated file?)")
    # Every loader path (float decode or native repack) must see the shapes the metadata
    # promises; the native path builds its modules from the tensors alone.
    for name, want in expected_shapes(config).items():
        got = tensors[name].shape if name in tensors else None
        if got is not None and tuple(got) != want:
            raise ModelFormatError(
                f"{path}: tensor {name} has shape {tuple(got)}, but the metadata implies {want}"
            )


def expected_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shapes (torch order) of the matrices of a model with config `c`."""
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    shapes = {
        "tok_embeddings.weight": (c.vocab_size, c.dim),
        "output.weight": (c.vocab_size, c.dim),
    }
    for i in range(c.n_layers):
        a, f = f"layers.{i}.attention", f"layers.{i}.feed_forward"
        shapes |= {
            f"{a}.wq.weight": (q, c.dim),
            f"{a}.wk.weight": (kv, c.dim),
            f"{a}.wv.weight": (kv, c.dim),
            f"{a}.wo.weight": (c.dim, q),
            f"{f}.w_gate.weight": (c.intermediate_size, c.dim),
            f"{f}.w_up.weight": (c.intermediate_size, c.dim),
            f"{f}.w_down.weight": (c.dim, c.intermediate_size),
        }
    return shapes


def check_tensor_type(name: str, qtype: str) -> None:
    from miaotui.load.quants import supported_types

    names = [t.name for t in supported_types()]
    if qtype not in names:
        raise UnsupportedModelError(
            f"tensor {name} uses type {qtype}, which miaotui cannot decode; "
            f"supported: {', '.join(names)}"
        )
