"""Transformed checkpoints: a directory with

    model.safetensors   the state dict as it runs: float tensors, packed int8/int4 codes with
                        their scales/offsets, W8A8 codes, CSR parts; a tensor shared by two
                        modules (tied head) is stored once and listed under "aliases"
    miaotui.json        ModelConfig (with any changed shapes), the layout of every linear and
                        embedding (float / int8 / int4 / w8a8 / csr, group size, shape, bias),
                        per-layer facts (heads, KV heads, MLP width, sliding, KV-cache index),
                        the transform spec string and the source file
    tokenizer           tokenizer.json (+ tokenizer_config.json) copied from a HF source, or
                        tokenizer_gguf.json: the GGUF tokenizer metadata

`save_transformed` writes it, `load_transformed` (or `--model DIR`, `LLM(model=DIR)`, through
engine/loader.py) rebuilds exactly the modules that were saved, with shapes read from the saved
tensors, so the reloaded model gives identical logits; nothing is re-quantized or decoded to
float. Pruned models (fewer layers, heads or MLP channels, different per layer) reload too.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from miaotui.config import ModelConfig, RopeScaling
from miaotui.errors import ModelFormatError
from miaotui.kernels import PackedInt4, PackedInt8
from miaotui.load.checkpoint import Checkpoint, TensorSource
from miaotui.model.layers import Rotary
from miaotui.model.transformer import Transformer
from miaotui.transforms.quant_linear import QuantEmbedding, QuantLinear
from miaotui.transforms.w8a8 import W8A8Linear

MANIFEST = "miaotui.json"
WEIGHTS = "model.safetensors"
GGUF_TOKENIZER = "tokenizer_gguf.json"
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
FORMAT_VERSION = 1
_QTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int8: "I8"}


def is_transformed_dir(path: Path) -> bool:
    return path.is_dir() and (path / MANIFEST).is_file()


# --- save -------------------------------------------------------------------------------------


def save_transformed(model: Transformer, ckpt: Checkpoint, out: Path, specs: str) -> None:
    """Write `model` (as transformed from `ckpt` by `specs`) to the directory `out`."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors, aliases = _dedupe(model.state_dict())
    manifest = {
        "format": "miaotui",
        "version": FORMAT_VERSION,
        "transforms": specs,
        "source": str(ckpt.path),
        "name": ckpt.metadata.get("general.name", ""),
        "config": dataclasses.asdict(model.config),
        "modules": {n: lay for n, m in model.named_modules() if (lay := module_layout(m))},
        "layers": [_layer_facts(b) for b in model.layers],
        "aliases": aliases,
        "tokenizer": _save_tokenizer(ckpt, out),
    }
    save_file(tensors, str(out / WEIGHTS), metadata={"format": "pt", "miaotui.transforms": specs})
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))


def module_layout(m: nn.Module) -> dict[str, Any] | None:
    """How one linear / embedding is stored, or None for other modules."""
    if isinstance(m, (QuantLinear, QuantEmbedding)):
        p = m.packed
        kind = "int8" if isinstance(p, PackedInt8) else "int4"
        bias = getattr(m, "bias", None) is not None
        lay = {"kind": kind, "shape": list(p.shape), "group_size": p.group_size, "bias": bias}
        if isinstance(p, PackedInt4):
            lay["symmetric"] = p.offset is None
        if isinstance(m, QuantEmbedding):
            lay["kind"] = f"embedding-{kind}"
        return lay
    if isinstance(m, W8A8Linear):
        return {"kind": "w8a8", "shape": list(m.qweight.shape), "bias": m.bias is not None}
    if isinstance(m, nn.Linear):
        return {"kind": "float", "shape": list(m.weight.shape), "bias": m.bias is not None}
    if isinstance(m, nn.Embedding):
        return {"kind": "embedding-float", "shape": list(m.weight.shape)}
    if type(m).__name__ == "SparseLinear":
        shape = [m.out_features, m.in_features]
        return {"kind": "csr", "shape": shape, "bias": m.bias is not None}
    return None


def _layer_facts(block: nn.Module) -> dict[str, Any]:
    att, mlp = block.attention, block.feed_forward
    return {
        "n_heads": att.n_heads,
        "n_kv_heads": att.n_kv_heads,
        "intermediate_size": _out_features(mlp.w_up),
        "sliding": bool(block.sliding),
        "cache_layer": att.layer,
    }


def _out_features(m: nn.Module) -> int:
    return int(getattr(m, "out_features", 0))


