"""Continuous batching changes nothing: greedy tokens of several prompts generated together equal
each prompt generated alone, also with chunked prefill (small token budget), a KV cache so small
that requests are preempted and recomputed, and prefix-cache hits. The reference is a fresh engine
without prefix caching running one prompt at a time.

The model is a tiny random llama with SmolLM2's vocabulary and tokenizer, written as GGUF by
`tiny_chat_gguf` (also used by test_sampling.py and test_bad_input.py)."""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import pytest
import torch

from miaotui import LLM, CacheConfig, Completion, EngineConfig, GenerationResult, SamplingParams
from miaotui.loader import engine_for_model
from tests import helpers
from tests.helpers import default_model_path

TINY_CHAT = dict(vocab_size=49152, max_position_embeddings=512)


def tiny_hf_model(seed: int = 0):
    """The transformers twin of the model `tiny_chat_gguf` writes."""
    return helpers.hf_model("llama", seed=seed, **TINY_CHAT)


def tiny_chat_gguf(tmp_path_factory: pytest.TempPathFactory, qtype: str = "F32") -> Path:
    """Tiny random llama GGUF (matrices in `qtype`) with SmolLM2's tokenizer metadata, written
    once per test session."""
    import gguf

    path = tmp_path_factory.getbasetemp() / f"tiny_chat_{qtype}.gguf"
    if path.exists():
        return path
    reader = gguf.GGUFReader(str(default_model_path()))
    meta = {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}

    class WithTokenizer(gguf.GGUFWriter):
        def write_header_to_file(self, *args, **kwargs):
            self.add_tokenizer_model(meta["tokenizer.ggml.model"])
            self.add_tokenizer_pre(meta["tokenizer.ggml.pre"])
            self.add_token_list(meta["tokenizer.ggml.tokens"])
            self.add_token_types(meta["tokenizer.ggml.token_type"])
            self.add_token_merges(meta["tokenizer.ggml.merges"])
            self.add_bos_token_id(meta["tokenizer.ggml.bos_token_id"])
            self.add_eos_token_id(meta["tokenizer.ggml.eos_token_id"])
            self.add_add_bos_token(meta["tokenizer.ggml.add_bos_token"])
            self.add_chat_template(meta["tokenizer.chat_template"])
            super().write_header_to_file(*args, **kwargs)

    tmp = path.with_suffix(".part")
    with mock.patch.object(gguf, "GGUFWriter", WithTokenizer):
        helpers.write_gguf(tiny_hf_model(), "llama", tmp, qtype)
    tmp.rename(path)
    return path


def engine_variant(base: LLM, **kwargs) -> LLM:
    """A fresh engine (own KV cache and scheduler) on `base`'s already loaded model."""
    kwargs.setdefault("cache", CacheConfig(num_blocks=128))
    cfg = EngineConfig(**kwargs)
    return LLM.from_engine(engine_for_model(base.engine.runner.model, base.tokenizer, cfg))


