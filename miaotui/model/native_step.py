"""GGUF weights served by one native call per step (kernels/native_step.cpp).

The decoder's whole forward pass -- embedding, every layer's norm, q/k/v, RoPE, paged attention,
o, MLP, the final norm and the output head -- runs in C++ over the GGUF weight blocks (Q4_0,
Q4_1, Q8_0), with a persistent thread pool. Python only packs the step's tokens. At load the
linear weights' blocks are interleaved in groups of 8 rows (the same bytes, rearranged, never
decoded to float) and the file pages they came from are dropped from this process; the token
embedding is looked up row by row in the memory-mapped file. llama's q/k rows are put back into
rotate-half order first (`unpermute_rows`).

`build_native_step` returns None, with the reason logged, for anything it does not cover
(other block types such as Q4_K, gemma3's extra norms, sliding windows, soft-capping, a non-CPU
device); the caller then builds the per-module model instead.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from miaotui.config import ModelConfig
from miaotui.kernels.build import load_native
from miaotui.load.checkpoint import Checkpoint, TensorSource
from miaotui.model.attention import AttentionMetadata
from miaotui.model.kv_cache import KVCache
from miaotui.model.layers import Rotary

log = logging.getLogger(__name__)
_LIBC = ctypes.CDLL(None) if sys.platform == "linux" else None

# GGML type ids (ggml.h) the native step reads.
GGML_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 8}
BLOCK_TYPES = ("Q4_0", "Q4_1", "Q8_0")
LINEARS = {
    "wq": "attention.wq",
    "wk": "attention.wk",
    "wv": "attention.wv",
    "wo": "attention.wo",
    "w_gate": "feed_forward.w_gate",
    "w_up": "feed_forward.w_up",
    "w_down": "feed_forward.w_down",
}


class NativeStepModel:
    """Stands where a `Transformer` does for the runner: `model(ids, meta, cache, rows)`."""

    def __init__(
        self, config: ModelConfig, native, keep: list[torch.Tensor], n_kv_heads: int | None = None
    ):
        self.config = config
        self.native = native
        self.n_kv_heads = n_kv_heads or config.n_kv_heads  # this rank's, under tensor parallelism
        self._keep = keep  # tensors the native model points into (file views, perm copies)

    def kv_spec(self) -> tuple[int, torch.dtype, torch.device]:
        """(KV heads, dtype, device) of the cache the native step reads: float16 on the CPU
        (as llama.cpp's default; half the bytes a long context costs per decoded token). It
        also reads an Int8KVCache (`kv_dtype="int8"`: int8 rows, one scale per head)."""
        return self.n_kv_heads, torch.float16, torch.device("cpu")

    def parameters(self) -> list[torch.Tensor]:
        """The weight tensors (views of the file where possible), as nn.Module.parameters."""
        return list(self._keep)

    def buffers(self) -> list[torch.Tensor]:
        return []

    @property
    def threads(self) -> int:
        """Threads of the native step's pool."""
        return self.native.threads

    def __call__(
        self,
        input_ids: torch.Tensor,
        meta: AttentionMetadata,
        cache: KVCache,
        logits_index: torch.Tensor | None = None,
        num_layers: int | None = None,
    ) -> torch.Tensor:
        """input_ids (N,) -> logits (S, V) of the rows in `logits_index` (all when None), after
        the first `num_layers` layers (all when None; fewer: a self-draft, whose K/V writes are
        the ones the whole model makes for those layers)."""
        n = input_ids.shape[0]
        if logits_index is None:
            logits_index = torch.arange(n)
        return self.native.forward(
            input_ids.contiguous(),
            meta.positions.contiguous(),
            meta.seq_index.contiguous(),
            meta.block_table.contiguous(),
            meta.block_size,
            meta.slot_mapping.contiguous(),
            logits_index.to(torch.long).contiguous(),
            cache.k,
            cache.v,
            getattr(cache, "k_scale", []),  # an Int8KVCache: int8 rows, one scale per head
            getattr(cache, "v_scale", []),
            -1 if num_layers is None else num_layers,
        )

    def greedy_tokens(self) -> torch.Tensor | None:
        """(S,) the greedy token of each row of the last call's logits (torch.argmax's choice,
        found while the output head's results were in cache; -1 for a row holding a NaN), or
        None when this rank holds only part of the vocabulary."""
        tokens = self.native.greedy()
        return tokens if tokens.numel() else None

    def hidden_states(
        self, input_ids: torch.Tensor, meta: AttentionMetadata, cache: KVCache
    ) -> None:
        """Runs the step for its K/V writes only (a prefill chunk that samples nothing)."""
        self(input_ids, meta, cache, torch.empty(0, dtype=torch.long))


def unsupported_reason(ckpt: Checkpoint) -> str | None:
    """Why the native step cannot serve this checkpoint, or None if it can."""
    c = ckpt.config
    if c.arch not in ("llama", "qwen2"):
        return f"architecture {c.arch}"
    extras = {
        "q/k norms": c.qk_norm,
        "sandwich norms": c.sandwich_norm,
        "a sliding window": c.sliding_window is not None,
        "logit soft-capping": bool(c.final_logit_softcap),
        "an embedding scale": c.embed_scale != 1.0,
        "a query scale": c.query_scale is not None,
        f"activation {c.activation}": c.activation != "silu",
    }
    for what, present in extras.items():
        if present:
            return what
    for name in _linear_names(c):
        src = ckpt.tensors.get(name)
        if src is None or src.qtype not in BLOCK_TYPES or isinstance(src.data, torch.Tensor):
            return f"{name} is {src.qtype if src else 'missing'} (native step: {', '.join(BLOCK_TYPES)})"
    head = ckpt.tensors.get("output.weight", ckpt.tensors.get("tok_embeddings.weight"))
    if head is None or head.qtype not in BLOCK_TYPES:
        return f"output head is {head.qtype if head else 'missing'}"
    embed = ckpt.tensors.get("tok_embeddings.weight")
    if embed is None or embed.qtype not in GGML_TYPES:
        return f"token embedding is {embed.qtype if embed else 'missing'}"
    return None


@dataclass(frozen=True)
class NativeShard:
    """One tensor-parallel rank's rows of every linear (ranges [start, stop)), and the callback
    that gathers a stage's outputs from all ranks (kernels/native_step.cpp, `Shard`)."""

    heads: tuple[int, int]
    kv_heads: tuple[int, int]
    ffn: tuple[int, int]
    dim_rows: tuple[int, int]
    """Rows of wo and w_down (output channels of the model dimension)."""
    vocab: tuple[int, int]
    gather: Callable[[int, torch.Tensor], torch.Tensor]
    """gather(stage, local (N, w)) -> (N, full): every rank's part side by side."""

    def linear_rows(self, head_dim: int) -> dict[str, tuple[int, int]]:
        """The rows of each linear (and of the output head) this rank holds."""
        q = (self.heads[0] * head_dim, self.heads[1] * head_dim)
        kv = (self.kv_heads[0] * head_dim, self.kv_heads[1] * head_dim)
        return {
            "wq": q,
            "wk": kv,
            "wv": kv,
            "wo": self.dim_rows,
            "w_gate": self.ffn,
            "w_up": self.ffn,
            "w_down": self.dim_rows,
            "output": self.vocab,
        }


def build_native_step(
    ckpt: Checkpoint, threads: int, isa: str = "auto", shard: NativeShard | None = None
) -> NativeStepModel | None:
    """The native-step model of a GGUF checkpoint (this rank's part of it with a `shard`), or
    None (reason logged) if not covered."""
    reason = unsupported_reason(ckpt)
    ops = load_native() if reason is None else None
    if reason is None and ops is None:
        reason = "the native extension is unavailable"
    if reason is not None:
        log.info("native step not used: %s", reason)
        return None
    c = ckpt.config
    keep: list[torch.Tensor] = []
    rows = shard.linear_rows(c.head_dim) if shard else {}  # one process: every row

    def raw(name: str, key: str | None = None) -> tuple[torch.Tensor, int]:
        src = ckpt.tensors[name]
        start, stop = rows.get(key, (0, None))
        return _file_bytes(src)[start:stop], GGML_TYPES[src.qtype]

    def vec(name: str) -> torch.Tensor:
        src = ckpt.tensors[name]
        if src.qtype == "F32" and not isinstance(src.data, torch.Tensor):
            t = torch.from_numpy(np.array(src.data, dtype=np.float32).reshape(src.shape))
        else:
            t = src.to_float().contiguous()
        keep.append(t)
        return t

    rotary = Rotary(c.head_dim, c.max_seq_len, c.rope_theta, c.rope_scaling)
    keep += [rotary.cos, rotary.sin]
    embed, embed_type = raw("tok_embeddings.weight")  # every rank looks up the whole table
    keep.append(embed)  # looked up row by row in place; the linears are repacked by NativeModel
    head_name = "output.weight" if "output.weight" in ckpt.tensors else "tok_embeddings.weight"
    head, head_type = raw(head_name, "output")

    def span(key: str, n: int) -> int:  # this rank's count of heads / channels / rows
        return n if shard is None else getattr(shard, key)[1] - getattr(shard, key)[0]

    native = ops.NativeModel(
        c.dim,
        span("heads", c.n_heads),
        span("kv_heads", c.n_kv_heads),
        c.head_dim,
        span("ffn", c.intermediate_size),
        span("vocab", c.vocab_size),
        c.norm_eps,
        embed,
        embed_type,
        head,
        head_type,
        vec("norm.weight"),
        rotary.cos.contiguous(),
        rotary.sin.contiguous(),
        threads,
        isa,
        None
        if shard is None
        else ops.Shard(
            c.n_heads, c.intermediate_size, c.vocab_size, span("dim_rows", c.dim), shard.gather
        ),
    )
    if ckpt.tensors["tok_embeddings.weight"].row_perm is None:
        _drop_pages(embed)  # read by the head's repacking; lookups fault in only the rows used
    for i in range(c.n_layers):
        layer = {
            "attn_norm": vec(f"layers.{i}.attention_norm.weight"),
            "ffn_norm": vec(f"layers.{i}.ffn_norm.weight"),
        }
        for key, module in LINEARS.items():
            layer[key] = raw(f"layers.{i}.{module}.weight", key)
        for key in ("q", "k", "v"):
            bias = f"layers.{i}.attention.w{key}.bias"
            if bias in ckpt.tensors:
                start, stop = rows.get(f"w{key}", (0, None))
                layer[f"b{key}"] = vec(bias)[start:stop].contiguous()
        native.add_layer(layer)
        for key, module in LINEARS.items():  # repacked: the file views' pages can go
            if ckpt.tensors[f"layers.{i}.{module}.weight"].row_perm is None:
                _drop_pages(layer[key][0])
    log.info("native step: %d layers on %s, %d threads", c.n_layers, native.isa, native.threads)
    return NativeStepModel(c, native, keep, span("kv_heads", c.n_kv_heads))


def _linear_names(c: ModelConfig) -> list[str]:
    return [f"layers.{i}.{m}.weight" for i in range(c.n_layers) for m in LINEARS.values()]


def _drop_pages(t: torch.Tensor) -> None:
    """Drop the resident pages of a view of the read-only file map that NativeModel has repacked:
    the page cache keeps them, this process's RSS does not. Only for file views (on anonymous
    memory MADV_DONTNEED would zero it)."""
    page = mmap.PAGESIZE
    start = -(-t.data_ptr() // page) * page  # pages wholly inside the view only
    end = (t.data_ptr() + t.numel() * t.element_size()) // page * page
    if end > start and _LIBC is not None:
        _LIBC.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), mmap.MADV_DONTNEED)


def _file_bytes(src: TensorSource) -> torch.Tensor:
    """The tensor's bytes as a uint8 (rows, row_bytes) view of the file (a copy only when its
    rows must be permuted). F32/F16 embeddings are returned as float tensors."""
    data = np.asarray(src.data)
    if src.row_perm is not None:
        data = np.ascontiguousarray(data[src.row_perm.numpy()])
    with warnings.catch_warnings():  # the file view is read-only; the kernels never write it
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(data)
    if src.qtype in ("F32", "F16"):
        return t.reshape(src.shape).contiguous()
    return t.reshape(src.shape[0], -1)
