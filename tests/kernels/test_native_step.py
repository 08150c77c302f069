"""The native step (kernels/native_step.cpp) against independent references.

- One linear layer (`BlockLinear`) against the `gguf` package's dequantizer: y = x_hat W^T with
  W decoded by `gguf.quants.dequantize` and x_hat the activations rounded to int8 per 32-block
  in plain PyTorch (round half to even, scale amax / 127), in float64.
- The AVX2 path everywhere, the AVX-512 VNNI path where the CPU has it: bit-identical results.
- The whole model (`NativeStepModel`) against the float Transformer on the same file with its
  linear inputs rounded the same way, prefill then decode across KV block boundaries, for
  llama (q/k rows permuted in the file) and qwen2 (q/k/v biases).
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from miaotui.kernels.build import cpu_supports_kernels, load_native
from miaotui.load.gguf_file import read_gguf
from miaotui.model.attention import build_attention_metadata
from miaotui.model.build import build_model
from miaotui.model.kv_cache import Int8KVCache, KVCache
from miaotui.model.native_step import GGML_TYPES, build_native_step
from tests.helpers import hf_model, write_gguf

ops = load_native()
# Only a CPU without AVX2 + FMA may go without the native step; a failed build is a failure.
pytestmark = pytest.mark.skipif(not cpu_supports_kernels(), reason="no AVX2 + FMA on this CPU")


@pytest.fixture(autouse=True)
def native_built():
    assert ops is not None, "the native step failed to build (see the warning logged above)"


ISAS = ["avx2"] + (["vnni"] if ops is not None and ops.cpu_has_vnni() else [])


def quantize_rows_reference(x: torch.Tensor) -> torch.Tensor:
    """x (N, K) -> x_hat (float64): each 32-block rounded to int8 as llama.cpp's Q8 does, in
    IEEE float32 like the kernel (q = round_half_even(x * (127 / amax)), scale amax / 127), so
    that values on a rounding boundary round the same way. numpy, not torch: torch's vectorised
    127 / amax may be a reciprocal times 127, an ulp off, which moves exact ties."""
    xb = x.float().numpy().reshape(x.shape[0], -1, 32)
    amax = np.abs(xb).max(-1, keepdims=True)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(127.0) / amax, np.float32(0.0)).astype(np.float32)
    q = np.round(xb * inv)
    d = (amax / np.float32(127.0)).astype(np.float32)
    return torch.from_numpy(q.astype(np.float64) * d.astype(np.float64)).view(x.shape)


def gguf_weight(qtype: str, m: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (M, K) weight in GGUF `qtype` blocks -> (bytes (M, row_bytes), gguf's float64)."""
    import gguf

    rng = np.random.default_rng(seed)
    w = rng.standard_normal((m, k)).astype(np.float32) * 0.05
    t = gguf.GGMLQuantizationType[qtype]
    q = gguf.quants.quantize(w, t)
    deq = gguf.quants.dequantize(q, t)
    return torch.from_numpy(np.ascontiguousarray(q)), torch.from_numpy(deq).double()


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
@pytest.mark.parametrize("isa", ISAS)
def test_block_linear_matches_gguf_dequantize(qtype: str, isa: str):
    m, k = 72, 576  # 18 blocks a row (odd tails of the 8-wide loops), rows not a multiple of 8
    w, deq = gguf_weight(qtype, m, k, seed=1)
    bias = torch.randn(m)
    linear = ops.BlockLinear(w, GGML_TYPES[qtype], k, 2, isa)
    for n in (1, 2, 3, 5, 17, 100):  # 100: rows in L1-sized chunks (40 at k = 576)
        x = torch.randn(n, k)
        want = quantize_rows_reference(x) @ deq.T + bias.double()
        got = linear(x, bias)
        scale = want.abs().max().item()
        assert (got.double() - want).abs().max().item() < 2e-6 * scale, (qtype, n)
        # the reference is sharp: plain float activations are measurably further away
        plain = x.double() @ deq.T + bias.double()
        assert (plain - want).abs().max().item() > 1e-4 * scale


@pytest.mark.parametrize("qtype", ["Q4_1", "Q8_0"])
def test_isas_bit_identical_and_rows_batch_invariant(qtype: str):
    w, _ = gguf_weight(qtype, 64, 256, seed=2)
    x = torch.randn(130, 256)  # two chunks of rows (96 at 256 columns)
    qt = GGML_TYPES[qtype]
    ref = ops.BlockLinear(w, qt, 256, 1, "avx2")(x)
    for isa in ISAS:
        for threads in (1, 2):
            got = ops.BlockLinear(w, qt, 256, threads, isa)(x)
            assert torch.equal(got, ref), (isa, threads)
    alone = ops.BlockLinear(w, qt, 256, 1, ISAS[-1])
    for i in (0, 5, 129):  # a row alone is the same bits as in the batch of 130
        assert torch.equal(alone(x[i : i + 1])[0], ref[i])


