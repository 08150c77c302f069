"""EngineConfig -> a running LLMEngine, the serving pipeline in one place:

    open (load/open.py) -> build (model/build.py) -> load-time transforms, only when asked
    (transforms/, imported then and only then) -> size the KV cache, wire scheduler and runner

Tensor- and pipeline-parallel ranks build their slice in parallel/workers.py with the same
builder."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import torch

from miaotui.config import EngineConfig
from miaotui.device import free_cpus, resolve_device, resolve_dtype, setup_threads
from miaotui.engine.draft import (
    DraftProposer,
    check_same_tokenizer,
    draft_cache,
    layerskip_proposer,
    step_costs,
)
from miaotui.engine.engine import LLMEngine
from miaotui.engine.runner import ModelRunner, num_cache_blocks
from miaotui.errors import InvalidRequestError
from miaotui.load.checkpoint import Checkpoint
from miaotui.load.open import load_tokenizer, open_checkpoint
from miaotui.model.build import build_model
from miaotui.model.native_step import NativeStepModel, build_native_step
from miaotui.model.transformer import Transformer
from miaotui.tokenizer import TextTokenizer

log = logging.getLogger(__name__)


def build_engine(cfg: EngineConfig) -> LLMEngine:
    t0 = time.perf_counter()
    setup_threads(cfg.device.threads)  # only when the user asked for a number
    ckpt = open_checkpoint(cfg.model)
    tokenizer = load_tokenizer(ckpt)
    model = load_model(ckpt, cfg, tokenizer)
    if isinstance(model, NativeStepModel):
        # The native step brings its own thread pool; torch's OpenMP workers would spin for a
        # millisecond after every sampling op and take a core from it (measured: batch-16
        # decode steps 2x slower). torch's side work (sampling) runs on one thread.
        log.info("native step: %d pool threads; torch ops on 1 thread", model.threads)
        torch.set_num_threads(1)
    engine = engine_for_model(model, tokenizer, cfg)
    log.info("loaded %s in %.2f s", ckpt.path.name, time.perf_counter() - t0)
    return engine


def load_model(ckpt: Checkpoint, cfg: EngineConfig, tokenizer: TextTokenizer) -> Transformer:
    """The model `cfg` asks for: built from `ckpt`, then `cfg.transforms` applied. Transforms
    need float weights: they apply to a float build, or to the float modules of a saved
    transformed checkpoint."""
    device, dtype = resolve_device(cfg.device), resolve_dtype(cfg.device)
    if not cfg.transforms and native_step_applies(cfg, device, dtype):
        threads = cfg.device.threads or free_cpus()
        model = build_native_step(ckpt, threads)
        if model is not None:
            return model
    if not cfg.transforms:
        return build_model(ckpt, device, dtype, cfg.weights, progress=cfg.progress)
    from miaotui.transforms.calibrate import CalibrationConfig
    from miaotui.transforms.pipeline import apply_transforms
    from miaotui.transforms.spec import TransformContext, parse_specs

    specs = parse_specs(cfg.transforms)  # fail fast on a bad spec, before loading
    model = build_model(ckpt, device, dtype, "float", progress=cfg.progress)
    text = Path(cfg.calibration_text) if cfg.calibration_text else None
    calibration = CalibrationConfig(text_path=text, start_char=cfg.calibration_start)
    ctx = TransformContext(tokenizer, calibration, cfg.progress)
    return apply_transforms(model, specs, ctx)


def native_step_applies(cfg: EngineConfig, device: torch.device, dtype: torch.dtype) -> bool:
    """Native GGUF weights on the CPU in fp32 (KV cache float16 or int8) run as one native call
    per step (model/native_step.py) when the checkpoint allows it."""
    return (
        cfg.weights == "native"
        and device.type == "cpu"
        and dtype == torch.float32
        and cfg.cache.kv_dtype in ("auto", "int8")
    )


def engine_for_model(model: Transformer, tokenizer: TextTokenizer, cfg: EngineConfig) -> LLMEngine:
    """Engine around an already built (possibly transformed) model."""
    device, dtype = resolve_device(cfg.device), resolve_dtype(cfg.device)
    num_blocks = num_cache_blocks(model, cfg.cache, model.kv_spec()[1])
    runner = ModelRunner(model, cfg.cache, num_blocks, device, dtype)
    sched = cfg.scheduler.for_model(model.config.max_seq_len)
    drafter = build_drafter(cfg, runner, tokenizer, num_blocks, sched.max_model_len)
    return LLMEngine(runner, tokenizer, num_blocks, cfg.cache, sched, drafter)


def build_drafter(
    cfg: EngineConfig, runner: ModelRunner, tokenizer: TextTokenizer, num_blocks: int, max_len: int
) -> DraftProposer | None:
    """The model proposer `draft:MODEL` or `layerskip[:N]` asks for (engine/draft.py)."""
    method = cfg.scheduler.speculative_method or ""
    if method.startswith("layerskip"):
        return layerskip_proposer(
            runner.model,
            runner.kv_cache,
            tokenizer,
            cfg.cache.block_size,
            method,
            cfg.scheduler.num_speculative_tokens,
        )
    if not method.startswith("draft:"):
        return None
    name = method.removeprefix("draft:")
    ckpt = open_checkpoint(name)
    check_same_tokenizer(tokenizer, load_tokenizer(ckpt), name)
    if ckpt.config.max_seq_len < max_len:
        raise InvalidRequestError(
            f"draft model {name} holds {ckpt.config.max_seq_len} tokens of context, fewer than "
            f"max_model_len={max_len}; lower max_model_len to at most {ckpt.config.max_seq_len}",
            "speculative_method",
        )
    draft = load_model(ckpt, dataclasses.replace(cfg, model=name, transforms=""), tokenizer)
    cache = draft_cache(draft, num_blocks, cfg.cache.block_size)
    k = cfg.scheduler.num_speculative_tokens
    verify, cost = step_costs(runner.model, k, draft=draft)
    if all(verify[i] + i * cost >= 1 + i for i in range(1, k + 1)):
        log.warning(
            "draft model %s: a pass costs %.2f of a target step; it cannot pay for itself even "
            "when always right (a draft should be several times smaller)",
            name,
            cost,
        )
    log.info("draft model %s: %d layers, cost %.2f", ckpt.path.name, ckpt.config.n_layers, cost)
    return DraftProposer(draft, cache, cfg.cache.block_size, verify_cost=verify, cost=cost)
