"""One config tree: each sub-config validates its own fields with a message naming the bad value;
flat keyword arguments (LLM's convenience) land in the sub-config that owns them; the library
leaves torch's thread count alone unless asked."""

from __future__ import annotations

import pytest
import torch

from miaotui.config import (
    CacheConfig,
    DeviceConfig,
    EngineConfig,
    ParallelConfig,
    SchedulerConfig,
)
from miaotui.errors import InvalidRequestError

BAD = [
    (DeviceConfig, {"device": "gpu"}, "device", "'gpu'"),
    (DeviceConfig, {"device": "cuda:x"}, "device", "'cuda:x'"),
    (DeviceConfig, {"dtype": "fp64"}, "dtype", "'fp64'"),
    (DeviceConfig, {"threads": 0}, "threads", "got 0"),
    (CacheConfig, {"block_size": 0}, "block_size", "got 0"),
    (CacheConfig, {"num_blocks": 1}, "num_blocks", "got 1"),
    (CacheConfig, {"memory_gib": -1.0}, "memory_gib", "got -1.0"),
    (CacheConfig, {"kv_dtype": "int4"}, "kv_dtype", "'int4'"),
    (SchedulerConfig, {"max_model_len": 1}, "max_model_len", "got 1"),
    (SchedulerConfig, {"max_num_seqs": 0}, "max_num_seqs", "got 0"),
    (SchedulerConfig, {"max_num_batched_tokens": -3}, "max_num_batched_tokens", "got -3"),
    (SchedulerConfig, {"long_prefill_token_threshold": 0}, "long_prefill_token_threshold", "got 0"),
    (SchedulerConfig, {"max_waiting": 0}, "max_waiting", "got 0"),
    (ParallelConfig, {"tensor_parallel_size": 0}, None, "got 0"),
    (EngineConfig, {"weights": "int3"}, "weights", "'int3'"),
    (EngineConfig, {"device": "cpu"}, "device", "'cpu'"),  # a string where the tree nests
]


@pytest.mark.parametrize(("cls", "kwargs", "param", "value"), BAD, ids=[str(b[1]) for b in BAD])
def test_each_field_is_checked_and_the_message_names_the_value(cls, kwargs, param, value):
    with pytest.raises(InvalidRequestError) as e:
        cls(**kwargs)
    assert value in str(e.value) and next(iter(kwargs)) in str(e.value)
    if param is not None:
        assert e.value.param == param


def test_flat_keyword_arguments_build_the_tree():
    cfg = EngineConfig.from_kwargs(
        model="m",
        device="cpu",
        threads=1,
        max_model_len=256,
        max_waiting=3,
        num_blocks=64,
        cache=CacheConfig(block_size=4),
        tensor_parallel_size=2,
    )
    assert cfg.model == "m"
    assert cfg.device == DeviceConfig(device="cpu", threads=1)
    assert cfg.cache == CacheConfig(block_size=4, num_blocks=64)  # the given one, updated
    assert cfg.scheduler == SchedulerConfig(max_model_len=256, max_waiting=3)
    assert cfg.parallel.tensor_parallel_size == 2
    assert EngineConfig.from_kwargs() == EngineConfig()
    with pytest.raises(InvalidRequestError, match=r"unknown engine option\(s\) \['max_len'\]"):
        EngineConfig.from_kwargs(max_len=5)
    with pytest.raises(InvalidRequestError, match="max_num_seqs must be >= 1, got 0"):
        EngineConfig.from_kwargs(max_num_seqs=0)


def test_max_model_len_is_capped_at_the_models_context():
    assert SchedulerConfig(max_model_len=4096).for_model(2048).max_model_len == 2048
    assert SchedulerConfig(max_model_len=100).for_model(2048).max_model_len == 100
    assert SchedulerConfig(max_model_len=None).for_model(2048).max_model_len == 2048
    assert SchedulerConfig(max_num_batched_tokens=64).chunk_size == 64
    assert SchedulerConfig(long_prefill_token_threshold=16).chunk_size == 16


def test_llm_takes_the_config_or_flat_arguments(tiny_chat_gguf, monkeypatch):
    from miaotui.llm import LLM

    monkeypatch.setenv("MIAOTUI_THREADS", "1")  # a CLI default: the library ignores it
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        cfg = EngineConfig.from_kwargs(model=str(tiny_chat_gguf), max_model_len=64, num_blocks=16)
        llm = LLM(cfg)
        assert llm.config is cfg and llm.engine.config.max_model_len == 64
        assert torch.get_num_threads() == 2  # no threads asked for: left alone
        flat = LLM(str(tiny_chat_gguf), max_model_len=64, num_blocks=16)
        assert flat.config == cfg
        with pytest.raises(TypeError, match="max_model_len"):
            LLM(cfg, max_model_len=32)
    finally:
        torch.set_num_threads(before)


def test_data_paths_and_env_are_cli_defaults(monkeypatch):
    import argparse

    from miaotui.cli_args import DEFAULT_CALIBRATION_TEXT, add_engine_args, engine_config
    from miaotui.transforms.calibrate import CalibrationConfig, calibration_windows

    assert EngineConfig().calibration_text is None and CalibrationConfig().text_path is None
    with pytest.raises(InvalidRequestError, match="--calibration-text PATH"):
        calibration_windows(None, CalibrationConfig())
    monkeypatch.setenv("MIAOTUI_THREADS", "3")
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    cfg = engine_config(parser.parse_args([]), max_waiting=7)
    assert (
        cfg.calibration_text == str(DEFAULT_CALIBRATION_TEXT) and cfg.calibration_start == 400_000
    )
    assert DEFAULT_CALIBRATION_TEXT.is_file()
    assert cfg.device.threads == 3 and cfg.scheduler.max_waiting == 7
