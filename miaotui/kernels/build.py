"""Builds quant_gemm.cpp on first use (once per process) and caches the binary on disk.

The build directory is ~/.cache/miaotui/kernels-<hash>, keyed by the source, the compiler flags,
and the torch and Python versions, so an edited source or a new torch gets a fresh build and an
unchanged one loads in milliseconds. A failed build or a CPU without AVX2 yields None and one
warning; callers then use the plain PyTorch reference path.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import platform
import sys
from pathlib import Path
from types import ModuleType

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("quant_gemm.cpp")
# -fopenmp: at::parallel_for is a header template that only runs in parallel when the including
# code is compiled with OpenMP; libgomp resolves to the copy torch already loaded (same soname).
CFLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"]
LDFLAGS = ["-fopenmp"]


def cpu_supports_kernels() -> bool:
    """True on x86-64 CPUs with AVX2 and FMA (torch reports them as AVX2 or AVX512 capability)."""
    machine = platform.machine().lower()
    capability = torch.backends.cpu.get_cpu_capability()
    return machine in ("x86_64", "amd64") and capability in ("AVX2", "AVX512")


def build_dir() -> Path:
    """Where the compiled kernels of this source, flags, torch and Python live."""
    key = hashlib.sha256()
    key.update(SOURCE.read_bytes())
    key.update(" ".join(CFLAGS + LDFLAGS).encode())
    key.update(f"{torch.__version__} {sys.version_info[:2]}".encode())
    return Path.home() / ".cache" / "miaotui" / f"kernels-{key.hexdigest()[:16]}"


@functools.cache
def load_kernels() -> ModuleType | None:
    """Compiles (first time on this machine) and loads the kernels; returns the extension module
    (int8_linear, int4_linear, choose_path, quantize_activations), or None after logging why
    they cannot be used. A pybind11 module rather than torch.ops: ~2 µs less per call."""
    if not cpu_supports_kernels():
        logger.warning(
            "miaotui kernels need an x86-64 CPU with AVX2+FMA (found %s, capability %s); "
            "using the plain PyTorch path",
            platform.machine(),
            torch.backends.cpu.get_cpu_capability(),
        )
        return None
    directory = build_dir()
    try:
        from torch.utils.cpp_extension import load

        directory.mkdir(parents=True, exist_ok=True)
        module = load(
            name=f"miaotui_kernels_{directory.name.split('-')[-1]}",
            sources=[str(SOURCE)],
            extra_cflags=CFLAGS,
            extra_ldflags=LDFLAGS,
            build_directory=str(directory),
            verbose=False,
        )
    except Exception as e:  # a compiler error, missing ninja or headers: fall back, don't fail
        logger.warning(
            "miaotui kernels did not build in %s (%s); using the plain PyTorch path", directory, e
        )
        return None
    return module


def kernels_available() -> bool:
    """True when the compiled AVX2 kernels are loaded (builds them on first call)."""
    return load_kernels() is not None
