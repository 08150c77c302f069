"""Model proposers (engine/draft.py): `draft:MODEL` and `layerskip[:N]` on tiny random GGUF
models with a byte vocabulary, each against the same engine without speculation; and the
chi-square check that sampled output keeps its distribution with ngram and draft proposals."""

from __future__ import annotations

import collections
from pathlib import Path

import pytest
import torch

from miaotui import LLM, CacheConfig, SamplingParams
from miaotui.engine.draft import DraftProposer, calibrate_layerskip
from miaotui.errors import InvalidRequestError
from tests import helpers
from tests.helpers import engine_variant

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS = 4
KW = dict(weights="float", max_model_len=128, cache=CacheConfig(num_blocks=200, block_size=4))
PROMPTS = ["abcabcabcabc", "hello world, hello", "xyz", "The cat sat on the mat. The cat"]


def sharp_model(seed: int = 0, layers: int = LAYERS, scale: float = 40.0, **kw):
    """A tiny random llama whose head is scaled up: confident next tokens (a random model's
    logits are nearly flat), so that greedy runs repeat and drafts are often right."""
    m = helpers.hf_model("llama", seed=seed, num_hidden_layers=layers, **kw)
    with torch.no_grad():
        m.lm_head.weight.mul_(scale)
    return m


def write(model, path: Path) -> Path:
    return helpers.write_gguf(model, "llama", path, tokenizer="bytes")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("draft")
    target = sharp_model()
    half = sharp_model(layers=2)  # the target's first two layers, its norm and head
    half.load_state_dict(target.state_dict(), strict=False)
    return {
        "target": write(target, d / "target.gguf"),
        "half": write(half, d / "half.gguf"),
        "other_vocab": write(sharp_model(vocab_size=100), d / "other_vocab.gguf"),
        "short_context": write(sharp_model(max_position_embeddings=64), d / "short.gguf"),
    }


@pytest.fixture(scope="module")
def base(files) -> LLM:
    return LLM(str(files["target"]), **KW)


def free(llm: LLM) -> LLM:
    """Take the draft's measured cost away (every run with one accepted token counts as paid):
    how often it proposes then depends on the tokens only, not on the machine's timings."""
    llm.engine.drafter.cost, llm.engine.drafter.verify_cost = 0.0, []
    return llm


def greedy(n: int = 40) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def tokens(llm: LLM, params: SamplingParams, prompts=PROMPTS) -> list[list[int]]:
    return [r.token_ids for r in llm.generate(prompts, params)]


def assert_no_leaks(llm: LLM) -> None:
    engine = llm.engine
    assert not engine.has_unfinished()
    assert engine.block_pool.num_free_blocks == engine.block_pool.num_usable_blocks
    engine.scheduler.check_invariants()


def test_the_model_as_its_own_draft_accepts_everything(base, files):
    spec = engine_variant(base, speculative_method=f"draft:{files['target']}", **KW)
    assert tokens(spec, greedy()) == tokens(base, greedy())
    s = spec.engine.spec_stats()
    assert s["proposed"] > 40 and s["accepted"] == s["proposed"], s
    assert s["mean_accepted_length"] > 1.5 and s["draft_s"] > 0 and s["verify_s"] > 0
    assert_no_leaks(spec)


def test_own_draft_through_preemption_and_tight_blocks(base, files):
    # 30 blocks of 4 for 4 requests of up to ~70 tokens: preempted ones recompute their draft KV
    kw = dict(KW, cache=CacheConfig(num_blocks=30, block_size=4), max_model_len=100)
    plain = engine_variant(base, **kw)
    spec = engine_variant(base, speculative_method=f"draft:{files['target']}", **kw)
    assert tokens(spec, greedy(48)) == tokens(plain, greedy(48))
    assert spec.engine.scheduler.num_preemptions > 0
    s = spec.engine.spec_stats()
    assert s["proposed"] > 0 and s["accepted"] == s["proposed"], s
    assert_no_leaks(spec)


@pytest.mark.parametrize("method", ["draft:half", "layerskip:2", "layerskip:1"])
def test_smaller_drafts_same_tokens_greedy_and_seeded(base, files, method):
    if method.startswith("draft:"):
        method = f"draft:{files['half']}"
    spec = engine_variant(base, speculative_method=method, **KW)
    assert spec.engine.speculating
    assert tokens(spec, greedy()) == tokens(base, greedy())
    seeded = SamplingParams(max_tokens=40, temperature=0.9, top_p=0.95, seed=7, logprobs=1)
    want, got = base.generate(PROMPTS, seeded), spec.generate(PROMPTS, seeded)
    for g, w in zip(got, want, strict=True):
        assert g.token_ids == w.token_ids
        assert [lp.logprob for lp in g.outputs[0].logprobs] == pytest.approx(
            [lp.logprob for lp in w.outputs[0].logprobs], abs=1e-4
        )
    assert spec.engine.num_spec_proposed > 0
    assert_no_leaks(spec)


