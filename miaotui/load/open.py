"""A model name -> an opened Checkpoint (GGUF file, HF directory or saved transformed
checkpoint) and its tokenizer."""

from __future__ import annotations

from pathlib import Path

from miaotui.errors import MiaotuiError, ModelFormatError
from miaotui.load.checkpoint import Checkpoint
from miaotui.load.gguf_file import read_gguf
from miaotui.load.gguf_parse import check_tokenizer_metadata
from miaotui.load.hf_dir import read_hf_dir
from miaotui.load.resolve import resolve_model
from miaotui.load.transformed import is_transformed_dir, read_transformed
from miaotui.tokenizer import TextTokenizer


def open_checkpoint(name: str | None) -> Checkpoint:
    """Open a model by GGUF path, HF directory or short name."""
    path = resolve_model(name)
    if is_transformed_dir(path):
        return read_transformed(path)  # written by `miaotui quantize` / `miaotui prune`
    if path.is_dir():
        return read_hf_dir(path)
    if path.stat().st_size < 8:
        raise ModelFormatError(f"{path} is too small to be a model file")
    try:
        return read_gguf(path)
    except (TypeError, ValueError, OverflowError, ZeroDivisionError, RuntimeError) as e:
        # A metadata value of the wrong type or range (a string head count, NaN, zero heads,
        # a head count that does not divide the q rows: torch's RuntimeError on the reshape).
        raise ModelFormatError(f"{path}: inconsistent GGUF metadata: {e}") from e


def load_tokenizer(ckpt: Checkpoint) -> TextTokenizer:
    """The checkpoint's tokenizer: from its HF directory or its GGUF metadata."""
    if isinstance(ckpt.tokenizer_source, Path):
        return TextTokenizer.from_hf_dir(ckpt.tokenizer_source)
    check_tokenizer_metadata(ckpt.tokenizer_source, ckpt.config.vocab_size)
    try:
        return TextTokenizer.from_gguf_metadata(ckpt.tokenizer_source)
    except MiaotuiError:
        raise
    except Exception as e:  # `tokenizers` reports a bad vocabulary or merge as a bare Exception
        raise ModelFormatError(f"{ckpt.path}: the GGUF tokenizer cannot be built: {e}") from e