# Different lengths (1 to 90 tokens); the last two share a 3-block prefix.
SHARED_PREFIX = "In the beginning there was a very long shared preamble about engines, " * 3
PROMPTS = [
    "Hi",
    "The quick brown fox jumps over the lazy dog.",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n" * 3,
    SHARED_PREFIX + "and then a question?",
    SHARED_PREFIX + "or an answer.",
]
# logprobs=2 gives each step's top-2 log-probabilities: their gap tells where the greedy choice
# is a near tie that numerical noise may legitimately flip.
GREEDY = SamplingParams(max_tokens=24, temperature=0.0, logprobs=2)
# The float path is not bitwise batch-invariant (the packed batch changes matmul shapes: logits
# move by ~5e-7), so tokens must be identical wherever the reference's top-2 gap exceeds TIE, and
# logprobs agree within ATOL. (The native int kernels quantize activations per 32-block, which
# turns that noise into whole int8 steps, ~1e-2 on the logits: far above the near-flat top-2 gaps
# of this random model, so the native path is checked on the real model in test_real_model.py.)
TIE = 1e-4
ATOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A tiny model is all per-op overhead: more threads only add synchronisation (and on a busy
    2-core machine, a lot of it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> LLM:
    return LLM(str(tiny_chat_gguf(tmp_path_factory)), weights="float")


@pytest.fixture(scope="module")
def alone(base) -> list[Completion]:
    ref = engine_variant(base, cache=CacheConfig(num_blocks=128, enable_prefix_caching=False))
    return [ref.generate(p, GREEDY)[0].outputs[0] for p in PROMPTS]


def assert_same_tokens(
    got: list[GenerationResult], want: list[Completion], tie: float = TIE, atol: float = ATOL
) -> int:
    """Token-for-token equality up to the first near tie; returns the number of tokens compared."""
    compared = 0
    for res, ref in zip(got, want, strict=True):
        out = res.outputs[0]
        assert out.finish_reason == ref.finish_reason == "length"
        for t, (tok, lp, ref_tok, ref_lp) in enumerate(
            zip(out.token_ids, out.logprobs, ref.token_ids, ref.logprobs, strict=True)
        ):
            gap = ref_lp.top_logprobs[0][1] - ref_lp.top_logprobs[1][1]
            if gap < tie:
                break
            assert tok == ref_tok, f"{res.prompt[:20]!r}: step {t} (top-2 gap {gap:.2e})"
            assert lp.logprob == pytest.approx(ref_lp.logprob, abs=atol)
            compared += 1
    return compared


def test_prompts_have_different_lengths(base):
    lengths = [len(base.tokenizer.encode(p)) for p in PROMPTS]
    assert len(set(lengths)) == len(lengths) and min(lengths) == 1 and max(lengths) > 64


def test_batched_equals_alone(base, alone):
    llm = engine_variant(base)
    compared = assert_same_tokens(llm.generate(PROMPTS, GREEDY), alone)
    assert compared > 0.8 * len(PROMPTS) * GREEDY.max_tokens
    # Again: now every prompt's full blocks come from the prefix cache.
    assert_same_tokens(llm.generate(PROMPTS, GREEDY), alone)


def test_chunked_prefill_equals_alone(base, alone):
    llm = engine_variant(base, max_num_batched_tokens=16)
    assert_same_tokens(llm.generate(PROMPTS, GREEDY), alone)


def test_preemption_equals_alone(base, alone):
    """10 usable blocks of 16 tokens cannot hold five requests of up to 114 tokens at once."""
    llm = engine_variant(base, cache=CacheConfig(num_blocks=11, block_size=16), max_model_len=160)
    out = llm.generate(PROMPTS, GREEDY)
    assert llm.engine.scheduler.num_preemptions > 0
    assert_same_tokens(out, alone)


def test_alone_is_reproducible(base, alone):
    """One prompt at a time on another engine, twice (the second from the prefix cache)."""
    llm = engine_variant(base)
    for prompt, want in zip(PROMPTS[:3], alone):
        for _ in range(2):
            out = llm.generate(prompt, GREEDY)[0].outputs[0]
            assert out.token_ids == want.token_ids


def test_n_completions(base, alone):
    llm = engine_variant(base)
    greedy = llm.generate(PROMPTS[1], SamplingParams(max_tokens=24, temperature=0.0, n=2))[0]
    assert [c.token_ids for c in greedy.outputs] == [alone[1].token_ids] * 2
    sampled = SamplingParams(max_tokens=12, temperature=1.0, n=3, seed=7)
    res = llm.generate(PROMPTS[:2], sampled)
    assert [len(r.outputs) for r in res] == [3, 3]
    for r in res:
        assert all(len(c.token_ids) == 12 and c.finish_reason == "length" for c in r.outputs)
        assert len({tuple(c.token_ids) for c in r.outputs}) == 3  # distinct completions
    again = llm.generate(PROMPTS[:2], sampled)
    assert [[c.token_ids for c in r.outputs] for r in again] == [
        [c.token_ids for c in r.outputs] for r in res
    ]
