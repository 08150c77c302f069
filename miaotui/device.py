"""Device, dtype, threads and seeds: chosen here and nowhere else."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from miaotui.errors import InvalidRequestError

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


@dataclass(frozen=True)
class DeviceConfig:
    """Where the model runs and in which floating-point type."""

    device: str = "auto"
    """"auto" (cuda if present, else cpu), "cpu" or "cuda[:n]"."""
    dtype: str = "fp32"
    """Activation/weight float type: "fp32", "bf16" or "fp16"."""
    threads: int | None = None
    """CPU intra-op threads; None keeps torch's default."""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise InvalidRequestError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")


def resolve_device(cfg: DeviceConfig) -> torch.device:
    """The torch device for `cfg.device`."""
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidRequestError(f"device {cfg.device!r} requested but CUDA is not available")
    return torch.device(cfg.device)


def resolve_dtype(cfg: DeviceConfig) -> torch.dtype:
    return DTYPES[cfg.dtype]


def setup_threads(threads: int | None) -> None:
    """Set torch's intra-op thread count once, at start-up."""
    if threads is None:
        threads = int(os.environ.get("MIAOTUI_THREADS", "0")) or None
    if threads:
        torch.set_num_threads(threads)