def test_bad_weight_is_a_clear_error():
    w, _ = gguf_weight("Q8_0", 8, 64, seed=3)
    with pytest.raises(RuntimeError, match="bytes per row"):
        ops.BlockLinear(w, GGML_TYPES["Q8_0"], 96, 1, "avx2")
    with pytest.raises(RuntimeError, match="unsupported GGML type"):
        ops.BlockLinear(w, 12, 64, 1, "avx2")


# ---- the whole model ----------------------------------------------------------------------------


def fake_quant_linear_inputs(model: torch.nn.Module) -> None:
    """Round every nn.Linear input as the native step rounds its activations."""

    def hook(_module, args):
        x = args[0]
        shape = x.shape
        return (quantize_rows_reference(x.reshape(-1, shape[-1])).float().view(shape),)

    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear):
            mod.register_forward_pre_hook(hook)


class HalfRoundedKVCache(KVCache):
    """A float32 cache holding K/V rounded to float16, as the native step's cache does."""

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        super().write(layer, slots, k.half().float(), v.half().float())


def step_logits(
    model, chunks: list[list[int]], config, int8_kv: bool = False, num_layers: int | None = None
) -> list[torch.Tensor]:
    """Prefill chunks[0], then each further chunk as one step; block size 4 so that contexts
    cross block boundaries; logits of every token (after the first num_layers layers when
    given). int8_kv: both models on an Int8KVCache."""
    block = 4
    total = sum(len(c) for c in chunks)
    n_blocks = total // block + 2
    kv_heads, kv_dtype, _ = model.kv_spec()
    cls = KVCache if kv_dtype == torch.float16 else HalfRoundedKVCache
    if int8_kv:
        cls, kv_dtype = Int8KVCache, torch.float32
    cache = cls(
        config.n_layers,
        (n_blocks + 1) * block,
        kv_heads,
        config.head_dim,
        kv_dtype,
        torch.device("cpu"),
    )
    table = list(range(1, n_blocks + 1))
    out, pos = [], 0
    with torch.inference_mode():
        for chunk in chunks:
            meta = build_attention_metadata([pos], [len(chunk)], [table], block)
            out.append(model(torch.tensor(chunk), meta, cache, None, num_layers))
            pos += len(chunk)
    return out


@pytest.mark.parametrize(
    ("arch", "qtype"), [("llama", "Q8_0"), ("qwen2", "Q4_1"), ("llama", "Q4_0")]
)
def test_native_model_matches_float_model_with_rounded_activations(tmp_path, arch, qtype):
    path = write_gguf(hf_model(arch, seed=4), arch, tmp_path / "m.gguf", qtype)
    ckpt = read_gguf(path)
    ref = build_model(ckpt, torch.device("cpu"), torch.float32, "float")
    fake_quant_linear_inputs(ref)
    native = build_native_step(ckpt, threads=2, isa=ISAS[-1])
    assert native is not None
    ids = torch.randint(
        0, ckpt.config.vocab_size, (19,), generator=torch.Generator().manual_seed(5)
    )
    chunks = [ids[:9].tolist()] + [[t] for t in ids[9:].tolist()]
    want = torch.cat(step_logits(ref, chunks, ckpt.config))
    got = torch.cat(step_logits(native, chunks, ckpt.config))
    scale = want.abs().max().item()
    # measured ~4e-7 of the logit range (float32 summation order); a wrong block layout, RoPE
    # order or bias costs ~1, and unrounded activations alone ~1e-2
    assert_close_rows(got, want)
    plain = build_model(ckpt, torch.device("cpu"), torch.float32, "float")
    unrounded = torch.cat(step_logits(plain, chunks, ckpt.config))
    assert (unrounded - want).abs().max().item() > 1e-3 * scale


