"""Command line: miaotui generate | chat | info | serve | eval | bench | compare | quantize | prune.

The CLI only turns arguments into configs and calls the library; a MiaotuiError becomes one line
on stderr and exit code 2."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from miaotui.config import CacheConfig, EngineConfig
from miaotui.errors import MiaotuiError
from miaotui.sampling_params import SamplingParams


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        "-m",
        default=None,
        help="GGUF path, HF directory or short name (default: smollm2-135m)",
    )
    p.add_argument(
        "--weights",
        choices=["native", "float"],
        default="native",
        help="native: quantized GGUF weights run on integer kernels; float: decode all",
    )
    p.add_argument("--dtype", default="fp32", help="fp32 | bf16 | fp16")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:n]")
    p.add_argument("--threads", type=int, default=None, help="CPU threads")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--kv-cache-dtype", choices=["auto", "int8"], default="auto")
    p.add_argument("--kv-cache-gib", type=float, default=0.5)
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument(
        "--transforms",
        "-t",
        default="",
        help="quantize/prune at load, e.g. int4-gptq-g64 or prune-wanda-0.5+int8",
    )


def engine_config(a: argparse.Namespace, progress: bool = True) -> EngineConfig:
    return EngineConfig(
        model=a.model,
        weights=a.weights,
        dtype=a.dtype,
        device=a.device,
        threads=a.threads,
        max_model_len=a.max_model_len,
        max_num_seqs=a.max_num_seqs,
        max_num_batched_tokens=a.max_num_batched_tokens,
        transforms=a.transforms,
        cache=CacheConfig(
            kv_dtype=a.kv_cache_dtype,
            memory_gib=a.kv_cache_gib,
            enable_prefix_caching=not a.no_prefix_caching,
        ),
        progress=progress and sys.stderr.isatty(),
    )


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def sampling_params(a: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        max_tokens=a.max_tokens,
        temperature=a.temperature,
        top_k=a.top_k,
        top_p=a.top_p,
        min_p=a.min_p,
        repetition_penalty=a.repetition_penalty,
        seed=a.seed,
        stop=tuple(a.stop),
    )


def cmd_generate(a: argparse.Namespace) -> None:
    from miaotui.llm import LLM

    params = sampling_params(a)  # bad parameters fail before the model is loaded
    cfg = engine_config(a)
    llm = LLM(**{f: getattr(cfg, f) for f in cfg.__dataclass_fields__})
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
    llm = LLM(**{f: getattr(cfg, f) for f in cfg.__dataclass_fields__})
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
    from miaotui.engine.loader import open_checkpoint

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

    for register in _extra_commands():
        register(sub)
    return parser


def _extra_commands():
    """Subcommands living next to their capability (server, eval, transforms)."""
    found = []
    for mod in (
        "miaotui.server.cli",
        "miaotui.eval.cli",
        "miaotui.transforms.cli",
        "miaotui.parallel.cli",
    ):
        try:
            module = __import__(mod, fromlist=["register"])
        except ImportError:
            continue
        found.append(module.register)
    return found


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
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
