"""Checkpoint -> ready-to-run Transformer: the model is created on the meta device (no random
init, no memory), then each parameter is decoded from the file straight into place."""

from __future__ import annotations

import logging

import torch
from torch import nn

from miaotui.errors import ModelFormatError
from miaotui.load.checkpoint import Checkpoint
from miaotui.load.gguf_file import check_tensor_type
from miaotui.model.layers import Rotary
from miaotui.model.transformer import Transformer

log = logging.getLogger(__name__)


def build_model(
    ckpt: Checkpoint,
    device: torch.device,
    dtype: torch.dtype,
    progress: bool = False,
    skip: frozenset[str] = frozenset(),
) -> Transformer:
    """Float model (every tensor decoded to `dtype`) on `device`. Parameters named in `skip` stay
    on the meta device for the caller to fill (e.g. with packed quantized modules)."""
    config = ckpt.config
    with torch.device("meta"):
        model = Transformer(config)
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
        _set_param(model, name, src.to_float().to(device=device, dtype=dtype))
    if config.tie_embeddings and "tok_embeddings.weight" not in skip:
        model.output.weight = model.tok_embeddings.weight
    return model.eval()


def _set_param(model: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    setattr(owner, attr, nn.Parameter(value, requires_grad=False))


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
