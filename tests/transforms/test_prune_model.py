"""prune_model on tiny random models: exact masks in the model, Wanda / SparseGPT against
magnitude at the model level, structured removal equal to zeroing the same structures in the
original model, engine runs, save and reload, sparse execution, prune then quantize."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from miaotui.config import CacheConfig, EngineConfig, ModelConfig
from miaotui.errors import InvalidRequestError
from miaotui.model.attention import build_attention_metadata
from miaotui.model.kv_cache import KVCache
from miaotui.model.sparse_linear import SparseLinear
from miaotui.model.standalone import forward_sequences
from miaotui.model.transformer import Transformer
from miaotui.transforms.calibrate import CalibrationConfig
from miaotui.transforms.checkpoint import save_transformed
from miaotui.transforms.pipeline import apply_transforms
from miaotui.transforms.prune import head_plan, prune_model, sparsify_model
from miaotui.transforms.spec import PruneSpec, TransformContext, parse_spec, parse_specs
from tests.helpers import CALIBRATION_TEXT, SHARED

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 128
OUTLIERS = [3, 17, 40, 51]
"""Residual channels scaled up by the norms, like the outlier features of real LLMs."""


class ByteTokenizer:
    """Calibration only calls encode(): UTF-8 bytes folded into the tiny vocabulary."""

    def encode(self, text: str, add_special: bool = False) -> list[int]:
        return [b % VOCAB for b in text.encode()]


CTX = TransformContext(
    ByteTokenizer(), CalibrationConfig(CALIBRATION_TEXT, num_windows=8, window=64)
)


@pytest.fixture(scope="module")
def tokenizer():
    """Any real tokenizer will do for the engine (prompts are token ids): the default model's."""
    from miaotui.load.open import load_tokenizer, open_checkpoint

    return load_tokenizer(open_checkpoint(None))


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    """A random 4-layer llama (4 q / 2 KV heads, F=96) whose norms carry outlier channels."""
    cfg = dict(
        arch="llama",
        vocab_size=VOCAB,
        dim=64,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        head_dim=16,
        intermediate_size=96,
        max_seq_len=512,
    )
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**dict(cfg, **overrides)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.requires_grad_(False)
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
                p[OUTLIERS] *= 8
    return model.eval()


def held_out(n: int = 2, length: int = 96) -> list[list[int]]:
    """Token windows from a text the calibration never saw."""
    ids = ByteTokenizer().encode((SHARED / "data" / "text" / "wiki_dev.txt").read_text()[:4000])
    return [ids[i * length : (i + 1) * length] for i in range(n)]


def logits_of(model: Transformer, seqs: list[list[int]] | None = None) -> torch.Tensor:
    return torch.cat(forward_sequences(model, seqs or held_out()))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def block_linears(model: Transformer) -> dict[str, torch.Tensor]:
    return {
        n: m.weight
        for n, m in model.named_modules()
        if n.startswith("layers.") and isinstance(m, (nn.Linear, SparseLinear))
    }


# ----------------------------------------------------------------------------- unstructured


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("sparsity", [0.25, 0.5])
def test_exact_sparsity_per_linear(method, sparsity):
    model = tiny_model()
    emb = model.tok_embeddings.weight.clone()
    prune_model(model, PruneSpec(method, sparsity), CTX)
    for name, w in block_linears(model).items():
        zeros = w == 0
        if method == "wanda":  # per output row
            k = w.shape[1]
            assert (zeros.sum(1) == round(sparsity * k)).all(), name
        else:  # per layer
            assert int(zeros.sum()) == round(sparsity * w.numel()), name
    assert torch.equal(model.tok_embeddings.weight, emb)  # embeddings / head stay dense
    assert not any(isinstance(m, SparseLinear) for m in model.modules())  # below crossover


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("nm", [(2, 4), (4, 8)])
def test_nm_pattern_per_linear(method, nm):
    model = tiny_model()
    prune_model(model, parse_spec(f"prune-{method}-{nm[0]}:{nm[1]}"), CTX)
    n, m = nm
    for name, w in block_linears(model).items():
        kept = (w.reshape(-1, m) != 0).sum(1)
        assert (kept == n).all(), name