def test_native_model_first_layers_match_float_model(tmp_path):
    """num_layers=k (a self-draft) runs the first k layers, then the final norm and the head:
    against the rounded float model's first k blocks, prefill and decode."""
    ckpt = read_gguf(write_gguf(hf_model("llama", seed=4), "llama", tmp_path / "m.gguf", "Q4_1"))
    ref = build_model(ckpt, torch.device("cpu"), torch.float32, "float")
    fake_quant_linear_inputs(ref)
    native = build_native_step(ckpt, threads=2)
    chunks = [[3, 14, 15, 92, 65, 35, 89], [79], [32], [38]]
    c = ckpt.config
    whole = torch.cat(step_logits(native, chunks, c))
    for k in (1, c.n_layers - 1):
        got = torch.cat(step_logits(native, chunks, c, num_layers=k))
        assert_close_rows(got, torch.cat(step_logits(ref, chunks, c, num_layers=k)))
        assert (got - whole).abs().max() > 1e-2 * whole.abs().max()
    with pytest.raises(RuntimeError, match="num_layers must be in 1"):
        step_logits(native, chunks, c, num_layers=c.n_layers + 1)


def test_native_model_long_context_splits_attention(tmp_path):
    """Contexts past 256 positions are split across attention work items and merged: prefill of
    300 tokens in chunks, then decode, against the rounded float model."""
    hf = hf_model("llama", seed=8, max_position_embeddings=640)
    ckpt = read_gguf(write_gguf(hf, "llama", tmp_path / "m.gguf", "Q8_0"))
    ref = build_model(ckpt, torch.device("cpu"), torch.float32, "float")
    fake_quant_linear_inputs(ref)
    native = build_native_step(ckpt, threads=2)
    ids = torch.randint(
        0, ckpt.config.vocab_size, (560,), generator=torch.Generator().manual_seed(9)
    )
    ids = ids.tolist()
    chunks = [ids[:300], ids[300:520]] + [[t] for t in ids[520:]]
    want = torch.cat(step_logits(ref, chunks, ckpt.config))
    got = torch.cat(step_logits(native, chunks, ckpt.config))
    assert_close_rows(got, want)
    assert_close_rows(got[256:], want[256:])  # the rows whose context is split


def test_native_model_int8_kv_cache_matches_float_model_on_it(tmp_path):
    """--kv-cache-dtype int8 on the native step: the same Int8KVCache layout and rounding as the
    float model's, read in place (prefill, decode, block boundaries)."""
    path = write_gguf(hf_model("llama", seed=4), "llama", tmp_path / "m.gguf", "Q8_0")
    ckpt = read_gguf(path)
    ref = build_model(ckpt, torch.device("cpu"), torch.float32, "float")
    fake_quant_linear_inputs(ref)
    native = build_native_step(ckpt, threads=2, isa=ISAS[-1])
    ids = torch.randint(
        0, ckpt.config.vocab_size, (19,), generator=torch.Generator().manual_seed(7)
    )
    chunks = [ids[:9].tolist()] + [[t] for t in ids[9:].tolist()]
    want = torch.cat(step_logits(ref, chunks, ckpt.config, int8_kv=True))
    got = torch.cat(step_logits(native, chunks, ckpt.config, int8_kv=True))
    assert_close_rows(got, want)
    # the int8 cache is really read: the float16-cache logits are measurably elsewhere
    half = torch.cat(step_logits(native, chunks, ckpt.config))
    assert (half - got).abs().max().item() > 1e-4 * want.abs().max().item()


def assert_close_rows(got: torch.Tensor, want: torch.Tensor) -> None:
    """Logits (T, V) of the native step vs the rounded float reference. Both round activations
    to int8, but rms_norm / RoPE / float16 K/V rounding in a different order can put a value on
    the other side of an int8 rounding boundary: one step of one block moves that token's
    output by ~1e-2 of the logit range, and every later token that attends to its K/V a little
    (measured up to 8e-3; rows without such a flip agree to 4e-7). A wrong split merge, block
    layout, RoPE order or bias moves rows by ~1."""
    scale = want.abs().max().item()
    err = (got - want).abs().amax(-1)
    assert err.max().item() < 2e-2 * scale
    top2 = want.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 5e-2 * scale
    assert torch.equal(got.argmax(-1)[clear], want.argmax(-1)[clear])


def test_native_model_same_logits_alone_and_in_a_batch(tmp_path):
    path = write_gguf(hf_model("llama", seed=6), "llama", tmp_path / "m.gguf", "Q8_0")
    ckpt = read_gguf(path)
    native = build_native_step(ckpt, threads=2)
    c = ckpt.config
    cache = KVCache(
        c.n_layers, 64 * 4, c.n_kv_heads, c.head_dim, torch.float16, torch.device("cpu")
    )
    seqs = [[1, 2, 3, 4, 5, 6], [7, 8, 9], [10, 11, 12, 13, 14, 15, 16, 17, 18]]
    tables = [list(range(1, 5)), list(range(5, 9)), list(range(9, 13))]
    with torch.inference_mode():
        meta = build_attention_metadata([0, 0, 0], [len(s) for s in seqs], tables, 4)
        batched = native(torch.tensor(sum(seqs, [])), meta, cache)
        alone = []
        for s, t in zip(seqs, tables):
            meta = build_attention_metadata([0], [len(s)], [t], 4)
            alone.append(native(torch.tensor(s), meta, cache))
    assert torch.equal(batched, torch.cat(alone))