def test_draft_with_stop_strings(base, files):
    spec = engine_variant(base, speculative_method=f"draft:{files['half']}", **KW)
    text = base.generate(PROMPTS[:1], greedy())[0].text
    stop = text[10:13]  # inside a run the draft proposes: accepted tokens past it are dropped
    params = SamplingParams(max_tokens=40, temperature=0.0, stop=[stop])
    want, got = base.generate(PROMPTS, params), spec.generate(PROMPTS, params)
    assert [(g.text, g.token_ids, g.finish_reason) for g in got] == [
        (w.text, w.token_ids, w.finish_reason) for w in want
    ]
    assert got[0].finish_reason == "stop"
    assert_no_leaks(spec)


def test_draft_with_another_tokenizer_or_context_is_refused(base, files):
    with pytest.raises(InvalidRequestError, match="vocabulary of 100 tokens.*share the served"):
        engine_variant(base, speculative_method=f"draft:{files['other_vocab']}", **KW)
    with pytest.raises(InvalidRequestError, match="64 tokens of context.*max_model_len"):
        engine_variant(base, speculative_method=f"draft:{files['short_context']}", **KW)


def test_a_run_must_accept_what_the_draft_costs():
    d = DraftProposer(None, None, 4, verify_cost=[1.0, 1.2, 1.4, 1.6], cost=0.3)
    # 1 + a >= verify_cost[k] + k * cost
    assert [d.min_accepted(k) for k in (1, 2, 3)] == [1, 1, 2]
    d.cost = 1.0  # as costly as the target: only runs accepted whole pay
    assert [d.min_accepted(k) for k in (1, 2, 3)] == [1, 2, 3]
    d.verify_cost = []
    assert d.min_accepted(3) == 1


def test_a_draft_that_never_pays_stops_proposing(base):
    """One layer of four agrees with the model on almost nothing: after UNPAID_LIMIT runs in a
    row the engine probes only every PROBE_EVERY steps, and the output is unchanged."""
    from miaotui.engine.speculative import PROBE_EVERY, UNPAID_LIMIT

    spec = free(engine_variant(base, speculative_method="layerskip:1", **KW))
    assert tokens(spec, greedy(100)) == tokens(base, greedy(100))
    s = spec.engine.spec_stats()
    paid_runs = s["accepted"]  # at most one paid run per accepted token
    assert s["drafts"] <= UNPAID_LIMIT + 100 // PROBE_EVERY * len(PROMPTS) + paid_runs * 5, s
    assert s["drafts"] >= UNPAID_LIMIT


@pytest.mark.parametrize("method", ["draft:", "layerskip:0", "layerskip:x", "lookahead"])
def test_bad_method_names_are_refused(method):
    from miaotui.config import SchedulerConfig

    with pytest.raises(InvalidRequestError, match="speculative_method must be"):
        SchedulerConfig(speculative_method=method)


def test_layerskip_depth_must_be_below_the_model_depth(base):
    with pytest.raises(InvalidRequestError, match="has 4 layers; give 1 <= N < 4"):
        engine_variant(base, speculative_method="layerskip:4", **KW)


def test_calibration_measures_agreement(tmp_path):
    """Layers 2 and 3 of this model add nothing to the residual stream (zero output
    projections): a draft of 2 or 3 layers computes the target exactly, 1 layer does not."""
    m = sharp_model()
    with torch.no_grad():
        for layer in m.model.layers[2:]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    llm = LLM(str(write(m, tmp_path / "m.gguf")), **KW)
    model, tok = llm.engine.runner.model, llm.tokenizer
    _, _, table = calibrate_layerskip(model, tok, max_k=3, new_tokens=24, repeats=1)
    agreement = {row["num_layers"]: row["agreement"] for row in table}
    assert set(agreement) == {1, 2, 3}
    assert agreement[2] == agreement[3] == 1.0 and agreement[1] < 1.0
    for row in table:  # (the speed-up estimates are timings: not compared here)
        assert 1 <= row["k"] <= 3 and row["est_speedup"] > 0 and row["draft_cost"] > 0


def test_layerskip_without_a_depth_is_same_output_whatever_it_chooses(base):
    spec = engine_variant(base, speculative_method="layerskip", **KW)
    drafter = spec.engine.drafter
    assert spec.engine.speculating == (not drafter.off)
    assert spec.engine.spec_stats()["calibration"] == drafter.calibration
    if not drafter.off:
        assert drafter.num_layers in {r["num_layers"] for r in drafter.calibration}
    assert tokens(spec, greedy()) == tokens(base, greedy())
    assert_no_leaks(spec)


# ---- the distribution check ----------------------------------------------------------------


