"""Transformed checkpoints (transforms/checkpoint.py): save -> load gives identical logits
(torch.equal) for int8, int4 (sym/asym), W8A8 and calibrated models, pruned shapes that differ
per layer reload as saved, and `--model DIR` / `LLM(model=DIR)` / `miaotui quantize` use them."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from miaotui.config import CacheConfig
from miaotui.load.checkpoint import Checkpoint
from miaotui.load.hf_dir import read_hf_dir
from miaotui.model.build import build_model
from miaotui.model.standalone import forward_sequences
from miaotui.transforms.calibrate import CalibrationConfig
from miaotui.transforms.checkpoint import load_transformed, save_transformed
from miaotui.transforms.pipeline import apply_transforms
from miaotui.transforms.spec import TransformContext, parse_specs
from tests.helpers import CALIBRATION_TEXT, hf_model, save_hf_dir

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = [list(range(5, 45)), list(range(60, 71))]


def write_char_tokenizer(path: Path) -> None:
    """A tokenizer.json of single characters (ids < 98, fits the 128-token tiny models)."""
    from tokenizers import Tokenizer, decoders, models

    vocab = {"<unk>": 0, "</s>": 1, "\n": 2} | {chr(i): 3 + i - 32 for i in range(32, 127)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))


class CharTokenizer:
    def encode(self, text: str, add_special: bool = True) -> list[int]:
        return [3 + ord(c) - 32 if 32 <= ord(c) < 127 else 0 for c in text]


@pytest.fixture(scope="module", params=["llama", "qwen2", "gemma3"])
def tiny_dir(request, tmp_path_factory) -> Path:
    d = save_hf_dir(hf_model(request.param), tmp_path_factory.mktemp(request.param) / "hf")
    write_char_tokenizer(d)
    return d


def transformed(hf_dir: Path, specs: str):
    ckpt = read_hf_dir(hf_dir)
    model = build_model(ckpt, torch.device("cpu"), torch.float32)
    ctx = TransformContext(
        CharTokenizer(), CalibrationConfig(CALIBRATION_TEXT, num_windows=4, window=64)
    )
    return ckpt, apply_transforms(model, parse_specs(specs), ctx)


def assert_same_logits(a, b) -> None:
    for x, y in zip(forward_sequences(a, IDS), forward_sequences(b, IDS)):
        assert torch.equal(x, y)


@pytest.mark.parametrize(
    "specs", ["int8", "int4-rtn-g32", "int4-rtn-g64-asym", "w8a8", "w8a8-smooth", "int4-awq-g32"]
)
def test_reload_gives_identical_logits(tiny_dir, tmp_path, specs):
    ckpt, model = transformed(tiny_dir, specs)
    save_transformed(model, ckpt, tmp_path / "out", specs)
    loaded, tok = load_transformed(tmp_path / "out")
    assert_same_logits(model, loaded)
    assert tok.encode("hi", add_special=False) == CharTokenizer().encode("hi")
    # Nothing is dequantized at load: the packed buffers come back as saved.
    for (n, a), (m, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n == m and a.dtype == b.dtype and torch.equal(a, b), n


def test_manifest_records_layout_specs_and_source(tiny_dir, tmp_path):
    ckpt, model = transformed(tiny_dir, "int4-gptq-g32-asym")
    out = tmp_path / "out"
    save_transformed(model, ckpt, out, "int4-gptq-g32-asym")
    man = json.loads((out / "miaotui.json").read_text())
    assert man["transforms"] == "int4-gptq-g32-asym" and man["source"] == str(tiny_dir)
    wq = man["modules"]["layers.0.attention.wq"]
    assert wq == {"kind": "int4", "shape": [64, 64], "group_size": 32, "bias": wq["bias"]} | {
        "symmetric": False
    }
    assert man["modules"]["output"]["kind"] == "int8"
    assert man["modules"]["tok_embeddings"]["kind"] == "embedding-int8"
    assert man["config"]["n_layers"] == len(man["layers"]) == model.config.n_layers
    if model.config.tie_embeddings:  # the head's codes are stored once
        assert man["aliases"]["output.qweight"] == "tok_embeddings.qweight"
    assert (out / "tokenizer.json").is_file()
    assert_same_logits(model, load_transformed(out)[0])


def _shrink_layer(model, layer: int, keep_heads: int, keep_ffn: int) -> None:
    """What structured pruning does to one block: fewer q heads (whole GQA groups kept uniform
    is the pruner's business; here 2 of 4 q heads over 2 KV heads) and a narrower MLP."""
    block = model.layers[layer]
    att, mlp, d = block.attention, block.feed_forward, model.config.head_dim

    def linear(w: torch.Tensor, b: torch.Tensor | None = None) -> nn.Linear:
        lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
        lin.weight = nn.Parameter(w.clone(), requires_grad=False)
        if b is not None:
            lin.bias = nn.Parameter(b.clone(), requires_grad=False)
        return lin

    q_rows = torch.cat([torch.arange(h * d, (h + 1) * d) for h in (0, 2)])  # one per KV group
    assert keep_heads == 2
    bias = None if att.wq.bias is None else att.wq.bias[q_rows]
    att.wq = linear(att.wq.weight[q_rows], bias)
    att.wo = linear(att.wo.weight[:, q_rows])
    att.n_heads = keep_heads
    mlp.w_gate = linear(mlp.w_gate.weight[:keep_ffn])
    mlp.w_up = linear(mlp.w_up.weight[:keep_ffn])
    mlp.w_down = linear(mlp.w_down.weight[:, :keep_ffn])


@pytest.mark.parametrize("then", ["", "int4-rtn-g32", "w8a8"])
def test_pruned_shapes_differ_per_layer_and_reload(tiny_dir, tmp_path, then):
    """Layer 1 with half the q heads and a 64-wide MLP, the last layer removed: the reloaded
    model has the same per-layer shapes (read from the saved tensors) and identical logits."""
    ckpt = read_hf_dir(tiny_dir)
    model = build_model(ckpt, torch.device("cpu"), torch.float32)
    _shrink_layer(model, 1, keep_heads=2, keep_ffn=64)
    n = len(model.layers)
    model.layers = model.layers[:-1]  # as prune-layers does: fewer blocks, config to match
    model.config = dataclasses.replace(model.config, n_layers=n - 1)
    if then:
        ctx = TransformContext(
            CharTokenizer(), CalibrationConfig(CALIBRATION_TEXT, num_windows=2, window=64)
        )
        model = apply_transforms(model, parse_specs(then), ctx)
    save_transformed(model, ckpt, tmp_path / "out", "manual-prune" + (f"+{then}" if then else ""))
    loaded, _ = load_transformed(tmp_path / "out")
    assert len(loaded.layers) == n - 1 == loaded.config.n_layers
    for a, b in zip(model.layers, loaded.layers):
        assert (a.attention.n_heads, a.attention.n_kv_heads) == (
            b.attention.n_heads,
            b.attention.n_kv_heads,
        )
        assert a.feed_forward.w_up.out_features == b.feed_forward.w_up.out_features
        assert a.sliding == b.sliding and a.attention.layer == b.attention.layer
    assert loaded.layers[1].attention.n_heads == 2
    assert loaded.layers[1].feed_forward.w_down.in_features == 64
    assert_same_logits(model, loaded)


def test_llm_and_cli_load_a_saved_checkpoint(tiny_dir, tmp_path):
    """`miaotui quantize DIR -o OUT` end to end, then `LLM(model=OUT)` runs the saved model."""
    from miaotui.cli import main
    from miaotui.llm import LLM
    from miaotui.sampling_params import SamplingParams

    out = tmp_path / "q"
    assert (
        main(["quantize", str(tiny_dir), "--bits", "4", "--group-size", "32", "-o", str(out)]) == 0
    )
    ref, _ = load_transformed(out)
    llm = LLM(model=str(out), cache=CacheConfig(num_blocks=64), max_model_len=128)
    assert_same_logits(ref, llm.engine.runner.model)
    res = llm.generate(["Hello"], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    assert len(res[0].token_ids) == 5


@pytest.mark.slow
def test_gguf_tokenizer_survives_the_round_trip(tmp_path, smollm_path):
    """A GGUF source's tokenizer is stored as its metadata and rebuilt identically."""
    from miaotui.load.gguf_file import read_gguf
    from miaotui.load.open import load_tokenizer

    real = read_gguf(smollm_path)
    ckpt, model = transformed(save_hf_dir(hf_model("llama"), tmp_path / "hf"), "int8")
    fake = Checkpoint(
        config=ckpt.config,
        tensors={},
        path=smollm_path,
        file_size=0,
        tokenizer_source=real.tokenizer_source,
        metadata=dict(real.metadata),
    )
    save_transformed(copy.deepcopy(model), fake, tmp_path / "out", "int8")
    _, tok = load_transformed(tmp_path / "out")
    text = "The capital of France is Paris. <|im_start|>user\nHi 🐱"
    assert tok.encode(text) == load_tokenizer(real).encode(text)
    assert tok.eos_id == load_tokenizer(real).eos_id