def test_wanda_and_sparsegpt_beat_magnitude_on_logits():
    dense = tiny_model()
    ref = logits_of(dense)
    err = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        model = prune_model(copy.deepcopy(dense), PruneSpec(method, 0.5), CTX)
        err[method] = rel_err(logits_of(model), ref)
    assert err["wanda"] < 0.9 * err["magnitude"], err
    assert err["sparsegpt"] < 0.9 * err["magnitude"], err


def save_and_reload(model: Transformer, out: Path, specs: str) -> Transformer:
    """Through transforms/checkpoint.py, as `miaotui prune -o OUT` and `--model OUT` do."""
    from miaotui.load.checkpoint import Checkpoint
    from miaotui.load.transformed import read_transformed
    from miaotui.model.build import build_model

    src = Checkpoint(model.config, {}, out.parent / "tiny.gguf", 0, tokenizer_source={})
    save_transformed(model, src, out, specs)
    return build_model(read_transformed(out), torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("spec", ["prune-wanda-0.5", "prune-sparsegpt-2:4"])
def test_pruned_zeros_survive_save_and_reload(spec, tmp_path):
    model = apply_transforms(tiny_model(), parse_specs(spec), CTX)
    loaded = save_and_reload(model, tmp_path / "pruned", spec)
    before, after = block_linears(model), block_linears(loaded)
    for name, w in after.items():
        assert isinstance(loaded.get_submodule(name), nn.Linear)
        assert torch.equal(w, before[name]), name  # zeros (and everything else) bit-exact
        assert int((w == 0).sum()) == w.numel() // 2, name
    torch.testing.assert_close(logits_of(loaded), logits_of(model), atol=0, rtol=0)


# ----------------------------------------------------------------------------- sparse execution


def test_sparse_linear_equals_dense():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=g)
    w[torch.rand(48, 64, generator=g) < 0.95] = 0
    bias = torch.randn(48, generator=g)
    dense = nn.Linear(64, 48)
    dense.weight.data, dense.bias.data = w, bias
    sparse = SparseLinear.from_linear(dense)
    assert torch.equal(sparse.weight, w)
    for x in (torch.randn(1, 64, generator=g), torch.randn(7, 64, generator=g)):
        torch.testing.assert_close(sparse(x), dense(x), atol=1e-5, rtol=1e-5)
        assert sparse(x).is_contiguous()
    assert torch.equal(sparse.to_linear().weight, w)


def test_sparse_layers_only_above_crossover(tmp_path):
    dense = tiny_model()
    model = prune_model(copy.deepcopy(dense), PruneSpec("magnitude", 0.95), CTX)
    sparse = [m for m in model.modules() if isinstance(m, SparseLinear)]
    assert len(sparse) == 7 * 4
    # Same function as the zero-filled dense weights.
    zeroed = copy.deepcopy(model)
    assert sparsify_model(zeroed, min_sparsity=1.01) == 0
    assert not any(isinstance(m, SparseLinear) for m in zeroed.modules())
    torch.testing.assert_close(logits_of(model), logits_of(zeroed), atol=1e-4, rtol=1e-4)
    loaded = save_and_reload(model, tmp_path / "sparse", "prune-magnitude-0.95")
    assert sum(isinstance(m, SparseLinear) for m in loaded.modules()) == 7 * 4
    torch.testing.assert_close(logits_of(loaded), logits_of(model), atol=0, rtol=0)


# ----------------------------------------------------------------------------- structured