def test_greedy_tokens_are_torch_argmax_of_the_logits_ties_to_the_first(tmp_path):
    """The argmax the step finds with the output head is torch.argmax of the logits it returns,
    across the head's work items (16 vocabulary rows each at this size), and a tie goes to the
    first token: the second half of the vocabulary repeats the first half's head rows."""
    model = hf_model("llama", seed=11)  # untied: the head is its own weight
    with torch.no_grad():
        model.lm_head.weight[64:] = model.lm_head.weight[:64]
    ckpt = read_gguf(write_gguf(model, "llama", tmp_path / "m.gguf", "Q8_0"))
    native = build_native_step(ckpt, threads=2)
    c = ckpt.config
    cache = KVCache(c.n_layers, 16 * 4, c.n_kv_heads, c.head_dim, torch.float16, "cpu")
    ids = torch.randint(0, c.vocab_size, (40,), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        logits = native(ids, build_attention_metadata([0], [40], [list(range(1, 12))], 4), cache)
    got = native.greedy_tokens()
    assert torch.equal(logits[:, 64:], logits[:, :64])  # every row's best is tied
    assert got is not None and torch.equal(got, torch.argmax(logits, dim=-1))
    assert int(got.max()) < 64


def test_thread_pool_survives_a_busy_core(tmp_path):
    """Two pool threads with a third process spinning on the 2-core box: the step completes (no
    barrier that waits forever for a descheduled thread) and gives the same logits."""
    path = write_gguf(hf_model("llama", seed=7), "llama", tmp_path / "m.gguf", "Q8_0")
    ckpt = read_gguf(path)
    one, two = build_native_step(ckpt, threads=1), build_native_step(ckpt, threads=2)
    ids = list(range(1, 12))
    want = step_logits(one, [ids[:3]] + [[t] for t in ids[3:]], ckpt.config)
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        for _ in range(5):
            got = step_logits(two, [ids[:3]] + [[t] for t in ids[3:]], ckpt.config)
            assert all(torch.equal(a, b) for a, b in zip(got, want))
    finally:
        busy.kill()
        busy.wait()


@pytest.mark.parametrize("cache_cls", [KVCache, Int8KVCache])
@pytest.mark.parametrize(
    "heads",
    [{}, {"hidden_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1},
     {"hidden_size": 192, "num_attention_heads": 3, "num_key_value_heads": 1}],
    ids=["head_dim16", "head_dim64_gqa2", "head_dim64_gqa3"],
)  # fmt: skip
def test_prefill_tile_and_decode_give_the_same_bits(tmp_path, cache_cls, heads):
    """A token's logits are the same bits whether it is computed inside a prefill tile (several
    query tokens per attention item, V from the tile buffer) or as a decode step (one token, V
    read from the cache; at head_dim 64, for 2 or 3 query heads per KV head, those heads'
    products in one pass over the V rows). Across the 256-position attention split on the
    default model: tests/test_real_model.py (this tiny model's positions end at 256)."""
    model = hf_model("llama", seed=8, **heads)
    path = write_gguf(model, "llama", tmp_path / "m.gguf", "Q4_1")
    ckpt = read_gguf(path)
    native = build_native_step(ckpt, threads=2)
    c, n, split_at = ckpt.config, 240, 200
    ids = torch.randint(0, c.vocab_size, (n,), generator=torch.Generator().manual_seed(9))
    table = list(range(1, n // 4 + 2))

    def fresh():
        return cache_cls(
            c.n_layers, (n // 4 + 2) * 4, c.n_kv_heads, c.head_dim, torch.float16, "cpu"
        )

    with torch.inference_mode():
        full = native(ids, build_attention_metadata([0], [n], [table], 4), fresh())
        cache = fresh()
        parts = [
            native(ids[:split_at], build_attention_metadata([0], [split_at], [table], 4), cache)
        ]
        for p in range(split_at, n):
            parts.append(
                native(ids[p : p + 1], build_attention_metadata([p], [1], [table], 4), cache)
            )
    assert torch.equal(full, torch.cat(parts))
