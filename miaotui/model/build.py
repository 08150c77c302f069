"""Checkpoint -> ready-to-run Transformer, the one model builder. The model is created on the
meta device (no random init, no memory), then each module is filled from the file:

    float        every tensor decoded to `dtype`
    native       GGUF block-quantized linears repacked into the int4/int8 kernel layouts
                 (exactly, no re-quantization, never a float copy; memory stays near the file
                 size): Q4_0, Q4_1, Q4_K -> int4 groups of 32 (Q4_0 symmetric, the others with
                 offsets); Q8_0, Q5_0, Q6_K, Q3_K -> int8 groups (32 or 16); other encodings
                 are decoded to float
    saved        a transformed checkpoint (load/transformed.py) rebuilt module by module as it
                 was saved: packed codes, W8A8, CSR, pruned shapes
    a slice      tensor / pipeline parallel ranks pass a view of the checkpoint with their
                 local config and sliced or renamed tensors (parallel/tp.py, parallel/pp.py)
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from miaotui.config import ModelConfig
from miaotui.errors import ModelFormatError
from miaotui.kernels import PackedInt4, PackedInt8, pack_int4, pack_int8
from miaotui.load.checkpoint import Checkpoint
from miaotui.load.gguf_file import check_tensor_type
from miaotui.load.transformed import is_transformed
from miaotui.model.layers import Rotary
from miaotui.model.quant_linear import QuantEmbedding, QuantLinear, W8A8Linear
from miaotui.model.sparse_linear import SparseLinear
from miaotui.model.transformer import Transformer

log = logging.getLogger(__name__)
LINEAR_SUFFIXES = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


def build_model(
    ckpt: Checkpoint,
    device: torch.device,
    dtype: torch.dtype,
    weights: str = "float",
    progress: bool = False,
    drop: frozenset[str] = frozenset(),
) -> Transformer:
    """The model of `ckpt` on `device`, float parameters in `dtype`. A saved transformed
    checkpoint is rebuilt as saved; otherwise `weights` is "native" or "packed" (GGUF quantized
    linears run packed; the one-call native step is model/native_step.py) or "float". Parameters named in `drop` are not loaded: they stay on the meta device
    for the caller (a pipeline stage without the embedding or the head)."""
    if is_transformed(ckpt):
        return _build_saved(ckpt, device, dtype)
    packed = {}
    if weights in ("native", "packed"):
        packed = {n: p for n in _candidates(ckpt, drop) if (p := pack_tensor(ckpt, n)) is not None}
    model = _build_float(ckpt, device, dtype, progress, skip=frozenset(packed) | drop)
    for name, p in packed.items():
        module_name = name.removesuffix(".weight")
        if module_name == "tok_embeddings":
            model.tok_embeddings = QuantEmbedding(p, dtype)
            if ckpt.config.tie_embeddings:
                model.output = QuantLinear(p)
            continue
        bias = getattr(model.get_submodule(module_name), "bias", None)
        _set(model, module_name, QuantLinear(p, bias))
    if packed:
        log.info("packed %d tensors natively", len(packed))
    return model


# --- float and native -------------------------------------------------------------------------


def _build_float(
    ckpt: Checkpoint, device: torch.device, dtype: torch.dtype, progress: bool, skip: frozenset[str]
) -> Transformer:
    """Every parameter not in `skip` decoded to `dtype` on `device`."""
    config = ckpt.config
    model = _meta_model(config)
    _materialize_rotary(model, device)
    params = dict(model.named_parameters())
    names = [
        n for n in params if n not in skip and not (n == "output.weight" and config.tie_embeddings)
    ]
    for name in _progress(names, progress, "decoding weights"):
        src = ckpt.tensors.get(name)
        if src is None:
            raise ModelFormatError(f"{ckpt.path}: missing tensor {name}")
        check_tensor_type(name, src.qtype)
        expected = tuple(params[name].shape)
        if tuple(src.shape) != expected:
            raise ModelFormatError(
                f"{ckpt.path}: tensor {name} has shape {tuple(src.shape)}, expected {expected}"
            )
        value = src.to_float().to(device=device, dtype=dtype)
        _set(model, name, nn.Parameter(value, requires_grad=False))
    if config.tie_embeddings and "tok_embeddings.weight" not in skip:
        model.output.weight = model.tok_embeddings.weight
    return model.eval()


def _candidates(ckpt: Checkpoint, drop: frozenset[str]) -> list[str]:
    """Tensors that may run packed: the embedding, the head and the block linears."""
    names = ["tok_embeddings.weight", "output.weight"]
    for i in range(ckpt.config.n_layers):
        names += [f"layers.{i}.attention.{s}.weight" for s in LINEAR_SUFFIXES[:4]]
        names += [f"layers.{i}.feed_forward.{s}.weight" for s in LINEAR_SUFFIXES[4:]]
    return [n for n in names if n in ckpt.tensors and n not in drop]


def pack_tensor(ckpt: Checkpoint, name: str) -> PackedInt4 | PackedInt8 | None:
    """The kernel layout of a GGUF block tensor, or None if it must be decoded to float."""
    groups = ckpt.tensors[name].to_affine()
    if groups is None:
        return None
    if groups.q.dtype == torch.uint8 and groups.group_size % 32 == 0:  # 4-bit codes 0..15
        offset = None if groups.symmetric_zero == 8 else groups.offset
        return pack_int4(groups.q, groups.scale, offset, groups.group_size)
    if groups.offset is None and groups.group_size % 16 == 0:
        return pack_int8(groups.q, groups.scale, groups.group_size)
    return None


# --- a saved transformed checkpoint -----------------------------------------------------------


def _build_saved(ckpt: Checkpoint, device: torch.device | str, dtype: torch.dtype) -> Transformer:
    """Float parameters in `dtype`, packed tensors as saved. Module shapes come from the saved
    tensors, not from the config."""
    manifest = ckpt.metadata["miaotui.manifest"]
    raw = {n: s.data for n, s in ckpt.tensors.items()}
    for alias, target in manifest.get("aliases", {}).items():
        raw[alias] = raw[target]
    tensors = _Tensors(raw, dtype)
    model = _meta_model(ckpt.config)
    for name, lay in manifest["modules"].items():
        _set(model, name, _saved_module(name, lay, tensors, dtype))
    for name, p in list(model.named_parameters()):
        if p.is_meta:
            _set(model, name, nn.Parameter(tensors.float(name), requires_grad=False))
    for block, facts in zip(model.layers, manifest["layers"]):
        _apply_layer_facts(block, facts, ckpt.config.head_dim)
    _materialize_rotary(model, torch.device(device))
    missing = [
        n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta
    ]
    if missing:
        raise ModelFormatError(f"{ckpt.path}: no saved tensors for {', '.join(missing[:5])}")
    return model.to(device).eval()


class _Tensors:
    """Saved tensors by name; float ones converted to the model dtype once (aliases share)."""

    def __init__(self, raw: dict[str, torch.Tensor], dtype: torch.dtype):
        self.raw, self.dtype, self._converted = raw, dtype, {}

    def get(self, name: str) -> torch.Tensor:
        if name not in self.raw:
            raise ModelFormatError(f"checkpoint lacks tensor {name}")
        return self.raw[name]

    def float(self, name: str) -> torch.Tensor:
        t = self.get(name)
        if id(t) not in self._converted:
            self._converted[id(t)] = t.to(self.dtype)
        return self._converted[id(t)]


def _saved_module(
    name: str, lay: dict[str, Any], tensors: _Tensors, dtype: torch.dtype
) -> nn.Module:
    kind = lay["kind"]
    bias = tensors.get(f"{name}.bias").float() if lay.get("bias") else None
    if kind in ("int8", "int4", "embedding-int8", "embedding-int4"):
        q, s = tensors.get(f"{name}.qweight"), tensors.get(f"{name}.scale")
        g = int(lay["group_size"])
        if kind.endswith("int8"):
            packed: PackedInt8 | PackedInt4 = PackedInt8(q, s, g)
        else:
            off = None if lay.get("symmetric", True) else tensors.get(f"{name}.offset")
            packed = PackedInt4(q, s, off, g)
        if kind.startswith("embedding"):
            return QuantEmbedding(packed, dtype)
        return QuantLinear(packed, bias)
    if kind == "w8a8":
        return W8A8Linear(tensors.get(f"{name}.qweight"), tensors.get(f"{name}.scale"), bias)
    if kind == "float":
        w = tensors.float(f"{name}.weight")
        lin = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device="meta")
        lin.weight = nn.Parameter(w, requires_grad=False)
        if bias is not None:
            lin.bias = nn.Parameter(tensors.float(f"{name}.bias"), requires_grad=False)
        return lin
    if kind == "embedding-float":
        w = tensors.float(f"{name}.weight")
        emb = nn.Embedding(w.shape[0], w.shape[1], _weight=w)
        emb.weight.requires_grad_(False)
        return emb
    if kind == "csr":
        m, k = lay["shape"]
        crow, col = tensors.get(f"{name}.crow_indices"), tensors.get(f"{name}.col_indices")
        vals = tensors.get(f"{name}.values")
        csr = torch.sparse_csr_tensor(crow, col, vals, size=(m, k), check_invariants=False)
        dense = csr.to_dense().to(dtype)
        return SparseLinear(dense, None if bias is None else tensors.float(f"{name}.bias"))
    raise ModelFormatError(f"module {name}: unknown layout kind {kind!r}")


def _apply_layer_facts(block: nn.Module, facts: dict[str, Any], head_dim: int) -> None:
    """Heads from the saved projection shapes (pruning may change them per layer); sliding and
    the KV-cache index from the manifest (pruning layers renumbers them)."""
    att = block.attention
    att.n_heads = int(getattr(att.wq, "out_features", 0)) // head_dim or facts["n_heads"]
    att.n_kv_heads = int(getattr(att.wk, "out_features", 0)) // head_dim or facts["n_kv_heads"]
    att.layer = int(facts.get("cache_layer", att.layer))
    block.sliding = att.sliding = bool(facts.get("sliding", block.sliding))


# --- shared -----------------------------------------------------------------------------------


_PARAM_FACTORIES = (torch.empty, torch.zeros, torch.ones, torch.full)


class _MetaParams(TorchFunctionMode):
    """Modules created inside get their parameters on the meta device, uninitialised (there are
    no values to initialise). Not `with torch.device("meta")`: meta `normal_` and `arange` run
    Python reference kernels that import torch._dynamo and sympy (~1 s, 100 MB) for nothing.
    Other tensors (the RoPE tables, replaced by `_materialize_rotary`) are built on the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]
        if func in _PARAM_FACTORIES and kwargs.get("device") is None:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


def _meta_model(config: ModelConfig) -> Transformer:
    with _MetaParams():
        return Transformer(config)


def _set(root: nn.Module, name: str, value: nn.Module | nn.Parameter) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, value)


def _materialize_rotary(model: Transformer, device: torch.device) -> None:
    c = model.config
    with torch.device(device):
        model.rotary = Rotary(c.head_dim, c.max_seq_len, c.rope_theta, c.rope_scaling)
        if model.rotary_local is not None:
            model.rotary_local = Rotary(
                c.head_dim, c.max_seq_len, c.rope_local_theta, type(c.rope_scaling)()
            )


def _progress(items: list[str], enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="tensor", leave=False)