def _dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Contiguous tensors with no storage shared (safetensors refuses it); exact duplicates (a
    tied head) become aliases of the first name, partial overlaps are copied."""
    kept: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    by_view: dict[tuple, str] = {}
    storages: set[int] = set()
    for name, t in state.items():
        t = t.detach()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.shape, t.stride(), t.dtype)
        if key in by_view:
            aliases[name] = by_view[key]
            continue
        by_view[key] = name
        ptr = t.untyped_storage().data_ptr()
        t = t.clone() if ptr in storages or not t.is_contiguous() else t
        storages.add(ptr)
        kept[name] = t.cpu()
    return kept, aliases


def _save_tokenizer(ckpt: Checkpoint, out: Path) -> str:
    src = ckpt.tokenizer_source
    if isinstance(src, Path):
        for f in HF_TOKENIZER_FILES:
            if (src / f).is_file() and (src / f).resolve() != (out / f).resolve():
                shutil.copyfile(src / f, out / f)
        return "hf" if (out / HF_TOKENIZER_FILES[0]).is_file() else "none"
    meta = dict(src or {})
    arch = ckpt.metadata.get("general.architecture")
    if arch is not None:  # SentencePiece decoding depends on it (tokenizer.from_gguf_metadata)
        meta.setdefault("general.architecture", arch)
    (out / GGUF_TOKENIZER).write_text(json.dumps(meta, default=_jsonable))
    return "gguf-metadata"


def _jsonable(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"cannot write {type(o).__name__} to JSON")


# --- load -------------------------------------------------------------------------------------


def read_transformed(path: Path) -> Checkpoint:
    """Open a transformed checkpoint: config, tensors (read into memory once) and tokenizer."""
    from safetensors.torch import load_file

    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        tensors = load_file(str(path / WEIGHTS))
    except (OSError, json.JSONDecodeError) as e:
        raise ModelFormatError(f"{path} is not a readable miaotui checkpoint: {e}") from e
    except Exception as e:  # safetensors raises its own error types on a damaged file
        raise ModelFormatError(f"{path / WEIGHTS} is not a readable safetensors file: {e}") from e
    if manifest.get("format") != "miaotui" or manifest.get("version") != FORMAT_VERSION:
        raise ModelFormatError(
            f"{path / MANIFEST}: format {manifest.get('format')!r} version "
            f"{manifest.get('version')!r}; expected 'miaotui' version {FORMAT_VERSION}"
        )
    cfg = dict(manifest["config"])
    cfg["rope_scaling"] = RopeScaling(**cfg.get("rope_scaling", {}))
    config = ModelConfig(**cfg)
    tokenizer_source: Any = None  # "none": the source had no tokenizer (tiny test models)
    if manifest["tokenizer"] == "hf":
        tokenizer_source = path
    elif manifest["tokenizer"] == "gguf-metadata":
        tokenizer_source = json.loads((path / GGUF_TOKENIZER).read_text())
    sources = {
        n: TensorSource(tuple(t.shape), _QTYPES.get(t.dtype, str(t.dtype).upper()), t)
        for n, t in tensors.items()
    }
    return Checkpoint(
        config=config,
        tensors=sources,
        path=path,
        file_size=(path / WEIGHTS).stat().st_size,
        tokenizer_source=tokenizer_source,
        metadata={
            "general.name": manifest.get("name", ""),
            "miaotui.transforms": manifest.get("transforms", ""),
            "miaotui.manifest": manifest,
        },
    )


def is_transformed(ckpt: Checkpoint) -> bool:
    return "miaotui.manifest" in ckpt.metadata


def build_transformed_model(
    ckpt: Checkpoint, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> Transformer:
    """The model saved in a transformed checkpoint: float parameters in `dtype`, packed tensors
    as saved. Module shapes come from the saved tensors, not from the config."""
    manifest = ckpt.metadata["miaotui.manifest"]
    raw = {n: s.data for n, s in ckpt.tensors.items()}
    for alias, target in manifest.get("aliases", {}).items():
        raw[alias] = raw[target]
    tensors = _Tensors(raw, dtype)
    config = ckpt.config
    with torch.device("meta"):
        model = Transformer(config)
    for name, lay in manifest["modules"].items():
        _set_module(model, name, _build_module(name, lay, tensors, config, dtype))
    for name, p in list(model.named_parameters()):
        if p.is_meta:
            _set_module(model, name, nn.Parameter(tensors.float(name), requires_grad=False))
    for block, facts in zip(model.layers, manifest["layers"]):
        _apply_layer_facts(block, facts, config.head_dim)
    _materialize_rotary(model, torch.device(device))
    missing = [
        n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta
    ]
    if missing:
        raise ModelFormatError(f"{ckpt.path}: no saved tensors for {', '.join(missing[:5])}")
    return model.to(device).eval()


def load_transformed(
    path: Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
):
    """(model, tokenizer) from a directory written by `save_transformed`."""
    from miaotui.tokenizer import TextTokenizer

    ckpt = read_transformed(Path(path))
    model = build_transformed_model(ckpt, device, dtype)
    src = ckpt.tokenizer_source
    if src is None:
        return model, None
    if isinstance(src, Path):
        return model, TextTokenizer.from_hf_dir(src)
    return model, TextTokenizer.from_gguf_metadata(src)


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


def _build_module(
    name: str, lay: dict, tensors: _Tensors, config: ModelConfig, dtype: torch.dtype
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
        return (
            QuantEmbedding(packed, dtype)
            if kind.startswith("embedding")
            else QuantLinear(packed, bias)
        )
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
        emb = nn.Embedding(w.shape[0], w.shape[1], device="meta")
        emb.weight = nn.Parameter(w, requires_grad=False)
        return emb
    if kind == "csr":
        from miaotui.transforms.sparse_linear import SparseLinear

        m, k = lay["shape"]
        crow, col = tensors.get(f"{name}.crow_indices"), tensors.get(f"{name}.col_indices")
        vals = tensors.get(f"{name}.values")
        csr = torch.sparse_csr_tensor(crow, col, vals, size=(m, k), check_invariants=False)
        dense = csr.to_dense().to(dtype)
        return SparseLinear(dense, None if bias is None else tensors.float(f"{name}.bias"))
    raise ModelFormatError(f"module {name}: unknown layout kind {kind!r}")


def _apply_layer_facts(block: nn.Module, facts: dict, head_dim: int) -> None:
    """Heads from the saved projection shapes (pruning may change them per layer); sliding and
    the KV-cache index from the manifest (pruning layers renumbers them)."""
    att = block.attention
    att.n_heads = _out_features(att.wq) // head_dim or facts["n_heads"]
    att.n_kv_heads = _out_features(att.wk) // head_dim or facts["n_kv_heads"]
    att.layer = int(facts.get("cache_layer", att.layer))
    block.sliding = att.sliding = bool(facts.get("sliding", block.sliding))


def _set_module(root: nn.Module, name: str, value: nn.Module | nn.Parameter) -> None:
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
