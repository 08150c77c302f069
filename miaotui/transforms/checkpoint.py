"""Writing a transformed model: `save_transformed` stores it in the directory format described
in load/transformed.py (safetensors + miaotui.json + tokenizer), which `--model DIR`,
`LLM(model=DIR)` and `load_transformed` rebuild exactly (model/build.py), so the reloaded model
gives identical logits. Pruned models (fewer layers, heads or MLP channels, different per layer)
reload too.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from miaotui.kernels import PackedInt4, PackedInt8
from miaotui.load.checkpoint import Checkpoint
from miaotui.load.open import load_tokenizer
from miaotui.load.transformed import (
    FORMAT_VERSION,
    GGUF_TOKENIZER,
    HF_TOKENIZER_FILES,
    MANIFEST,
    WEIGHTS,
    read_transformed,
)
from miaotui.model.build import build_model
from miaotui.model.quant_linear import QuantEmbedding, QuantLinear, W8A8Linear
from miaotui.model.sparse_linear import SparseLinear
from miaotui.model.transformer import Transformer
from miaotui.tokenizer import TextTokenizer


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
    if isinstance(m, SparseLinear):
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


def load_transformed(
    path: Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[Transformer, TextTokenizer | None]:
    """(model, tokenizer) from a directory written by `save_transformed`."""
    ckpt = read_transformed(Path(path))
    model = build_model(ckpt, torch.device(device), dtype)
    return model, None if ckpt.tokenizer_source is None else load_tokenizer(ckpt)
