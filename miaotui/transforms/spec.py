"""Transform specs: short strings parsed into frozen dataclasses, and the context transforms get.

A spec string is one or more specs joined with "+", applied left to right by
pipeline.apply_transforms, e.g. "prune-wanda-0.5+int4-gptq-g64".

    int8                     RTN int8, per output channel
    int4-rtn-g32[-asym]      RTN int4, group 32/64/128, symmetric (default) or asymmetric
    int4-gptq-g64            GPTQ (act-order) int4
    int4-awq-g64             AWQ scales + int4
    w8a8 | w8a8-smooth       dynamic per-token int8 activations x int8 weights (+ SmoothQuant)
    prune-magnitude-0.5 | prune-wanda-0.5 | prune-sparsegpt-0.5 | prune-wanda-2:4
    prune-layers-0.2 | prune-heads-0.25 | prune-channels-0.2  (structured: shapes shrink)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from miaotui.errors import InvalidRequestError
from miaotui.transforms.calibrate import CalibrationConfig

QUANT_METHODS = ("rtn", "gptq", "awq", "smoothquant")
PRUNE_METHODS = ("magnitude", "wanda", "sparsegpt", "layers", "heads", "channels")


@dataclass(frozen=True)
class QuantSpec:
    method: str
    """rtn | gptq | awq | smoothquant (smoothquant means W8A8 with smoothing)."""
    bits: int
    """8 or 4 (weights)."""
    group_size: int | None = None
    """Input columns per scale; None = per output channel."""
    symmetric: bool = True
    activations: bool = False
    """W8A8: also quantize activations per token to int8."""


@dataclass(frozen=True)
class PruneSpec:
    method: str
    sparsity: float = 0.5
    """Fraction removed (weights, layers, heads or channels)."""
    nm: tuple[int, int] | None = None
    """Semi-structured N:M pattern (keep n of every m) instead of a sparsity."""
    recover: bool = True
    """Structured: least-squares correction of the next projection."""


Spec = QuantSpec | PruneSpec


@dataclass
class TransformContext:
    """What transforms may need besides the model: the tokenizer and calibration settings."""

    tokenizer: object
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    progress: bool = False


def parse_specs(text: str) -> list[Spec]:
    return [parse_spec(part) for part in text.split("+") if part]


def parse_spec(s: str) -> Spec:
    s = s.strip().lower()
    if s == "int8":
        return QuantSpec("rtn", 8)
    if s in ("w8a8", "w8a8-smooth", "smoothquant"):
        return QuantSpec("smoothquant" if s != "w8a8" else "rtn", 8, activations=True)
    m = re.fullmatch(r"int(4|8)-(rtn|gptq|awq)(?:-g(\d+))?(-asym)?", s)
    if m:
        group = int(m.group(3)) if m.group(3) else (None if m.group(1) == "8" else 32)
        return QuantSpec(m.group(2), int(m.group(1)), group, symmetric=not m.group(4))
    m = re.fullmatch(r"prune-(\w+)-(\d+):(\d+)", s)
    if m and m.group(1) in PRUNE_METHODS:
        return PruneSpec(m.group(1), nm=(int(m.group(2)), int(m.group(3))))
    m = re.fullmatch(r"prune-(\w+)-([0-9.]+)(-norecover)?", s)
    if m and m.group(1) in PRUNE_METHODS:
        sparsity = float(m.group(2))
        if not 0.0 < sparsity < 1.0:
            raise InvalidRequestError(f"sparsity must be in (0, 1), got {sparsity} in {s!r}")
        return PruneSpec(m.group(1), sparsity, recover=not m.group(3))
    raise InvalidRequestError(
        f"unknown transform {s!r}; examples: int8, int4-rtn-g32, int4-gptq-g64, int4-awq-g128, "
        f"w8a8, w8a8-smooth, prune-wanda-0.5, prune-sparsegpt-2:4, prune-layers-0.2"
    )
