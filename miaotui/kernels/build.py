"""Builds the C++ kernels on first use (once per process) and caches the binaries on disk:
quant_gemm.cpp (int8/int4 linear layers on our packed layouts) and native_step.cpp (the fused
forward pass over GGUF blocks, with native_isa.h).

Each build directory is ~/.cache/miaotui/<name>-<hash>, keyed by the sources, the compiler flags,
and the torch and Python versions, so an edited source or a new torch gets a fresh build and an
unchanged one loads in milliseconds. A failed build or a CPU without AVX2 yields None and one
warning; callers then use the plain PyTorch reference path.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
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
# The native step has its own thread pool (no OpenMP) and needs C++20 for std::atomic::wait;
# its AVX-512 half is enabled per function by `#pragma GCC target`, dispatched at run time.
NATIVE_SOURCES = [
    Path(__file__).with_name("native_step.cpp"),
    Path(__file__).with_name("native_isa.h"),
]
NATIVE_CFLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-std=c++20", "-ffp-contract=off"]


def cpu_supports_kernels() -> bool:
    """True on x86-64 CPUs with AVX2 and FMA (torch reports them as AVX2 or AVX512 capability)."""
    machine = platform.machine().lower()
    capability = torch.backends.cpu.get_cpu_capability()
    return machine in ("x86_64", "amd64") and capability in ("AVX2", "AVX512")


def build_dir(
    sources: list[Path] | None = None, flags: list[str] | None = None, name: str = "kernels"
) -> Path:
    """Where the compiled kernels of these sources, flags, torch and Python live."""
    key = hashlib.sha256()
    for source in sources or [SOURCE]:
        key.update(source.read_bytes())
    key.update(" ".join(flags if flags is not None else CFLAGS + LDFLAGS).encode())
    key.update(f"{torch.__version__} {sys.version_info[:2]}".encode())
    return Path.home() / ".cache" / "miaotui" / f"{name}-{key.hexdigest()[:16]}"


@functools.cache
def load_kernels() -> ModuleType | None:
    """Compiles (first time on this machine) and loads the kernels; returns the extension module
    (int8_linear, int4_linear, choose_path, quantize_activations), or None after logging why
    they cannot be used. A pybind11 module rather than torch.ops: ~2 µs less per call."""
    return _load_extension("kernels", [SOURCE], CFLAGS, LDFLAGS)


@functools.cache
def load_native() -> ModuleType | None:
    """The native-step extension (NativeModel, BlockLinear, cpu_has_vnni), or None after one
    warning when it cannot be built or run here."""
    return _load_extension("native", NATIVE_SOURCES, NATIVE_CFLAGS, [])


def _load_extension(
    name: str, sources: list[Path], cflags: list[str], ldflags: list[str]
) -> ModuleType | None:
    if not cpu_supports_kernels():
        logger.warning(
            "miaotui %s kernels need an x86-64 CPU with AVX2+FMA (found %s, capability %s); "
            "using the plain PyTorch path",
            name,
            platform.machine(),
            torch.backends.cpu.get_cpu_capability(),
        )
        return None
    directory = build_dir(sources, cflags + ldflags, name)
    module_name = f"miaotui_{name}_{directory.name.split('-')[-1]}"
    built = directory / f"{module_name}.so"
    if built.is_file():  # warm start: import the binary, no compiler toolchain imported
        try:
            return _import_binary(module_name, built)
        except ImportError as e:
            logger.info("rebuilding %s (%s)", built, e)
    try:
        from torch.utils.cpp_extension import load

        directory.mkdir(parents=True, exist_ok=True)
        return load(
            name=module_name,
            sources=[str(s) for s in sources if s.suffix == ".cpp"],
            extra_cflags=cflags,
            extra_ldflags=ldflags,
            build_directory=str(directory),
            verbose=False,
        )
    except Exception as e:  # a compiler error, missing ninja or headers: fall back, don't fail
        logger.warning(
            "miaotui %s kernels did not build in %s (%s); using the plain PyTorch path",
            name,
            directory,
            e,
        )
        return None


def _import_binary(module_name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def kernels_available() -> bool:
    """True when the compiled AVX2 kernels are loaded (builds them on first call)."""
    return load_kernels() is not None
