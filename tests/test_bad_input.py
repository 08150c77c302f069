"""Every user mistake gives one clear error naming the problem: from the API a MiaotuiError
subclass whose message says what is wrong, from the CLI exactly one stderr line starting with
"miaotui: error:", exit status 2 and no traceback. Nothing hangs (every CLI run has a timeout).

The CLI's error cases run in this process through `miaotui.cli.main` (exit status, stdout and
stderr as the script gives them); the controls and one error case run as `python -m miaotui.cli`
subprocesses, started together by one module fixture (each pays Python + torch start-up)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

from miaotui import LLM, CacheConfig, EngineConfig, SamplingParams
from miaotui.errors import (
    InvalidRequestError,
    MiaotuiError,
    ModelFormatError,
    ModelNotFoundError,
    UnsupportedModelError,
)
from tests import helpers

CLI_TIMEOUT = 120  # seconds; a healthy failing run takes a few
pytestmark = pytest.mark.timeout(CLI_TIMEOUT + 60)  # nothing here may hang


# ---- bad files, written once per module ---------------------------------------------------------


def _byte_chars() -> list[str]:
    """GPT-2's byte -> printable character table (openai/gpt-2 encoder.py), in byte order."""
    bs = list(range(ord("!"), ord("~") + 1))
    bs += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def _tiny_gguf(
    path: Path,
    iq2_tensor: str | None = None,
    qtype: str = "F32",
    claimed_ffn: int | None = None,
    claimed_heads: int | None = None,
    **overrides,
) -> Path:
    """A tiny llama with a byte-level tokenizer over the 128 ASCII bytes (one token per byte, no
    merges: fast to load) and a minimal chat template. `iq2_tensor` is written as IQ2_XXS instead
    (66 bytes per 256 values: a type gguf-py reads but miaotui cannot decode); `claimed_ffn` and
    `claimed_heads` are metadata that contradicts the tensors."""
    import gguf

    class Writer(gguf.GGUFWriter):
        def add_feed_forward_length(self, length):
            super().add_feed_forward_length(claimed_ffn or length)

        def add_head_count(self, count):
            super().add_head_count(count if claimed_heads is None else claimed_heads)

        def write_header_to_file(self, *args, **kwargs):
            self.add_tokenizer_model("gpt2")
            self.add_tokenizer_pre("default")
            self.add_token_list(_byte_chars()[:128])
            self.add_token_merges([])
            self.add_eos_token_id(0)
            self.add_chat_template("{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
            super().write_header_to_file(*args, **kwargs)

        def add_tensor(self, name, tensor, raw_shape=None, raw_dtype=None):
            if name == iq2_tensor:
                rows, k = tensor.shape
                tensor = np.random.default_rng(0).integers(
                    0, 256, (rows, k // 256 * 66), dtype=np.uint8
                )
                raw_shape, raw_dtype = tensor.shape, gguf.GGMLQuantizationType.IQ2_XXS
            super().add_tensor(name, tensor, raw_shape=raw_shape, raw_dtype=raw_dtype)

    hf = helpers.hf_model("llama", **overrides)
    with mock.patch.object(gguf, "GGUFWriter", Writer):
        return helpers.write_gguf(hf, "llama", path, qtype)


def _mamba_gguf(path: Path) -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), "mamba")
    w.add_block_count(1)
    w.add_embedding_length(32)
    w.add_tensor("token_embd.weight", np.zeros((8, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad")
    good = _tiny_gguf(d / "good.gguf")
    data = good.read_bytes()
    out = {
        "good": good,
        "missing": d / "does_not_exist.gguf",
        "mamba": _mamba_gguf(d / "mamba.gguf"),
        "iq2": _tiny_gguf(d / "iq2.gguf", "blk.0.ffn_down.weight", intermediate_size=256),
        "inconsistent": _tiny_gguf(d / "inconsistent.gguf", qtype="Q8_0", claimed_ffn=128),
        "zero_heads": _tiny_gguf(d / "zero_heads.gguf", claimed_heads=0),
    }
    not_gguf = d / "notes.gguf"
    not_gguf.write_text("These are my notes, not a model.\n" * 40)
    out["not_gguf"] = not_gguf
    # Cut inside the magic, the header, the metadata, the tensor infos, the tensor data.
    for n in (3, 6, 20, 200, 1500, 4000, len(data) // 2, len(data) - 1):
        p = d / f"truncated_{n}.gguf"
        p.write_bytes(data[:n])
        out[f"truncated_{n}"] = p
    return out


# ---- the API ----------------------------------------------------------------------------------


def test_missing_file(files):
    with pytest.raises(ModelNotFoundError, match="does_not_exist.gguf.*not found"):
        LLM(str(files["missing"]))


def test_not_gguf(files):
    with pytest.raises(ModelFormatError, match="not a GGUF file"):
        LLM(str(files["not_gguf"]))


def test_truncated_at_any_point(files):
    names = [k for k in files if k.startswith("truncated_")]
    assert len(names) == 8
    for name in names:
        with pytest.raises(ModelFormatError, match="truncated|too small") as e:
            LLM(str(files[name]))
        assert str(files[name]) in str(e.value)


def test_unknown_architecture(files):
    with pytest.raises(UnsupportedModelError, match="'mamba'.*supported: llama, qwen2, gemma3"):
        LLM(str(files["mamba"]))


@pytest.mark.parametrize("weights", ["native", "float"])
def test_unsupported_tensor_type(files, weights):
    with pytest.raises(UnsupportedModelError, match="w_down.*IQ2_XXS.*cannot decode"):
        LLM(str(files["iq2"]), weights=weights)


@pytest.mark.parametrize("weights", ["native", "float"])
def test_metadata_contradicting_tensors(files, weights):
    """feed_forward_length says 128, the FFN matrices have 96 rows: both load paths refuse
    (the native path builds modules from the tensors and once ran such a file silently)."""
    with pytest.raises(ModelFormatError, match=r"w_gate.weight has shape \(96, 64\).*\(128, 64\)"):
        LLM(str(files["inconsistent"]), weights=weights)


def _config_edit(**changes):
    def edit(d: Path) -> None:
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(changes)
        (d / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))

    return edit


HF_DIR_CASES = {
    "no config.json": (lambda d: (d / "config.json").unlink(), "without config.json"),
    "config not JSON": (lambda d: (d / "config.json").write_text("{oops"), "not valid JSON"),
    "config a list": (lambda d: (d / "config.json").write_text("[1]"), "not a JSON object"),
    "key missing": (_config_edit(hidden_size=None), "lacks 'hidden_size'"),
    "key a string": (_config_edit(num_hidden_layers="3"), "num_hidden_layers='3' is not"),
    "unknown model_type": (_config_edit(model_type="mamba"), "unknown model_type 'mamba'"),
    "no weights": (lambda d: (d / "model.safetensors").unlink(), "no *.safetensors"),
    "bad weights": (
        lambda d: (d / "model.safetensors").write_bytes(b"junk" * 64),
        "not a readable safetensors",
    ),
    "no tokenizer.json": (lambda d: None, "no tokenizer.json"),
}


def test_zero_heads_in_metadata(files):
    with pytest.raises(ModelFormatError, match="head_count=0 is not a positive integer"):
        LLM(str(files["zero_heads"]))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("hf") / "model"
    return helpers.save_hf_dir(helpers.hf_model("llama"), d)


@pytest.mark.parametrize("case", list(HF_DIR_CASES))
def test_bad_hf_directory(hf_dir, tmp_path, case):
    edit, message = HF_DIR_CASES[case]
    d = tmp_path / "model"
    shutil.copytree(hf_dir, d)
    edit(d)
    with pytest.raises(MiaotuiError, match=re.escape(message)):
        LLM(str(d))


@pytest.fixture(scope="module")
def llm(files) -> LLM:
    return LLM(str(files["good"]), max_model_len=16)


def test_empty_prompt(llm):
    with pytest.raises(InvalidRequestError, match="prompt is empty"):
        llm.generate("")
    with pytest.raises(InvalidRequestError, match="prompt is empty"):
        llm.generate([[]])


def test_prompt_longer_than_context(llm):
    with pytest.raises(InvalidRequestError, match="has 20 tokens but the context holds 16"):
        llm.generate("twenty ascii letters")


def test_token_ids_outside_vocabulary(llm):
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        llm.generate([[5, 128]])


def test_rejected_batch_leaves_nothing_queued(llm):
    """One bad prompt rejects the whole call: the good ones before it must not stay queued."""
    with pytest.raises(InvalidRequestError, match="prompt is empty"):
        llm.generate(["fine", ""])
    assert not llm.engine.has_unfinished()


def test_engine_still_works_after_errors(llm):
    res = llm.generate("Hello", SamplingParams(max_tokens=3, temperature=0.0))[0]
    assert len(res.token_ids) == 3 and not llm.engine.has_unfinished()


BAD_PARAMS = [
    ("max_tokens", 0),
    ("temperature", -0.5),
    ("temperature", float("nan")),
    ("top_k", -1),
    ("top_p", 0.0),
    ("top_p", 1.5),
    ("min_p", -0.1),
    ("repetition_penalty", 0.0),
    ("presence_penalty", 2.5),
    ("frequency_penalty", -3.0),
    ("logprobs", 21),
    ("n", 0),
    ("n", True),
    ("max_tokens", 2.5),
    ("temperature", "hot"),
    ("repetition_penalty", float("inf")),
    ("seed", 2**64),
    ("stop", 5),
    ("stop", ["ok", None]),
    ("stop_token_ids", [-1]),
]


@pytest.mark.parametrize(("name", "value"), BAD_PARAMS, ids=[f"{n}={v}" for n, v in BAD_PARAMS])
def test_out_of_range_sampling_params(name, value):
    with pytest.raises(InvalidRequestError, match=f"{name}=") as e:
        SamplingParams(**{name: value})
    assert e.value.param == name and "expected" in str(e.value)


# Each was once accepted: 0 meant "the model's full context", -1 threads reached
# torch.set_num_threads as a RuntimeError, fp64 failed only after the file was read, and a negative
# KV budget said "the KV cache holds 1 blocks".
BAD_CONFIGS = {
    "max_model_len=0": (dict(max_model_len=0), "max_model_len"),
    "threads=-1": (dict(threads=-1), "threads"),
    "dtype=fp64": (dict(dtype="fp64"), "dtype"),
    "memory_gib=-1": (dict(cache=dict(memory_gib=-1.0)), "memory_gib"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_engine_config_checks_its_fields(case):
    kwargs, field = BAD_CONFIGS[case]
    kwargs = dict(kwargs)
    with pytest.raises(InvalidRequestError, match=field):
        if "cache" in kwargs:
            kwargs["cache"] = CacheConfig(**kwargs["cache"])
        EngineConfig.from_kwargs(**kwargs)


def test_bad_engine_config():
    with pytest.raises(InvalidRequestError, match="weights"):
        EngineConfig(weights="int3")
    with pytest.raises(MiaotuiError, match="max_num_seqs"):
        EngineConfig.from_kwargs(max_num_seqs=0)


# ---- the CLI ----------------------------------------------------------------------------------


def _cli_cases(files: dict[str, Path]) -> dict[str, tuple[list[str], str]]:
    """case -> (arguments, text the error line must contain)."""
    gen = ["generate", "--max-tokens", "4"]
    cases = {
        "missing": (gen + ["--model", str(files["missing"]), "hi"], "not found"),
        "not_gguf": (gen + ["--model", str(files["not_gguf"]), "hi"], "not a GGUF file"),
        "mamba": (gen + ["--model", str(files["mamba"]), "hi"], "unknown architecture 'mamba'"),
        "iq2": (gen + ["--model", str(files["iq2"]), "hi"], "IQ2_XXS"),
        "info_truncated": (["info", str(files["truncated_1500"])], "truncated"),
        "chat_missing": (["chat", "--model", str(files["missing"]), "hi"], "not found"),
        "empty_prompt": (gen + ["--model", str(files["good"]), ""], "prompt is empty"),
        "too_long": (
            gen + ["--model", str(files["good"]), "--max-model-len", "8", "a b c d e f g h i j"],
            "context holds 8",
        ),
        "temperature": (
            gen + ["--model", str(files["good"]), "--temperature", "-1", "hi"],
            "temperature=-1",
        ),
        "dtype": (gen + ["--model", str(files["good"]), "--dtype", "fp64", "hi"], "fp64"),
    }
    cases["threads"] = (gen + ["--model", str(files["good"]), "--threads", "-1", "hi"], "threads")
    cases["truncated"] = (gen + ["--model", str(files["truncated_200"]), "hi"], "truncated")
    # Controls: the same machinery succeeds on a good file (chat: one user turn per argument).
    cases["generate_ok"] = (gen + ["--model", str(files["good"]), "hi", "there"], "")
    cases["chat_ok"] = (["chat", "--max-tokens", "3", "--model", str(files["good"]), "a", "b"], "")
    return cases


SUBPROCESS_CASES = ("generate_ok", "chat_ok", "missing")
"""Run as `python -m miaotui.cli` (the rest in this process, through `main`): the controls, and
one error to show the one-line contract holds in a real process, import time included."""


@pytest.fixture(scope="module")
def cli_runs(files) -> dict[str, tuple[subprocess.CompletedProcess, str]]:
    """The SUBPROCESS_CASES, started together (each pays Python + torch start-up; on 2 cores
    they overlap)."""
    cases = _cli_cases(files)
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "miaotui.cli", *cases[name][0]],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env=dict(os.environ, MIAOTUI_THREADS="1"),
            cwd=helpers.REPO,
        )
        for name in SUBPROCESS_CASES
    }
    runs = {}
    try:
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=CLI_TIMEOUT)
            runs[name] = (
                subprocess.CompletedProcess(proc.args, proc.returncode, out, err),
                cases[name][1],
            )
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return runs


def run_cli_here(args: list[str], capsys, monkeypatch) -> subprocess.CompletedProcess:
    """`miaotui.cli.main(args)` in this process, as the script runs it (exit status from
    SystemExit, stdout and stderr captured); torch's thread count is restored afterwards."""
    import torch

    from miaotui.cli import main

    monkeypatch.setenv("MIAOTUI_THREADS", "1")
    threads = torch.get_num_threads()
    capsys.readouterr()
    try:
        code = main(args)
    except SystemExit as e:
        code = e.code
    finally:
        torch.set_num_threads(threads)
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["miaotui", *args], code or 0, out, err)


CLI_CASES = [
    "missing",
    "not_gguf",
    "mamba",
    "iq2",
    "info_truncated",
    "chat_missing",
    "empty_prompt",
    "too_long",
    "temperature",
    "dtype",
    "truncated",
    "threads",
]


def _assert_one_line_error(run: subprocess.CompletedProcess, expected: str) -> None:
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("miaotui: error: "), run.stderr
    assert expected in lines[0]
    assert "Traceback" not in run.stderr + run.stdout
    assert run.returncode == 2


@pytest.mark.slow
def test_cli_succeeds_on_a_good_model(cli_runs):
    for case in ("generate_ok", "chat_ok"):
        run, _ = cli_runs[case]
        assert run.returncode == 0, run.stderr
        assert "error" not in run.stderr and len(run.stdout.splitlines()) >= 2


@pytest.mark.slow
def test_cli_one_line_error_in_a_subprocess(cli_runs):
    _assert_one_line_error(*cli_runs["missing"])


@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_one_line_error(files, case, capsys, monkeypatch):
    args, expected = _cli_cases(files)[case]
    _assert_one_line_error(run_cli_here(args, capsys, monkeypatch), expected)
