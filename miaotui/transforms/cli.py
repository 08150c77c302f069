"""`miaotui quantize` and `miaotui prune`: load a model, apply transforms, save a checkpoint
(safetensors + miaotui.json) that loads back with `--model OUT`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("quantize", help="quantize weights (rtn, gptq, awq, smoothquant)")
    p.add_argument("model_path", nargs="?", default=None)
    p.add_argument("--method", choices=["rtn", "gptq", "awq", "smoothquant"], default="rtn")
    p.add_argument("--bits", type=int, choices=[4, 8], default=4)
    p.add_argument("--group-size", type=int, default=None, help="default: 32 (int4), row (int8)")
    p.add_argument("--asym", action="store_true", help="asymmetric int4 (scale + offset)")
    p.add_argument("--then", default="", help="more transforms after this one (spec string)")
    p.add_argument("-o", "--output", type=Path, required=True)
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("prune", help="prune weights, N:M, layers, heads or MLP channels")
    p.add_argument("model_path", nargs="?", default=None)
    p.add_argument(
        "--method",
        required=True,
        choices=["magnitude", "wanda", "sparsegpt", "layers", "heads", "channels"],
    )
    p.add_argument("--sparsity", default="0.5", help="fraction removed, or N:M such as 2:4")
    p.add_argument("--no-recover", action="store_true", help="structured: skip least squares")
    p.add_argument("--then", default="", help="e.g. int4-rtn-g32 to quantize after pruning")
    p.add_argument("-o", "--output", type=Path, required=True)
    p.set_defaults(func=cmd_prune)


def quant_spec_text(a: argparse.Namespace) -> str:
    if a.method == "smoothquant":
        return "w8a8-smooth"
    group = a.group_size or (32 if a.bits == 4 else None)
    if a.bits == 8 and a.method == "rtn" and group is None:
        return "int8"
    text = f"int{a.bits}-{a.method}" + (f"-g{group}" if group else "")
    return text + ("-asym" if a.asym else "")


def prune_spec_text(a: argparse.Namespace) -> str:
    return f"prune-{a.method}-{a.sparsity}" + ("-norecover" if a.no_recover else "")


def cmd_quantize(a: argparse.Namespace) -> None:
    _transform_and_save(a, quant_spec_text(a))


def cmd_prune(a: argparse.Namespace) -> None:
    _transform_and_save(a, prune_spec_text(a))


def _transform_and_save(a: argparse.Namespace, spec: str) -> None:
    import torch

    from miaotui.engine.loader import load_tokenizer, open_checkpoint
    from miaotui.model.build import build_model
    from miaotui.transforms.checkpoint import save_transformed
    from miaotui.transforms.pipeline import TransformContext, apply_transforms, parse_specs

    specs_text = spec + (f"+{a.then}" if a.then else "")
    specs = parse_specs(specs_text)
    ckpt = open_checkpoint(a.model_path)
    tokenizer = load_tokenizer(ckpt)
    progress = sys.stderr.isatty()
    model = build_model(ckpt, torch.device("cpu"), torch.float32, progress=progress)
    model = apply_transforms(model, specs, TransformContext(tokenizer, progress=progress))
    save_transformed(model, ckpt, a.output, specs_text)
    print(f"miaotui: wrote {a.output} ({specs_text})", file=sys.stderr)
