"""GGUF weights run natively: quantized linear weights are repacked from their file blocks into
our int4/int8 kernel layouts at load (exactly, no re-quantization), never decoded to a float
copy of the model. Memory stays near the file size.

Q4_0, Q4_1, Q4_K -> int4 groups of 32 (Q4_0 symmetric, the others with offsets);
Q8_0, Q5_0, Q6_K, Q3_K -> int8 groups (32 or 16). Other encodings are decoded to float.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from miaotui.device import DeviceConfig, resolve_device, resolve_dtype
from miaotui.kernels import PackedInt4, PackedInt8, pack_int4, pack_int8
from miaotui.load.checkpoint import Checkpoint
from miaotui.model.build import build_model
from miaotui.model.transformer import Transformer
from miaotui.transforms.quant_linear import QuantEmbedding, QuantLinear

log = logging.getLogger(__name__)
LINEAR_SUFFIXES = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


def build_native_model(
    ckpt: Checkpoint, device_cfg: DeviceConfig, progress: bool = False
) -> Transformer:
    device, dtype = resolve_device(device_cfg), resolve_dtype(device_cfg)
    packed = {name: p for name in _candidates(ckpt) if (p := pack_tensor(ckpt, name)) is not None}
    model = build_model(ckpt, device, dtype, progress, skip=frozenset(packed))
    for name, p in packed.items():
        module_name = name.removesuffix(".weight")
        if module_name == "tok_embeddings":
            model.tok_embeddings = QuantEmbedding(p, dtype)
            if ckpt.config.tie_embeddings:
                model.output = QuantLinear(p)
            continue
        old = model.get_submodule(module_name)
        bias = getattr(old, "bias", None)
        _replace(model, module_name, QuantLinear(p, bias))
    log.info("packed %d tensors natively", len(packed))
    return model


def _candidates(ckpt: Checkpoint) -> list[str]:
    names = ["tok_embeddings.weight", "output.weight"]
    for i in range(ckpt.config.n_layers):
        names += [f"layers.{i}.attention.{s}.weight" for s in LINEAR_SUFFIXES[:4]]
        names += [f"layers.{i}.feed_forward.{s}.weight" for s in LINEAR_SUFFIXES[4:]]
    return [n for n in names if n in ckpt.tensors]


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


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, module)
