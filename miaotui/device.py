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


def free_cpus(sample_s: float = 0.05) -> int:
    """CPUs this process may use that other processes are not keeping busy right now: the
    affinity set minus the busy share /proc/stat shows over a short sample (our own process
    sleeps meanwhile), rounded, at least 1. Used as the native step's default thread count, so
    a second thread is not started onto a core that is already taken."""
    import os
    import time

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    usable = usable or 1

    def busy_total() -> tuple[int, int] | None:
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
        return sum(v) - idle, sum(v)

    first = busy_total()
    if first is None:
        return usable
    time.sleep(sample_s)
    second = busy_total()
    total = max(1, second[1] - first[1])
    busy_cpus = (second[0] - first[0]) / total * (os.cpu_count() or usable)
    return max(1, min(usable, round(usable - busy_cpus)))
