"""Command line: miaotui generate | chat | info | quantize | prune | serve | eval | bench | compare.

The CLI only turns arguments into configs and calls the library; a MiaotuiError becomes one line
on stderr and exit code 2. Every subcommand is registered here, statically: serve lives in
server/cli.py, eval, bench and compare in eval/cli.py. Heavy libraries (uvicorn, the transforms)
are imported by the command that runs, so `miaotui generate` never loads them."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from miaotui import translate
from miaotui.audio import cli as audio_cli
from miaotui.cli_args import (
    add_calibration_arg,
    add_engine_args,
    add_sampling_args,
    engine_config,
    sampling_params,
)
from miaotui.errors import MiaotuiError
from miaotui.eval import cli as eval_cli
from miaotui.server import cli as server_cli


def cmd_generate(a: argparse.Namespace) -> None:
    from miaotui.llm import LLM

    params = sampling_params(a)  # bad parameters fail before the model is loaded
    cfg = engine_config(a)
    llm = LLM(cfg)
    prompts = a.prompt or [sys.stdin.read()]
    results = llm.generate(prompts, params)
    for r in results:
        if a.json:
            print(
                json.dumps(
                    {
                        "text": r.text,
                        "token_ids": r.token_ids,
                        "finish_reason": r.finish_reason,
                        "ttft_s": r.time_to_first_token,
                        "total_s": r.total_time,
                    }
                )
            )
        else:
            print(r.text)


def cmd_chat(a: argparse.Namespace) -> None:
    from miaotui.llm import LLM

    params = sampling_params(a)  # bad parameters fail before the model is loaded
    cfg = engine_config(a)
    llm = LLM(cfg)
    messages: list[dict[str, str]] = []
    if a.system:
        messages.append({"role": "system", "content": a.system})
    turns = list(a.message) if a.message else None  # one user turn per argument
    while True:
        if turns is not None:
            if not turns:
                return
            user = turns.pop(0)
        else:
            try:
                user = input("> ")
            except EOFError:
                return
            if not user.strip():
                continue
        messages.append({"role": "user", "content": user})
        prompt = llm.tokenizer.apply_chat_template(messages)
        reply = ""
        t0 = time.perf_counter()
        for out in llm.stream(prompt, params):
            sys.stdout.write(out.delta_text)
            sys.stdout.flush()
            reply = out.text
        sys.stdout.write("\n")
        logging.getLogger("miaotui").info("%.2f s", time.perf_counter() - t0)
        messages.append({"role": "assistant", "content": reply})


def cmd_info(a: argparse.Namespace) -> None:
    from miaotui.load.open import open_checkpoint

    ckpt = open_checkpoint(a.model_path or a.model)
    c = ckpt.config
    info = {
        "path": str(ckpt.path),
        "name": ckpt.metadata.get("general.name"),
        "architecture": c.arch,
        "parameters": ckpt.num_parameters(),
        "file_size_bytes": ckpt.file_size,
        "tensor_types": ckpt.tensor_types(),
        "layers": c.n_layers,
        "dim": c.dim,
        "heads": c.n_heads,
        "kv_heads": c.n_kv_heads,
        "head_dim": c.head_dim,
        "intermediate_size": c.intermediate_size,
        "vocab_size": c.vocab_size,
        "context_length": c.max_seq_len,
        "rope_theta": c.rope_theta,
        "tied_embeddings": c.tie_embeddings,
    }
    if a.json:
        print(json.dumps(info, indent=2))
        return
    for k, v in info.items():
        print(f"{k:18} {v}")


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
    """Load a model, apply transforms, save a checkpoint (safetensors + miaotui.json) that
    loads back with `--model OUT`."""
    import torch

    from miaotui.load.open import load_tokenizer, open_checkpoint
    from miaotui.model.build import build_model
    from miaotui.transforms.calibrate import CalibrationConfig
    from miaotui.transforms.checkpoint import save_transformed
    from miaotui.transforms.pipeline import apply_transforms
    from miaotui.transforms.spec import TransformContext, parse_specs

    specs_text = spec + (f"+{a.then}" if a.then else "")
    specs = parse_specs(specs_text)
    ckpt = open_checkpoint(a.model_path)
    tokenizer = load_tokenizer(ckpt)
    progress = sys.stderr.isatty()
    model = build_model(ckpt, torch.device("cpu"), torch.float32, progress=progress)
    calibration = CalibrationConfig(text_path=a.calibration_text, start_char=a.calibration_start)
    model = apply_transforms(model, specs, TransformContext(tokenizer, calibration, progress))
    save_transformed(model, ckpt, a.output, specs_text)
    print(f"miaotui: wrote {a.output} ({specs_text})", file=sys.stderr)


def _add_transform_commands(sub) -> None:
    p = sub.add_parser("quantize", help="quantize weights (rtn, gptq, awq, smoothquant)")
    p.add_argument("model_path", nargs="?", default=None)
    p.add_argument("--method", choices=["rtn", "gptq", "awq", "smoothquant"], default="rtn")
    p.add_argument("--bits", type=int, choices=[4, 8], default=4)
    p.add_argument("--group-size", type=int, default=None, help="default: 32 (int4), row (int8)")
    p.add_argument("--asym", action="store_true", help="asymmetric int4 (scale + offset)")
    p.add_argument("--then", default="", help="more transforms after this one (spec string)")
    p.add_argument("-o", "--output", type=Path, required=True)
    add_calibration_arg(p)
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
    add_calibration_arg(p)
    p.set_defaults(func=cmd_prune)


class _Parser(argparse.ArgumentParser):
    """Argument errors are one line on stderr, like every other CLI error."""

    def error(self, message: str):
        print(f"miaotui: error: {message}", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="miaotui", description="秒推: fast LLM inference")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="complete prompts (stdin if none given)")
    add_engine_args(p)
    add_sampling_args(p)
    p.add_argument("prompt", nargs="*")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="chat with the model, streaming its replies")
    add_engine_args(p)
    add_sampling_args(p)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("message", nargs="*", help="user turns (interactive if none)")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("info", help="architecture, parameters, tensor types, file size")
    p.add_argument("model_path", nargs="?", default=None)
    p.add_argument("--model", "-m", default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    _add_transform_commands(sub)
    server_cli.register(sub)
    eval_cli.register(sub)
    audio_cli.register(sub)
    translate.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        args.func(args)
    except MiaotuiError as e:
        print(f"miaotui: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        if (e.name or "").startswith("miaotui"):
            raise  # our own code is broken: the traceback says where
        print(
            f"miaotui: error: `{args.command}` needs the package {e.name!r}: {e}", file=sys.stderr
        )
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