def zeroed_reference_logits(ref: Transformer, seqs: list[list[int]], skip: set[int]):
    """Logits of `ref` run in a plain loop over its blocks, skipping the blocks in `skip`."""
    c = ref.config
    out = []
    with torch.no_grad():
        for s in seqs:
            n_blocks = -(-len(s) // 16)
            cache = KVCache(
                c.n_layers, (n_blocks + 1) * 16, c.n_kv_heads, c.head_dim, torch.float32, "cpu"
            )
            meta = build_attention_metadata([0], [len(s)], [list(range(1, n_blocks + 1))], 16)
            x = ref.tok_embeddings(torch.tensor(s))
            rope = {False: ref.rotary(meta.positions)}
            rope[True] = rope[False]
            for i, block in enumerate(ref.layers):
                if i not in skip:
                    x = block(x, rope, meta, cache)
            out.append(ref.logits(ref.norm(x)))
    return torch.cat(out)


def matching_rows(orig: torch.Tensor, new: torch.Tensor, width: int = 1) -> list[int]:
    """Which units (groups of `width` rows) of `orig` the rows of `new` are copies of."""
    o = orig.reshape(orig.shape[0] // width, -1)
    n = new.reshape(new.shape[0] // width, -1)
    same = (o[:, None, :] == n[None, :, :]).all(-1)  # (units_orig, units_new)
    assert (same.sum(0) == 1).all()
    return same.int().argmax(0).tolist()


def run_engine(model: Transformer, tok, prompt: list[int], n: int = 6) -> list[int]:
    from miaotui.llm import LLM
    from miaotui.loader import engine_for_model
    from miaotui.sampling_params import SamplingParams

    cfg = EngineConfig.from_kwargs(
        device="cpu", max_model_len=256, cache=CacheConfig(num_blocks=32)
    )
    llm = LLM.from_engine(engine_for_model(model, tok, cfg))
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    return llm.generate([prompt], params)[0].token_ids


def greedy(logits_fn, prompt: list[int], n: int = 6) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(logits_fn([ids])[-1].argmax()))
    return ids[len(prompt) :]


def check_runs_like(model: Transformer, ref_logits_fn, tok, out: Path):
    """Logits equal the reference; the engine generates what the reference would; the model
    saves and reloads with the same logits."""
    seqs = held_out()
    logits = logits_of(model, seqs)
    torch.testing.assert_close(logits, ref_logits_fn(seqs), atol=1e-4, rtol=1e-4)
    prompt = seqs[0][:20]
    assert run_engine(model, tok, prompt) == greedy(ref_logits_fn, prompt)
    # The config describes the shapes: a fresh model built from it takes the weights.
    Transformer(model.config).load_state_dict(model.state_dict(), strict=True)
    loaded = save_and_reload(model, out, "prune")
    assert loaded.config == model.config
    torch.testing.assert_close(logits_of(loaded, seqs), logits, atol=0, rtol=0)


def test_remove_layers_equals_skipping_them(tokenizer, tmp_path):
    dense = tiny_model()
    ref, blocks = copy.deepcopy(dense), list(dense.layers)
    model = prune_model(dense, parse_spec("prune-layers-0.5"), CTX)
    kept = {id(b) for b in model.layers}
    skip = {i for i, b in enumerate(blocks) if id(b) not in kept}
    assert len(skip) == 2 and model.config.n_layers == 2 and len(model.layers) == 2
    assert [b.attention.layer for b in model.layers] == [0, 1]
    check_runs_like(
        model, lambda seqs: zeroed_reference_logits(ref, seqs, skip), tokenizer, tmp_path / "out"
    )


@pytest.mark.parametrize(("sparsity", "mode"), [(0.5, "group"), (0.75, "within_group")])
def test_remove_heads_equals_zeroing_them(sparsity, mode, tokenizer, tmp_path):
    # 8 q heads in 2 groups of 4: 0.5 removes a whole KV group, 0.75 three q heads per group.
    dense = tiny_model(n_heads=8, n_kv_heads=2, head_dim=8)
    assert head_plan(8, 2, sparsity)[0] == mode
    ref = copy.deepcopy(dense)
    model = prune_model(dense, PruneSpec("heads", sparsity, recover=False), CTX)
    c = model.config
    assert (c.n_heads, c.n_kv_heads) == ((4, 1) if mode == "group" else (2, 2))
    for block, rblock in zip(model.layers, ref.layers):
        att, ratt = block.attention, rblock.attention
        assert (att.n_heads, att.n_kv_heads) == (c.n_heads, c.n_kv_heads)
        assert att.wq.weight.shape == (c.n_heads * 8, 64)
        assert att.wk.weight.shape == att.wv.weight.shape == (c.n_kv_heads * 8, 64)
        assert att.wo.weight.shape == (64, c.n_heads * 8)
        kept = matching_rows(ratt.wq.weight, att.wq.weight, width=8)
        gone = [h for h in range(8) if h not in kept]
        with torch.no_grad():
            for h in gone:  # a removed q head: no query and nothing into wo
                ratt.wq.weight[h * 8 : (h + 1) * 8] = 0
                ratt.wo.weight[:, h * 8 : (h + 1) * 8] = 0
    check_runs_like(model, lambda seqs: logits_of(ref, seqs), tokenizer, tmp_path / "out")


def test_remove_channels_equals_zeroing_them(tokenizer, tmp_path):
    dense = tiny_model()
    ref = copy.deepcopy(dense)
    model = prune_model(dense, PruneSpec("channels", 0.25, recover=False), CTX)
    assert model.config.intermediate_size == 72
    for block, rblock in zip(model.layers, ref.layers):
        mlp, rmlp = block.feed_forward, rblock.feed_forward
        assert mlp.w_gate.weight.shape == mlp.w_up.weight.shape == (72, 64)
        assert mlp.w_down.weight.shape == (64, 72)
        kept = matching_rows(rmlp.w_up.weight, mlp.w_up.weight)
        gone = [j for j in range(96) if j not in kept]
        with torch.no_grad():
            rmlp.w_gate.weight[gone] = 0
            rmlp.w_up.weight[gone] = 0
    check_runs_like(model, lambda seqs: logits_of(ref, seqs), tokenizer, tmp_path / "out")


@pytest.mark.parametrize("method", ["channels", "heads"])
def test_recovery_reduces_error(method):
    dense = tiny_model(n_heads=8, n_kv_heads=2, head_dim=8)
    ref = logits_of(dense, held_out(4))
    err = {}
    for recover in (False, True):
        model = prune_model(copy.deepcopy(dense), PruneSpec(method, 0.5, recover=recover), CTX)
        err[recover] = rel_err(logits_of(model, held_out(4)), ref)
    assert err[True] < err[False], err


def test_bad_specs():
    model = tiny_model()
    with pytest.raises(InvalidRequestError, match="removable fractions"):
        prune_model(model, PruneSpec("heads", 0.1), CTX)  # 4 q / 2 KV: 1/4 is the smallest
    with pytest.raises(InvalidRequestError, match="N:M"):
        prune_model(model, PruneSpec("channels", nm=(2, 4)), CTX)
    with pytest.raises(InvalidRequestError, match="layers"):
        prune_model(model, PruneSpec("layers", 0.95), CTX)
    with pytest.raises(InvalidRequestError, match="inputs"):
        prune_model(model, PruneSpec("magnitude", nm=(2, 5)), CTX)


# ----------------------------------------------------------------------------- + quantization


def test_prune_then_quantize_keeps_zeros():
    pytest.importorskip("miaotui.transforms.quantize")
    from miaotui.model.quant_linear import QuantLinear

    model = apply_transforms(tiny_model(), parse_specs("prune-wanda-0.5+int4-rtn-g32"), CTX)
    quant = {
        n: m
        for n, m in model.named_modules()
        if n.startswith("layers.") and isinstance(m, QuantLinear)
    }
    assert len(quant) == 7 * 4
    for name, m in quant.items():
        w = m.dequantized_weight()
        # symmetric int4 maps 0 to code 0: the pruned half stays exactly zero
        assert ((w == 0).sum(1) >= w.shape[1] // 2).all(), name
