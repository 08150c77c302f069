"""EngineConfig -> a running LLMEngine: resolve the model name, open the file, build the model,
size the KV cache, wire scheduler and runner."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from miaotui.config import EngineConfig
from miaotui.device import DeviceConfig, resolve_device, resolve_dtype, setup_threads
from miaotui.engine.engine import LLMEngine
from miaotui.engine.runner import ModelRunner, num_cache_blocks
from miaotui.engine.scheduler import SchedulerConfig
from miaotui.errors import ModelFormatError
from miaotui.load.checkpoint import Checkpoint
from miaotui.load.resolve import resolve_model
from miaotui.model.build import build_model
from miaotui.model.transformer import Transformer
from miaotui.tokenizer import TextTokenizer

log = logging.getLogger(__name__)


def open_checkpoint(name: str | None) -> Checkpoint:
    """Open a model by GGUF path, HF directory or short name."""
    from miaotui.load.gguf_file import read_gguf
    from miaotui.load.hf_dir import read_hf_dir

    path = resolve_model(name)
    if path.is_dir() and (path / "miaotui.json").is_file():
        from miaotui.transforms.checkpoint import read_transformed

        return read_transformed(path)  # written by `miaotui quantize` / `miaotui prune`
    if path.is_dir():
        return read_hf_dir(path)
    if path.stat().st_size < 8:
        raise ModelFormatError(f"{path} is too small to be a model file")
    return read_gguf(path)


def load_tokenizer(ckpt: Checkpoint) -> TextTokenizer:
    if isinstance(ckpt.tokenizer_source, Path):
        return TextTokenizer.from_hf_dir(ckpt.tokenizer_source)
    return TextTokenizer.from_gguf_metadata(ckpt.tokenizer_source)


def load_model(ckpt: Checkpoint, cfg: EngineConfig, tokenizer: TextTokenizer) -> Transformer:
    device_cfg = DeviceConfig(cfg.device, cfg.dtype, cfg.threads)
    if "miaotui.manifest" in ckpt.metadata:  # a saved transformed model: rebuilt as it was saved
        from miaotui.transforms.checkpoint import build_transformed_model

        model = build_transformed_model(ckpt, resolve_device(device_cfg), resolve_dtype(device_cfg))
        if cfg.transforms:  # further transforms apply to the modules still in float
            from miaotui.transforms.pipeline import TransformContext, apply_transforms, parse_specs

            ctx = TransformContext(tokenizer, progress=cfg.progress)
            model = apply_transforms(model, parse_specs(cfg.transforms), ctx)
        return model
    if cfg.transforms:
        from miaotui.transforms.pipeline import TransformContext, apply_transforms, parse_specs

        specs = parse_specs(cfg.transforms)  # fail fast on a bad spec, before loading
        device, dtype = resolve_device(device_cfg), resolve_dtype(device_cfg)
        model = build_model(ckpt, device, dtype, progress=cfg.progress)
        return apply_transforms(model, specs, TransformContext(tokenizer, progress=cfg.progress))
    if cfg.weights == "native":
        from miaotui.transforms.native import build_native_model

        return build_native_model(ckpt, device_cfg, progress=cfg.progress)
    device, dtype = resolve_device(device_cfg), resolve_dtype(device_cfg)
    return build_model(ckpt, device, dtype, progress=cfg.progress)


def build_engine(cfg: EngineConfig) -> LLMEngine:
    t0 = time.perf_counter()
    setup_threads(cfg.threads)
    ckpt = open_checkpoint(cfg.model)
    tokenizer = load_tokenizer(ckpt)
    model = load_model(ckpt, cfg, tokenizer)
    engine = engine_for_model(model, tokenizer, cfg)
    log.info("loaded %s in %.2f s", ckpt.path.name, time.perf_counter() - t0)
    return engine


def engine_for_model(model: Transformer, tokenizer: TextTokenizer, cfg: EngineConfig) -> LLMEngine:
    """Engine around an already built (possibly transformed) model."""
    device_cfg = DeviceConfig(cfg.device, cfg.dtype, cfg.threads)
    device, dtype = resolve_device(device_cfg), resolve_dtype(device_cfg)
    max_len = min(cfg.max_model_len or model.config.max_seq_len, model.config.max_seq_len)
    num_blocks = num_cache_blocks(model, cfg.cache, dtype)
    runner = ModelRunner(model, cfg.cache, num_blocks, device, dtype)
    sched = SchedulerConfig(
        max_num_seqs=cfg.max_num_seqs,
        max_num_batched_tokens=cfg.max_num_batched_tokens,
        long_prefill_token_threshold=cfg.max_num_batched_tokens,
        max_waiting=cfg.max_waiting,
        max_model_len=max_len,
    )
    return LLMEngine(runner, tokenizer, num_blocks, cfg.cache, sched)
