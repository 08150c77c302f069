"""Tensor parallelism (Megatron-LM, Shoeybi et al. 2019): every rank holds a slice of every layer.

    wq wk wv, w_gate w_up   column-parallel: rows split by heads / by MLP channels, no traffic
    wo, w_down              row-parallel: input columns split the same way, one all-reduce each
    tok_embeddings, output  vocabulary-parallel: rows split by token id; the embedding lookup is
                            one all-reduce of (N, C), the head gathers (S, V/tp) logits to rank 0

The vocabulary is split rather than replicated because on small models it is the largest single
matrix (SmolLM2-135M: 28M of 135M parameters) and its product is a fifth of the FLOPs per token;
splitting it halves both per rank for one gather of the sampled rows' logits per step.

KV heads are split in contiguous groups, each with its G query heads, so the KV cache is sharded
with them. The split may be uneven (SmolLM2 has 3 KV heads: 2 + 1 on two ranks); it only needs
at least one KV head per rank.

With GGUF block weights on the CPU the ranks run the one-call native step instead
(`build_native_tp_step`), split so that no dot product is ever cut: every linear is
column-parallel (wo and w_down by ranges of output channels over their whole input) and each
stage's outputs are all-gathered -- four gathers per layer rather than two all-reduces, and
greedy output bit-identical to one process.

Each rank reads only its slice of the file: rows of a GGUF tensor are contiguous byte rows, and
columns are cut at block boundaries (32 or 256 values) and trimmed after decoding at group
boundaries, so quantized weights are packed for the kernels without a float copy.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from miaotui.config import EngineConfig, ModelConfig
from miaotui.device import resolve_device, resolve_dtype
from miaotui.errors import InvalidRequestError
from miaotui.load.checkpoint import Checkpoint, TensorSource
from miaotui.model.build import build_model
from miaotui.model.native_step import NativeShard, NativeStepModel, build_native_step
from miaotui.model.quant_linear import QuantEmbedding
from miaotui.model.transformer import Transformer
from miaotui.parallel.dist import Comm

log = logging.getLogger(__name__)

# ---- slicing checkpoint tensors without decoding the rest ----------------------------------


@dataclass
class SlicedSource:
    """A column range of a decoded `base` (which was cut from the file at block boundaries)."""

    base: TensorSource
    col_start: int
    col_stop: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.base.shape[0], self.col_stop - self.col_start)

    @property
    def qtype(self) -> str:
        return self.base.qtype

    @property
    def nbytes(self) -> int:
        return self.base.nbytes

    def to_float(self) -> torch.Tensor:
        return self.base.to_float()[:, self.col_start : self.col_stop].contiguous()

    def to_affine(self):
        """Codes and scales of the column range, or None if it does not start and end on a
        group boundary (the caller then decodes to float)."""
        g = self.base.to_affine()
        if g is None:
            return None
        a, b, gs = self.col_start, self.col_stop, g.group_size
        if a % gs or b % gs:
            return None
        offset = None if g.offset is None else g.offset[:, a // gs : b // gs].contiguous()
        return dataclasses.replace(
            g,
            q=g.q[:, a:b].contiguous(),
            scale=g.scale[:, a // gs : b // gs].contiguous(),
            offset=offset,
        )


Source = TensorSource | SlicedSource


def block_elems(src: TensorSource) -> int:
    """Values per encoding block along a row (1 for float tensors)."""
    if isinstance(src.data, torch.Tensor):
        return 1
    import gguf

    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[src.qtype]][0]


def slice_rows(src: TensorSource, start: int, stop: int) -> TensorSource:
    """Rows start..stop (in the model's row order, after any GGUF q/k row permutation)."""
    if src.row_perm is not None:
        idx = src.row_perm[start:stop]
        data = src.data[idx] if isinstance(src.data, torch.Tensor) else src.data[idx.numpy()]
    elif isinstance(src.data, torch.Tensor):
        data = src.data[start:stop].clone()  # a view would keep the whole tensor alive
    else:
        data = src.data[start:stop]  # a view of the memory map: nothing read yet
    return TensorSource(shape=(stop - start, *src.shape[1:]), qtype=src.qtype, data=data)


def slice_cols(src: TensorSource, start: int, stop: int) -> Source:
    """Columns start..stop of a matrix: the covering whole blocks are read from the file, the
    exact range is cut after decoding."""
    m, k = src.shape
    bs = block_elems(src)
    b0, b1 = start // bs * bs, min(k, -(-stop // bs) * bs)
    if isinstance(src.data, torch.Tensor):
        data = src.data[:, b0:b1].clone()
    else:
        raw = np.asarray(src.data).reshape(m, -1)  # (rows, units): bytes or typed values
        units = raw.shape[1] // (k // bs)  # units per block
        data = raw[:, b0 // bs * units : b1 // bs * units]
    base = TensorSource(shape=(m, b1 - b0), qtype=src.qtype, data=data, row_perm=src.row_perm)
    if (b0, b1) == (start, stop):
        return base
    return SlicedSource(base, start - b0, stop - b0)


# ---- the shard plan ------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardPlan:
    """Which part of every tensor rank `rank` of `size` holds. Ranges are [start, stop)."""

    rank: int
    size: int
    kv_heads: tuple[int, int]
    """KV heads of this rank."""
    heads: tuple[int, int]
    """Query heads of this rank (the G query heads of each of its KV heads)."""
    ffn: tuple[int, int]
    """MLP intermediate channels of this rank."""
    vocab: tuple[int, int]
    """Token ids whose embedding rows and logits this rank holds."""
    vocab_chunk: int
    """Logit columns each rank contributes to the gather (padded to be equal)."""

    def local_config(self, c: ModelConfig) -> ModelConfig:
        """The config of this rank's slice: building a Transformer from it gives modules of the
        local shapes (attention with the local head counts)."""
        return dataclasses.replace(
            c,
            n_heads=_len(self.heads),
            n_kv_heads=_len(self.kv_heads),
            intermediate_size=_len(self.ffn),
            vocab_size=_len(self.vocab),
        )

    def slice(self, name: str, src: TensorSource, c: ModelConfig) -> Source:
        """This rank's part of checkpoint tensor `name`."""
        D = c.head_dim
        if name in ("tok_embeddings.weight", "output.weight"):
            return slice_rows(src, *self.vocab)
        if ".attention.wq." in name:
            return slice_rows(src, self.heads[0] * D, self.heads[1] * D)
        if ".attention.wk." in name or ".attention.wv." in name:
            return slice_rows(src, self.kv_heads[0] * D, self.kv_heads[1] * D)
        if name.endswith("attention.wo.weight"):
            return slice_cols(src, self.heads[0] * D, self.heads[1] * D)
        if ".feed_forward.w_gate." in name or ".feed_forward.w_up." in name:
            return slice_rows(src, *self.ffn)
        if name.endswith("feed_forward.w_down.weight"):
            return slice_cols(src, *self.ffn)
        return src  # norms: replicated


def _len(r: tuple[int, int]) -> int:
    return r[1] - r[0]


def make_shard_plan(ckpt: Checkpoint, rank: int, size: int) -> ShardPlan:
    """Split heads, MLP channels and vocabulary of `ckpt` over `size` ranks."""
    c = ckpt.config
    if c.n_kv_heads < size:
        raise InvalidRequestError(
            f"tensor_parallel_size={size} needs at least {size} KV heads to split, but "
            f"{c.arch} has n_kv_heads={c.n_kv_heads}; use a tensor parallel size of at most "
            f"{c.n_kv_heads}",
            "tensor_parallel_size",
        )
    kv = _split(c.n_kv_heads, size, 1)[rank]
    group = c.n_heads // c.n_kv_heads
    # MLP channel boundaries fall on whole blocks of w_down's encoding, so each rank's columns
    # are whole blocks of the file and whole groups of the packed kernel layout.
    align = max(
        (block_elems(t) for n, t in ckpt.tensors.items() if n.endswith("w_down.weight")), default=1
    )
    if c.intermediate_size < size * align:
        align = 1
    chunk = -(-c.vocab_size // size)
    v0 = min(c.vocab_size, rank * chunk)
    return ShardPlan(
        rank=rank,
        size=size,
        kv_heads=kv,
        heads=(kv[0] * group, kv[1] * group),
        ffn=_split(c.intermediate_size, size, align)[rank],
        vocab=(v0, min(c.vocab_size, v0 + chunk)),
        vocab_chunk=chunk,
    )


def _split(n: int, parts: int, align: int) -> list[tuple[int, int]]:
    """`parts` contiguous ranges covering 0..n, as equal as whole multiples of `align` allow."""
    bounds = [round(n * i / parts / align) * align for i in range(parts)] + [n]
    return list(zip(bounds[:-1], bounds[1:]))


# ---- the modules that talk ------------------------------------------------------------------


class RowParallel(nn.Module):
    """A linear layer holding a range of input columns: the partial products of all ranks sum
    to the full product (one all-reduce of (N, C))."""

    def __init__(self, inner: nn.Module, comm: Comm):
        super().__init__()
        self.inner, self.comm = inner, comm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.comm.all_reduce(self.inner(x))


class VocabParallelEmbedding(nn.Module):
    """Embedding rows of token ids start..start+n: ids elsewhere give zeros, and the sum over
    ranks (one all-reduce) is the full lookup."""

    def __init__(self, inner: nn.Module, start: int, comm: Comm):
        super().__init__()
        self.inner, self.start, self.comm = inner, start, comm
        self.num = inner.num_embeddings

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        inside = (local >= 0) & (local < self.num)
        x = self.inner(local.clamp(0, self.num - 1))  # (N, C)
        x = x.masked_fill(~inside.unsqueeze(-1), 0.0)
        return self.comm.all_reduce(x)


class VocabParallelHead(nn.Module):
    """Output projection onto this rank's vocabulary rows; rank 0 gathers the full (S, V)
    logits (the sampler runs there), other ranks return their own (S, V/tp) part."""

    def __init__(self, inner: nn.Module, vocab_size: int, chunk: int, comm: Comm):
        super().__init__()
        self.inner, self.vocab_size, self.chunk, self.comm = inner, vocab_size, chunk, comm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)  # (S, V/tp)
        if y.shape[-1] < self.chunk:
            y = F.pad(y, (0, self.chunk - y.shape[-1]))
        parts = self.comm.gather_to_driver(y.contiguous())
        if parts is None:
            return y
        return torch.cat(parts, dim=-1)[..., : self.vocab_size]  # (S, V)


# ---- building a rank's model ------------------------------------------------------------------


def build_from_sources(
    ckpt: Checkpoint,
    config: ModelConfig,
    sources: dict[str, Source],
    cfg: EngineConfig,
    drop: frozenset[str] = frozenset(),
) -> Transformer:
    """A Transformer of `config` whose parameters come from `sources` (sliced or renamed
    checkpoint tensors), built by the one model builder (model/build.py) as `cfg.weights` says.
    Parameters named in `drop` are not loaded (left on the meta device for the caller)."""
    device, dtype = resolve_device(cfg.device), resolve_dtype(cfg.device)
    view = dataclasses.replace(ckpt, config=config, tensors=sources)
    return build_model(view, device, dtype, cfg.weights, progress=cfg.progress, drop=drop)


def build_tp_model(ckpt: Checkpoint, cfg: EngineConfig, comm: Comm) -> Transformer:
    """This rank's tensor-parallel slice of the model, reading only its slice of the file."""
    plan = make_shard_plan(ckpt, comm.rank, comm.world_size)
    c = ckpt.config
    sources = {name: plan.slice(name, src, c) for name, src in ckpt.tensors.items()}
    model = build_from_sources(ckpt, plan.local_config(c), sources, cfg)
    for block in model.layers:
        block.attention.wo = RowParallel(block.attention.wo, comm)
        block.feed_forward.w_down = RowParallel(block.feed_forward.w_down, comm)
    model.tok_embeddings = VocabParallelEmbedding(model.tok_embeddings, plan.vocab[0], comm)
    model.output = VocabParallelHead(model.output, c.vocab_size, plan.vocab_chunk, comm)
    model.config = c  # the engine sees the whole model (vocabulary, KV geometry)
    log.info(
        "rank %d: heads %s, kv heads %s, ffn %s, vocab %s; read %.1f MB of the file",
        comm.rank,
        plan.heads,
        plan.kv_heads,
        plan.ffn,
        plan.vocab,
        source_bytes(sources) / 1e6,
    )
    return model


@dataclass(frozen=True)
class StageGather:
    """The native step's gather callback: every rank's column range of a stage's output side by
    side. widths[stage][r] is rank r's width; stages in kernels/native_step.cpp's GATHER_* order
    (attention heads, o's rows, MLP channels, down's rows, logits). Logits go to the driver only."""

    comm: Comm
    widths: tuple[tuple[int, ...], ...]
    LOGITS = 4

    def __call__(self, stage: int, part: torch.Tensor) -> torch.Tensor:
        widths = self.widths[stage]  # part: (N, widths[rank])
        padded = F.pad(part, (0, max(widths) - part.shape[1])).contiguous()
        if stage == self.LOGITS:
            parts = self.comm.gather_to_driver(padded)
            if parts is None:
                return part  # a worker: its own logits, unused
        else:
            parts = self.comm.all_gather(padded)
        return torch.cat([p[:, :w] for p, w in zip(parts, widths)], dim=1).contiguous()


def build_native_tp_step(ckpt: Checkpoint, threads: int, comm: Comm) -> NativeStepModel | None:
    """This rank's part of the native step (model/native_step.py), or None if the checkpoint
    is not one it runs. Shard boundaries: the shard plan's heads, MLP channels and vocabulary,
    and the model dimension split in groups of 8 rows (the kernels' row groups)."""
    c, D, size = ckpt.config, ckpt.config.head_dim, comm.world_size
    plans = [make_shard_plan(ckpt, r, size) for r in range(size)]
    dim_rows = _split(c.dim, size, 8)
    per_rank = (
        [p.heads for p in plans],
        dim_rows,
        [p.ffn for p in plans],
        dim_rows,
        [p.vocab for p in plans],
    )
    widths = tuple(
        tuple(_len(r) * (D if stage == 0 else 1) for r in ranges)
        for stage, ranges in enumerate(per_rank)
    )
    plan = plans[comm.rank]
    shard = NativeShard(
        heads=plan.heads,
        kv_heads=plan.kv_heads,
        ffn=plan.ffn,
        dim_rows=dim_rows[comm.rank],
        vocab=plan.vocab,
        gather=StageGather(comm, widths),
    )
    return build_native_step(ckpt, threads, shard=shard)


def source_bytes(sources: dict[str, Source]) -> int:
    """Bytes of the file the given sources read."""
    return sum(s.nbytes for s in sources.values())


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the weights a (sharded) model holds in memory, each storage counted once;
    non-persistent buffers (RoPE tables) are left out."""
    seen: set[int] = set()
    total = 0
    tensors = [p for p in model.parameters()]
    for mod in model.modules():
        persistent = {n for n in mod._buffers if n not in mod._non_persistent_buffers_set}
        tensors += [b for n, b in mod._buffers.items() if b is not None and n in persistent]
        if isinstance(mod, QuantEmbedding):
            p = mod.packed
            tensors += [
                t for t in (p.qweight, p.scale, getattr(p, "offset", None)) if t is not None
            ]
    for t in tensors:
        if t.device.type == "meta":
            continue
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
    return total
