"""The one pipeline that applies transform specs to a built float model:
load -> prune/quantize -> runner. Every transform has the signature fn(model, spec, ctx) -> model;
the spec strings are parsed by transforms/spec.py."""

from __future__ import annotations

from miaotui.model.transformer import Transformer
from miaotui.transforms.prune import prune_model
from miaotui.transforms.quantize import quantize_model
from miaotui.transforms.spec import QuantSpec, Spec, TransformContext


def apply_transforms(model: Transformer, specs: list[Spec], ctx: TransformContext) -> Transformer:
    """Apply each spec in order. The model must hold float weights (weights="float")."""
    for spec in specs:
        if isinstance(spec, QuantSpec):
            model = quantize_model(model, spec, ctx)
        else:
            model = prune_model(model, spec, ctx)
    return model
