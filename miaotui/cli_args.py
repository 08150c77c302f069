"""Command-line flags shared by several subcommands, and their translation into configs. Every
subcommand module (cli.py, server/cli.py, eval/cli.py) declares its flags with these."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from miaotui.config import CacheConfig, DeviceConfig, EngineConfig, SchedulerConfig
from miaotui.sampling_params import SamplingParams

# Wiki text from character 400,000 on: the domain evaluation scores (GPTQ calibrated on the
# novel is worse than rounding on wiki text, see README "Calibration"), far from the head that
# `miaotui eval` scores. A CLI default only: the library takes no data path it was not given.
DEFAULT_CALIBRATION_TEXT = (
    Path(__file__).resolve().parents[1].parent / "shared/data/text/wiki_dev.txt"
)
DEFAULT_CALIBRATION_START = 400_000


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        "-m",
        default=None,
        help="GGUF path, HF directory or short name (default: smollm2-135m)",
    )
    p.add_argument(
        "--weights",
        choices=["native", "packed", "float"],
        default="native",
        help="native: GGUF blocks in place, one native call per step (falls back to packed); "
        "packed: per-module int kernels; float: decode all",
    )
    p.add_argument("--dtype", default="fp32", help="fp32 | bf16 | fp16")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:n]")
    p.add_argument(
        "--threads",
        type=int,
        default=_env_threads(),
        help="CPU threads (default: $MIAOTUI_THREADS, else torch's default)",
    )
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--kv-cache-dtype", choices=["auto", "int8"], default="auto")
    p.add_argument("--kv-cache-gib", type=float, default=0.5)
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument(
        "--speculative-method",
        default=None,
        metavar="ngram|draft:MODEL|layerskip[:N]",
        help="score proposed tokens in each decode step (same output, fewer steps): prompt "
        "lookup, a smaller model with the same tokenizer, or the model's first N layers "
        "(N measured at load when not given)",
    )
    p.add_argument("--num-speculative-tokens", type=int, default=4, help="most proposals per step")
    p.add_argument(
        "--transforms",
        "-t",
        default="",
        help="quantize/prune at load, e.g. int4-gptq-g64 or prune-wanda-0.5+int8",
    )
    add_calibration_arg(p)


def add_calibration_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--calibration-text",
        type=Path,
        default=DEFAULT_CALIBRATION_TEXT,
        help="plain text that calibrated transforms (gptq, awq, smoothquant, wanda, sparsegpt) "
        "read (default: the shared wiki text)",
    )
    p.add_argument(
        "--calibration-start",
        type=int,
        default=DEFAULT_CALIBRATION_START,
        help="characters of the calibration text skipped first (default 400000: wiki_dev.txt's "
        "tail, away from the head that `eval` scores)",
    )


def engine_config(a: argparse.Namespace, progress: bool = True, **scheduler: Any) -> EngineConfig:
    """The engine config the flags ask for; `scheduler` adds SchedulerConfig fields that only
    some subcommands have flags for (max_waiting)."""
    return EngineConfig(
        model=a.model,
        weights=a.weights,
        transforms=a.transforms,
        calibration_text=str(a.calibration_text),
        calibration_start=a.calibration_start,
        progress=progress and sys.stderr.isatty(),
        device=DeviceConfig(device=a.device, dtype=a.dtype, threads=a.threads),
        cache=CacheConfig(
            kv_dtype=a.kv_cache_dtype,
            memory_gib=a.kv_cache_gib,
            enable_prefix_caching=not a.no_prefix_caching,
        ),
        scheduler=SchedulerConfig(
            max_model_len=a.max_model_len,
            max_num_seqs=a.max_num_seqs,
            max_num_batched_tokens=a.max_num_batched_tokens,
            speculative_method=a.speculative_method,
            num_speculative_tokens=a.num_speculative_tokens,
            **scheduler,
        ),
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


def _env_threads() -> int | None:
    """MIAOTUI_THREADS is read here, at the CLI edge, and nowhere in the library."""
    value = os.environ.get("MIAOTUI_THREADS", "")
    return int(value) if value.strip().isdigit() and int(value) > 0 else None