def last_tokens(llm: LLM, prompt: list[int], seeds: range, temperature: float) -> list[int]:
    """The last of 6 tokens sampled after `prompt`, once per seed, all in one batch."""
    engine = llm.engine
    for s in seeds:
        params = SamplingParams(max_tokens=6, temperature=temperature, seed=s, ignore_eos=True)
        engine.add_request(prompt, params, request_id=f"s{s}")
    last = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                last[out.request_id] = out.token_ids[-1]
    return [last[f"s{s}"] for s in seeds]


def chi_square_p(a: list[int], b: list[int]) -> float:
    """p-value of "a and b come from one distribution" (chi-square test of homogeneity; tokens
    seen fewer than 10 times in both together pooled into one category)."""
    from scipy.stats import chi2_contingency

    ca, cb = collections.Counter(a), collections.Counter(b)
    common = [t for t in ca | cb if ca[t] + cb[t] >= 10]
    rows = [[ca[t] for t in common], [cb[t] for t in common]]
    rest = [len(a) - sum(rows[0]), len(b) - sum(rows[1])]
    if min(rest) > 0:
        rows[0].append(rest[0])
        rows[1].append(rest[1])
    return chi2_contingency(rows).pvalue


SAMPLED_KW = dict(
    weights="float",
    max_model_len=64,
    max_num_seqs=64,
    max_waiting=2000,
    speculative_max_running=64,
    cache=CacheConfig(num_blocks=800, block_size=4),
)
N_SAMPLES = 600


@pytest.fixture(scope="module")
def sampled(tmp_path_factory) -> tuple[LLM, Path, list[int]]:
    """A less confident model (temperature-1 samples spread over tens of tokens), its file, and
    a prompt: a short text and the model's own greedy continuation of it, which repeats itself
    (so that prompt lookup finds runs to propose)."""
    model = sharp_model(layers=2, scale=25.0)
    path = write(model, tmp_path_factory.mktemp("sampled") / "sampled.gguf")
    llm = LLM(str(path), **SAMPLED_KW)
    head = llm.generate(["abababababab"], greedy(24))[0]
    return llm, path, head.prompt_token_ids + head.token_ids


@pytest.fixture(scope="module")
def reference(sampled) -> list[int]:
    llm, _, prompt = sampled
    return last_tokens(llm, prompt, range(N_SAMPLES), 1.0)


def test_chi_square_detects_another_distribution(sampled, reference):
    """The check has power: the same model at temperature 0.7 is told apart."""
    llm, _, prompt = sampled
    other = last_tokens(llm, prompt, range(N_SAMPLES, 2 * N_SAMPLES), 0.7)
    assert chi_square_p(reference, other) < 1e-3


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_chi_square_sampled_tokens_keep_their_distribution(sampled, reference, method):
    llm, path, prompt = sampled
    name = "ngram" if method == "ngram" else f"draft:{path}"
    spec = engine_variant(llm, speculative_method=name, **SAMPLED_KW)
    if method == "draft":
        free(spec)
    # other seeds than the reference's: independent samples, not the same draws replayed
    got = last_tokens(spec, prompt, range(2 * N_SAMPLES, 3 * N_SAMPLES), 1.0)
    s = spec.engine.spec_stats()
    assert s["accepted"] > N_SAMPLES // 4, s  # many sampled tokens came from accepted runs
    assert chi_square_p(reference, got) > 1e-3


def test_chi_square_catches_a_verifier_that_accepts_every_proposal(sampled, reference, monkeypatch):
    """The check catches the bug it is for: accepting a draft's argmax without sampling."""
    from miaotui.engine.engine import LLMEngine
    from miaotui.engine.sampler import SampledToken

    def accept_all(self, st, rows, first):
        return [first] + [SampledToken(t) for t in st.request.spec_token_ids[: rows.shape[0] - 1]]

    llm, path, prompt = sampled
    spec = engine_variant(llm, speculative_method=f"draft:{path}", **SAMPLED_KW)
    monkeypatch.setattr(LLMEngine, "_verify", accept_all)
    got = last_tokens(spec, prompt, range(2 * N_SAMPLES, 3 * N_SAMPLES), 1.0)
    assert chi_square_p(reference, got) < 1e-3


def test_cli_flags_reach_the_config(base):
    import argparse

    from miaotui.cli_args import add_engine_args, engine_config
    from miaotui.errors import MiaotuiError

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    args = ["--speculative-method", "draft:/no/such/draft.gguf", "--num-speculative-tokens", "3"]
    sched = engine_config(parser.parse_args(args)).scheduler
    assert (sched.speculative_method, sched.num_speculative_tokens) == (
        "draft:/no/such/draft.gguf",
        3,
    )
    with pytest.raises(MiaotuiError, match="/no/such/draft.gguf"):
        engine_variant(base, speculative_method=sched.speculative_method, **KW)
