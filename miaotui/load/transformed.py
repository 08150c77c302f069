"""Transformed checkpoints (written by `miaotui quantize` / `miaotui prune`): a directory with

    model.safetensors   the state dict as it runs: float tensors, packed int8/int4 codes with
                        their scales/offsets, W8A8 codes, CSR parts; a tensor shared by two
                        modules (tied head) is stored once and listed under "aliases"
    miaotui.json        ModelConfig (with any changed shapes), the layout of every linear and
                        embedding (float / int8 / int4 / w8a8 / csr, group size, shape, bias),
                        per-layer facts (heads, KV heads, MLP width, sliding, KV-cache index),
                        the transform spec string and the source file
    tokenizer           tokenizer.json (+ tokenizer_config.json) copied from a HF source, or
                        tokenizer_gguf.json: the GGUF tokenizer metadata

transforms/checkpoint.py writes it; `read_transformed` opens it and model/build.py rebuilds
exactly the modules that were saved, with shapes read from the saved tensors, so the reloaded
model gives identical logits; nothing is re-quantized or decoded to float.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from miaotui.config import ModelConfig, RopeScaling
from miaotui.errors import ModelFormatError
from miaotui.load.checkpoint import Checkpoint, TensorSource

MANIFEST = "miaotui.json"
WEIGHTS = "model.safetensors"
GGUF_TOKENIZER = "tokenizer_gguf.json"
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
FORMAT_VERSION = 1
_QTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int8: "I8"}


def is_transformed_dir(path: Path) -> bool:
    return path.is_dir() and (path / MANIFEST).is_file()


def is_transformed(ckpt: Checkpoint) -> bool:
    """True for a checkpoint opened by `read_transformed` (it carries its manifest)."""
    return "miaotui.manifest" in ckpt.metadata


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
