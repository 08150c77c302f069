"""Device, dtype, threads and seeds: chosen here and nowhere else."""

from __future__ import annotations

import torch

from miaotui.config import DeviceConfig
from miaotui.errors import InvalidRequestError

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def resolve_device(cfg: DeviceConfig) -> torch.device:
    """The torch device for `cfg.device`."""
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidRequestError(f"device {cfg.device!r} requested but CUDA is not available")
    return torch.device(cfg.device)


def resolve_dtype(cfg: DeviceConfig) -> torch.dtype:
    """The torch dtype for `cfg.dtype`."""
    return DTYPES[cfg.dtype]


def setup_threads(threads: int | None) -> None:
    """Set torch's intra-op thread count when the user asked for a number; None leaves torch's
    process-wide setting alone (library code never changes it behind the user's back)."""
    if threads is not None:
        torch.set_num_threads(threads)
