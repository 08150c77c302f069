"""Hugging Face model directories: config.json + *.safetensors (read with `safetensors`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from miaotui.config import ModelConfig, RopeScaling
from miaotui.errors import ModelFormatError, UnsupportedModelError
from miaotui.load.checkpoint import Checkpoint, TensorSource
from miaotui.load.names import hf_to_ours

HF_ARCHS = {"llama": "llama", "qwen2": "qwen2", "gemma3_text": "gemma3", "gemma3": "gemma3"}
REQUIRED_INTS = (
    "hidden_size",
    "num_attention_heads",
    "num_hidden_layers",
    "intermediate_size",
    "vocab_size",
)


def read_hf_dir(path: Path) -> Checkpoint:
    from safetensors import safe_open

    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelFormatError(f"{path} is a directory without config.json (not a HF model)")
    try:
        hf = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ModelFormatError(f"{cfg_file} is not valid JSON: {e}") from e
    if not isinstance(hf, dict):
        raise ModelFormatError(f"{cfg_file} holds a {type(hf).__name__}, not a JSON object")
    try:
        config = config_from_hf(
            hf.get("text_config", hf) if hf.get("model_type") == "gemma3" else hf
        )
    except ModelFormatError as e:
        raise ModelFormatError(f"{cfg_file}: {e}") from e
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelFormatError(f"{path} has no *.safetensors weight files")
    tensors: dict[str, TensorSource] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    name = hf_to_ours(key, config.sandwich_norm)
                    if name is None:
                        continue
                    t = f.get_tensor(key)
                    if config.arch == "gemma3" and name.endswith("norm.weight"):
                        t = t.float() + 1.0  # Gemma RMSNorm scales by (1 + w)
                    qtype = {"torch.float32": "F32", "torch.float16": "F16"}.get(
                        str(t.dtype), "BF16"
                    )
                    tensors[name] = TensorSource(shape=tuple(t.shape), qtype=qtype, data=t)
        except Exception as e:
            raise ModelFormatError(f"{file} is not a readable safetensors file: {e}") from e
    if "tok_embeddings.weight" not in tensors:
        raise ModelFormatError(f"{path}: no embedding tensor found in the safetensors files")
    size = sum(f.stat().st_size for f in files)
    return Checkpoint(
        config=config,
        tensors=tensors,
        path=path,
        file_size=size,
        tokenizer_source=path,
        metadata={"general.name": hf.get("_name_or_path", "")},
    )


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    model_type = hf.get("model_type", "")
    arch = HF_ARCHS.get(model_type)
    if arch is None:
        raise UnsupportedModelError(
            f"unknown model_type {model_type!r} in config.json; supported: {', '.join(HF_ARCHS)}"
        )
    for key in REQUIRED_INTS:
        v = hf.get(key)
        if v is None:
            raise ModelFormatError(f"the {model_type} config lacks {key!r}")
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ModelFormatError(f"{key}={v!r} is not a positive integer")
    dim = hf["hidden_size"]
    n_heads = hf["num_attention_heads"]
    common: dict[str, Any] = dict(
        arch=arch,
        vocab_size=hf["vocab_size"],
        dim=dim,
        n_layers=hf["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or dim // n_heads,
        intermediate_size=hf["intermediate_size"],
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=_rope_theta(hf),
        rope_scaling=_rope_scaling(hf.get("rope_scaling") or hf.get("rope_parameters")),
        max_seq_len=hf.get("max_position_embeddings", 2048),
        tie_embeddings=hf.get("tie_word_embeddings", arch == "gemma3"),
        qkv_bias=bool(hf.get("attention_bias", arch == "qwen2")),
    )
    if arch == "gemma3":
        layer_types = hf.get("layer_types") or []
        pattern = (
            (layer_types.index("full_attention") + 1) if "full_attention" in layer_types else 6
        )
        common.update(
            activation="gelu_tanh",
            embed_scale=dim**0.5,
            qk_norm=True,
            sandwich_norm=True,
            query_scale=hf.get("query_pre_attn_scalar", common["head_dim"]) ** -0.5,
            sliding_window=hf.get("sliding_window"),
            sliding_window_pattern=hf.get("sliding_window_pattern") or pattern,
            rope_local_theta=_local_theta(hf),
            final_logit_softcap=hf.get("final_logit_softcapping"),
        )
    return ModelConfig(**common)


def _rope_theta(hf: dict[str, Any]) -> float:
    params = hf.get("rope_parameters") or {}
    if "full_attention" in params:
        params = params["full_attention"]
    return float(hf.get("rope_theta") or params.get("rope_theta") or 10000.0)


def _local_theta(hf: dict[str, Any]) -> float:
    params = hf.get("rope_parameters") or {}
    local = params.get("sliding_attention") or {}
    return float(hf.get("rope_local_base_freq") or local.get("rope_theta") or 10000.0)


def _rope_scaling(rs: dict[str, Any] | None) -> RopeScaling:
    if not rs:
        return RopeScaling()
    if "full_attention" in rs:
        rs = rs["full_attention"]
    kind = rs.get("rope_type") or rs.get("type") or "none"
    if kind == "llama3":
        return RopeScaling(
            kind="llama3",
            factor=float(rs["factor"]),
            low_freq_factor=float(rs.get("low_freq_factor", 1.0)),
            high_freq_factor=float(rs.get("high_freq_factor", 4.0)),
            original_max_len=int(rs.get("original_max_position_embeddings", 8192)),
        )
    if kind == "linear":
        return RopeScaling(kind="linear", factor=float(rs["factor"]))
    return RopeScaling()
