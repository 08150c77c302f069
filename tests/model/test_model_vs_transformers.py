"""Our forward pass against Hugging Face transformers on tiny random models, loaded both from a
HF directory and from a GGUF file: prefill and every decode step within 1e-4 (fp32)."""

from __future__ import annotations

import pytest
import torch

from miaotui.load.gguf_file import read_gguf
from miaotui.load.hf_dir import read_hf_dir
from miaotui.model.attention import build_attention_metadata
from miaotui.model.build import build_model
from miaotui.model.kv_cache import KVCache
from tests.helpers import hf_model, run_steps, save_hf_dir, write_gguf

ARCHS = ["llama", "qwen2", "gemma3"]


def _reference_logits(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()  # (T, V)


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request, tmp_path_factory):
    arch = request.param
    hf = hf_model(arch)
    d = tmp_path_factory.mktemp(arch)
    save_hf_dir(hf, d / "hf")
    write_gguf(hf, arch, d / "model.gguf")
    return arch, hf, d


@pytest.mark.parametrize("source", ["gguf", "hf"])
def test_prefill_and_decode_match_transformers(tiny, source):
    arch, hf, d = tiny
    ckpt = read_gguf(d / "model.gguf") if source == "gguf" else read_hf_dir(d / "hf")
    model = build_model(ckpt, torch.device("cpu"), torch.float32)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, hf.config.vocab_size, (14,), generator=g).tolist()
    ref = _reference_logits(hf, ids)
    ours = run_steps(model, ids, prefill=6)
    for step, logits in enumerate(ours):
        torch.testing.assert_close(
            logits, ref[5 + step], atol=1e-4, rtol=1e-4, msg=f"{arch}/{source} step {step}"
        )


def test_batched_sequences_of_different_lengths(tiny):
    """Two sequences in one packed batch give the same logits as each alone."""
    arch, hf, d = tiny
    model = build_model(read_hf_dir(d / "hf"), torch.device("cpu"), torch.float32)
    a, b = list(range(3, 12)), list(range(20, 24))
    c = model.config
    cache = KVCache(c.n_layers, 64, c.n_kv_heads, c.head_dim, torch.float32, torch.device("cpu"))
    meta = build_attention_metadata(
        [0, 0], [len(a), len(b)], [[1, 2, 3], [5, 6]], 4, c.sliding_window
    )
    with torch.inference_mode():
        logits = model(torch.tensor(a + b), meta, cache)
    torch.testing.assert_close(logits[: len(a)], _reference_logits(hf, a), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits[len(a) :], _reference_logits(hf, b), atol=1e-4, rtol=1e-4)
