"""A bounded run of the coverage-guided GGUF fuzzer (bench/fuzz_gguf.py, atheris): a few
seconds of mutated model files through the reader, the loader and the tokenizer; any exception
other than a MiaotuiError, a hang or an RSS blow-up is a crash and fails the test with the
input's file. The long run is `.venv/bin/python bench/fuzz_gguf.py`."""

from __future__ import annotations

import pytest

from bench import fuzz_gguf

pytestmark = pytest.mark.timeout(120)
SECONDS = 4


def test_seed_model_loads(tmp_path):
    """The fuzzer's seed is a valid model: mutations start from a file that gets everywhere."""
    path = fuzz_gguf.write_seed_model(tmp_path / "seed.gguf")
    fuzz_gguf.load_model_file(path)


def test_bounded_fuzz_finds_no_crash(tmp_path):
    result = fuzz_gguf.fuzz(SECONDS, tmp_path, rss_limit_mb=2048, seed=1)  # reproducible
    assert result["crashes"] == 0, result
    assert result["returncode"] == 0, result
    assert result["executions"] > 1000, result  # it really ran, on more than the seed
    assert result["corpus_files"] > 5, result
