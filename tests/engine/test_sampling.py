"""Sampling against independent references: top-k / top-p / min-p allowed sets computed here in
float64 (Hugging Face's warper semantics), repetition penalty by transformers' own logits
processor, presence / frequency penalties by OpenAI's formula, logprobs and penalised greedy
choices from transformers' logits of the tiny model; seeded sampling repeats exactly, alone or
batched; stop strings, stop token ids, max_tokens and the context end with the right reason."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from miaotui import LLM, SamplingParams
from miaotui.engine.sampler import apply_penalties, filter_logits, make_generator, sample_row
from miaotui.engine.structured import StructuredOutputs
from miaotui.errors import InvalidRequestError
from miaotui.sampling_params import StructuredOutput
from tests.helpers import BYTE_EOS, byte_tokenizer, engine_variant, tiny_chat_hf_model

pytestmark = pytest.mark.usefixtures("one_thread")

# ---- filters: the allowed set, computed independently ---------------------------------------

TOL = 1e-5  # float32 in the sampler vs float64 here: decisions within TOL of a boundary are free


def allowed_sets(logits: np.ndarray, p: SamplingParams) -> tuple[set[int], set[int]]:
    """(tokens that must be kept, tokens that may be kept) after temperature, top-k, top-p and
    min-p applied in that order, each on the survivors of the previous one (HF's warpers). Ties
    make top-p order-dependent, hence two sets."""
    x = logits.astype(np.float64) / p.temperature
    V = len(x)
    alive = np.ones(V, dtype=bool)
    must_k = np.ones(V, dtype=bool)
    if 0 < p.top_k < V:
        kth = np.sort(x)[::-1][p.top_k - 1]
        # Ties with the k-th are kept; float32 may tie or split values within TOL of it (e.g. a
        # subnormal logit halved by the temperature rounds to 0).
        scale = TOL * max(1.0, abs(kth))
        alive &= x >= kth - scale
        must_k = (x > kth + scale) | (x == x.max())
    must, may = alive & must_k, alive.copy()
    if p.top_p < 1.0:
        probs = np.where(alive, np.exp(x - x[alive].max()), 0.0)
        probs /= probs.sum()
        for i in np.flatnonzero(alive):
            above = probs[probs > probs[i]].sum()  # strictly more likely: before i in any order
            tied = probs[probs == probs[i]].sum() - probs[i]  # may come before i
            may[i] &= above < p.top_p + TOL
            must[i] &= above + tied < p.top_p - TOL
    if p.min_p > 0.0:
        # min-p compares p_i with min_p * p_max: a ratio, unchanged by renormalisation.
        ref = x[may].max()
        ratio = np.exp(x - ref)
        may &= ratio >= p.min_p * (1 - TOL)
        must &= ratio >= p.min_p * (1 + TOL)
    return set(np.flatnonzero(must).tolist()), set(np.flatnonzero(may).tolist())


logit_values = st.one_of(
    st.floats(-20, 20, allow_nan=False, width=32),
    st.integers(-3, 3).map(float),  # ties
)


@settings(max_examples=400, deadline=None)
@given(
    logits=st.lists(logit_values, min_size=1, max_size=40),
    temperature=st.floats(0.05, 5.0),
    top_k=st.integers(0, 45),
    top_p=st.floats(0.01, 1.0),
    min_p=st.one_of(st.just(0.0), st.floats(0.0, 1.0)),
    seed=st.integers(0, 2**31),
)
# A subnormal logit that the temperature rounds onto the k-th value in float32.
@example(
    logits=[0.0, 1.401298464324817e-45], temperature=2.0, top_k=1, top_p=1.0, min_p=0.0, seed=0
)
def test_filters_never_emit_an_excluded_token(logits, temperature, top_k, top_p, min_p, seed):
    p = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    t = torch.tensor(logits, dtype=torch.float32)
    must, may = allowed_sets(np.array(logits), p)
    out = filter_logits(t, p)
    kept = set(torch.isfinite(out).nonzero().flatten().tolist())
    assert kept, "every token was filtered out"
    assert kept <= may, f"kept {sorted(kept - may)} that the filters exclude"
    assert must <= kept, f"dropped {sorted(must - kept)} that the filters keep"
    g = make_generator(seed)
    for _ in range(5):
        assert sample_row(t, p, [], [], g).token_id in kept


def test_filter_examples():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))

    def kept(**kw):
        out = filter_logits(logits, SamplingParams(**kw))
        return torch.isfinite(out).nonzero().flatten().tolist()

    assert kept(top_k=2) == [0, 1]
    assert kept(top_p=0.5) == [0]  # 0.5 alone reaches 0.5
    assert kept(top_p=0.8) == [0, 1]
    assert kept(top_p=0.81) == [0, 1, 2]
    assert kept(min_p=0.5) == [0, 1]  # 0.15 < 0.5 * 0.5
    assert kept(top_k=3, min_p=0.2) == [0, 1, 2]  # 0.05 < 0.2 * 0.5 = 0.1
    assert kept(temperature=0.5, top_p=0.8) == [0, 1]  # sharper: 0.5^2 : 0.3^2 ...


def test_sampling_follows_the_tempered_distribution():
    logits = torch.tensor([1.0, 0.0, -1.0, 2.0])
    for temperature in (0.5, 1.0, 2.0):
        p = SamplingParams(temperature=temperature)
        g = make_generator(123)
        n = 4000
        counts = np.bincount([sample_row(logits, p, [], [], g).token_id for _ in range(n)], None, 4)
        want = torch.softmax(logits / temperature, -1).numpy() * n
        chi2 = float(((counts - want) ** 2 / want).sum())
        assert chi2 < 16.3, (temperature, counts, want)  # p = 0.001 at 3 degrees of freedom


# ---- penalties --------------------------------------------------------------------------------


def openai_penalties(logits: np.ndarray, output: list[int], presence: float, frequency: float):
    """OpenAI's definition (platform docs, "Parameter details"):
    mu[j] -> mu[j] - c[j] * alpha_frequency - float(c[j] > 0) * alpha_presence."""
    out = logits.copy()
    for j in set(output):
        c = output.count(j)
        out[j] -= c * frequency + (c > 0) * presence
    return out


def hf_repetition(logits: np.ndarray, seen: list[int], penalty: float) -> np.ndarray:
    from transformers import RepetitionPenaltyLogitsProcessor

    scores = torch.tensor(logits, dtype=torch.float32)[None]
    ids = torch.tensor([seen], dtype=torch.long) if seen else torch.zeros((1, 0), dtype=torch.long)
    return RepetitionPenaltyLogitsProcessor(penalty)(ids, scores)[0].numpy()


def expected_penalised(logits, prompt, output, p: SamplingParams) -> np.ndarray:
    """Repetition penalty over prompt + output first, then OpenAI's over the output (vLLM's
    order)."""
    x = np.asarray(logits, dtype=np.float32)
    if p.repetition_penalty != 1.0 and (prompt or output):
        x = hf_repetition(x, prompt + output, p.repetition_penalty)
    return openai_penalties(x, output, p.presence_penalty, p.frequency_penalty)


def test_penalties_by_hand():
    logits = torch.tensor([2.0, -1.0, 0.5, 0.0, 3.0])
    p = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    got = apply_penalties(logits, p, prompt_ids=[0, 1], output_ids=[2, 2, 4])
    # seen {0, 1, 2, 4}: positive / 2, negative * 2; then output counts {2: 2, 4: 1}
    want = [2.0 / 2, -1.0 * 2, 0.5 / 2 - (2 * 0.25 + 0.5), 0.0, 3.0 / 2 - (0.25 + 0.5)]
    torch.testing.assert_close(got, torch.tensor(want))
    assert torch.equal(logits, torch.tensor([2.0, -1.0, 0.5, 0.0, 3.0]))  # input untouched


@settings(max_examples=200, deadline=None)
@given(
    logits=st.lists(st.floats(-10, 10, width=32), min_size=2, max_size=30),
    data=st.data(),
    repetition=st.floats(0.5, 2.0),
    presence=st.floats(-2.0, 2.0),
    frequency=st.floats(-2.0, 2.0),
)
def test_penalties_match_references(logits, data, repetition, presence, frequency):
    V = len(logits)
    prompt = data.draw(st.lists(st.integers(0, V - 1), max_size=8))
    output = data.draw(st.lists(st.integers(0, V - 1), max_size=12))
    p = SamplingParams(
        repetition_penalty=repetition, presence_penalty=presence, frequency_penalty=frequency
    )
    got = apply_penalties(torch.tensor(logits), p, prompt, output)
    want = expected_penalised(logits, prompt, output, p)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-5)


# ---- end to end on the tiny model ---------------------------------------------------------------


@pytest.fixture(scope="module")
def llm(tiny_chat_gguf) -> LLM:
    return LLM(str(tiny_chat_gguf), weights="float")


@pytest.fixture(scope="module")
def hf():
    return tiny_chat_hf_model()


def hf_logits(hf, ids: list[int]) -> np.ndarray:
    """(T, V) float64 logits of transformers' model (the same weights as the GGUF)."""
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].double().numpy()


PROMPT = "Once upon a time, in a land far away,"


def test_greedy_logprobs_are_log_softmax_of_model_logits(llm, hf):
    res = llm.generate(PROMPT, SamplingParams(max_tokens=12, temperature=0.0, logprobs=5))[0]
    out = res.outputs[0]
    ref = hf_logits(hf, res.prompt_token_ids + out.token_ids)
    n = len(res.prompt_token_ids)
    for t, (tok, lp) in enumerate(zip(out.token_ids, out.logprobs)):
        row = ref[n - 1 + t]
        logp = row - row.max() - math.log(np.exp(row - row.max()).sum())
        assert lp.token_id == tok
        assert row[tok] >= row.max() - 1e-4  # greedy: the most likely token (up to ties)
        assert lp.logprob == pytest.approx(logp[tok], abs=1e-4)
        assert len(lp.top_logprobs) == 5
        best = np.sort(logp)[::-1][:5]
        np.testing.assert_allclose([v for _, v in lp.top_logprobs], best, atol=1e-4)
        for i, v in lp.top_logprobs:
            assert logp[i] == pytest.approx(v, abs=1e-4)


def test_penalised_greedy_matches_reference(llm, hf):
    p = SamplingParams(
        max_tokens=16,
        temperature=0.0,
        repetition_penalty=1.3,
        presence_penalty=0.5,
        frequency_penalty=0.4,
        logprobs=0,
    )
    res = llm.generate(PROMPT, p)[0]
    prompt, out = res.prompt_token_ids, res.outputs[0]
    ref = hf_logits(hf, prompt + out.token_ids)
    for t, (tok, lp) in enumerate(zip(out.token_ids, out.logprobs)):
        x = expected_penalised(ref[len(prompt) - 1 + t], prompt, out.token_ids[:t], p)
        x = x.astype(np.float64)
        assert x[tok] >= x.max() - 1e-4, f"step {t}"
        logp = x - x.max() - math.log(np.exp(x - x.max()).sum())
        assert lp.logprob == pytest.approx(logp[tok], abs=1e-4)
    plain = llm.generate(PROMPT, SamplingParams(max_tokens=16, temperature=0.0))[0]
    assert plain.token_ids != out.token_ids  # the penalties did change something


SAMPLED = SamplingParams(max_tokens=16, temperature=0.9, top_k=200, top_p=0.95, seed=1234)


def test_same_seed_same_tokens(llm):
    a = llm.generate(PROMPT, SAMPLED)[0].token_ids
    b = engine_variant(llm).generate(PROMPT, SAMPLED)[0].token_ids
    assert a == b
    other = SamplingParams(max_tokens=16, temperature=0.9, top_k=200, top_p=0.95, seed=4321)
    assert llm.generate(PROMPT, other)[0].token_ids != a
    unseeded = SamplingParams(max_tokens=16, temperature=0.9)
    assert (
        llm.generate(PROMPT, unseeded)[0].token_ids != llm.generate(PROMPT, unseeded)[0].token_ids
    )


def _run_together(llm: LLM, requests: list[tuple[str, SamplingParams]]) -> list[list[int]]:
    """Several requests with their own parameters in one continuous batch."""
    engine = llm.engine
    ids = [engine.add_request(prompt, params) for prompt, params in requests]
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.token_ids
    return [done[i] for i in ids]


def test_seeded_request_repeats_when_batched(llm):
    alone = llm.generate(PROMPT, SAMPLED)[0].token_ids
    together = _run_together(
        engine_variant(llm),
        [
            ("Another prompt that is longer than the first one by a few words.", SAMPLED),
            (PROMPT, SAMPLED),
            ("x", SamplingParams(max_tokens=30, temperature=1.0)),  # unseeded neighbour
            ("def main():", SamplingParams(max_tokens=5, temperature=0.0)),  # greedy neighbour
        ],
    )
    assert together[1] == alone
    assert together[0] != alone


def test_max_tokens_ends_with_length(llm):
    out = llm.generate(PROMPT, SamplingParams(max_tokens=5, temperature=0.0))[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length"


def test_context_end_ends_with_length(llm):
    short = engine_variant(llm, max_model_len=16)
    res = short.generate(PROMPT, SamplingParams(max_tokens=100, temperature=0.0))[0]
    assert len(res.prompt_token_ids) + len(res.token_ids) == 16
    assert res.finish_reason == "length"


@pytest.fixture(scope="module")
def greedy(llm):
    return llm.generate(PROMPT, SamplingParams(max_tokens=24, temperature=0.0))[0]


def _is_visible_prefix(text: str, full: str) -> bool:
    """text is full, possibly without a trailing incomplete character (held back at the end)."""
    return full.startswith(text) and set(full[len(text) :]) <= {"\ufffd"}


def test_stop_token_id(llm, greedy):
    g = greedy.token_ids
    i = next(i for i in range(3, len(g)) if g[i] not in g[:i])
    out = llm.generate(
        PROMPT, SamplingParams(max_tokens=24, temperature=0.0, stop_token_ids=[g[i]])
    )
    res = out[0]
    assert res.finish_reason == "stop"
    assert res.token_ids == g[: i + 1]  # the stop token is reported, not shown as text
    assert _is_visible_prefix(res.text, llm.tokenizer.decode(g[:i]))


def test_stop_string(llm, greedy):
    text = greedy.text
    assert len(text) > 20
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    want = text[: text.find(stop)]
    res = llm.generate(PROMPT, SamplingParams(max_tokens=24, temperature=0.0, stop=[stop]))[0]
    assert res.finish_reason == "stop"
    assert res.text == want
    assert res.token_ids == greedy.token_ids[: len(res.token_ids)]
    assert stop in llm.tokenizer.decode(res.token_ids)  # stopped on the token completing it
    assert stop not in llm.tokenizer.decode(res.token_ids[:-1])


def test_stop_string_not_generated_runs_to_length(llm, greedy):
    res = llm.generate(
        PROMPT, SamplingParams(max_tokens=24, temperature=0.0, stop=["\x00never\x00"])
    )[0]
    assert res.finish_reason == "length" and res.text == greedy.text


def test_stream_deltas_add_up_to_the_final_text(llm, greedy):
    stop = greedy.text[len(greedy.text) // 2 :][:3]
    params = SamplingParams(max_tokens=24, temperature=0.0, stop=[stop])
    outs = list(llm.stream(PROMPT, params))
    assert outs[-1].finished and all(not o.finished for o in outs[:-1])
    assert "".join(o.delta_text for o in outs) == outs[-1].text
    assert (
        outs[-1].text
        == llm.generate(PROMPT, params)[0].text
        == greedy.text[: greedy.text.find(stop)]
    )
    assert not llm.engine.has_unfinished()


# ---- logit_bias and structured outputs ------------------------------------------------------


def test_logit_bias_matches_reference(llm, hf):
    """A +/- bias moves the greedy choice and the logprobs exactly as adding it to transformers'
    logits does."""
    ids = llm.tokenizer.encode(PROMPT)
    ref = hf_logits(hf, ids)[-1]
    target, banned = int(np.argsort(ref)[-50]), int(np.argmax(ref))
    bias = {target: 9.0, banned: -100.0}
    res = llm.generate(
        PROMPT, SamplingParams(max_tokens=1, temperature=0.0, logprobs=2, logit_bias=bias)
    )[0]
    biased = ref.copy()
    for t, b in bias.items():
        biased[t] += b
    want = int(np.argmax(biased))
    log_softmax = biased - np.log(np.exp(biased - biased.max()).sum()) - biased.max()
    assert res.token_ids == [want] and want != banned
    assert res.outputs[0].logprobs[0].logprob == pytest.approx(log_softmax[want], abs=1e-4)


def test_logit_bias_is_validated():
    for bad in ({5: 101.0}, {-1: 1.0}, {"5": 1.0}, {5: True}):
        with pytest.raises(InvalidRequestError, match="logit_bias"):
            SamplingParams(logit_bias=bad)


def test_grammar_masks_on_a_byte_vocabulary():
    """With one token per byte the allowed set after each prefix is known by hand: a regex
    `(ab|cd)[0-9]` allows {a, c}, then the one letter that continues, then the ten digits, then
    only end-of-sequence. The unconstrained row of the same batch is untouched."""
    tok = byte_tokenizer()
    grammars = StructuredOutputs(tok, BYTE_EOS + 1)
    matcher = grammars.matcher_for(
        SamplingParams(structured=StructuredOutput(regex="(ab|cd)[0-9]"))
    )

    def ids(chars: str) -> set[int]:
        return {tok.encode(c, add_special=False)[0] for c in chars}

    expected = [ids("ac"), ids("d"), ids("0123456789"), {BYTE_EOS}]
    chosen = [*ids("c"), *ids("d"), *ids("7"), BYTE_EOS]
    logits = torch.randn(2, BYTE_EOS + 1, generator=torch.Generator().manual_seed(0))
    for step, allowed in enumerate(expected):
        grammar = grammars.start_step([matcher, None])
        masked = grammar.apply(logits)
        assert set(torch.isfinite(masked[0]).nonzero().flatten().tolist()) == allowed, step
        assert torch.equal(masked[1], logits[1])
        choice = chosen[step]
        grammar.commit([choice, 0])
    assert matcher.is_stopped() or matcher.is_accepting()


def test_constrained_generation_on_random_weights(llm):
    """Random weights never write JSON by themselves; under a schema every sample (batched, at
    temperature 1) is valid JSON that the schema accepts, and a regex's output matches it."""
    import jsonschema

    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 8},
            "n": {"type": "integer", "minimum": 0, "maximum": 99},
            "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
        },
        "required": ["name", "n", "tags"],
        "additionalProperties": False,
    }
    spec = StructuredOutput(json_schema=json.dumps(schema))
    prompts = [f"{PROMPT} {i}" for i in range(4)]
    for res in llm.generate(prompts, SamplingParams(max_tokens=80, seed=1, structured=spec)):
        assert res.finish_reason == "stop", res.text
        jsonschema.validate(json.loads(res.text), schema)
    regex = StructuredOutput(regex="[A-Z][a-z]{1,6} [0-9]{2}")
    for res in llm.generate(prompts, SamplingParams(max_tokens=20, seed=2, structured=regex)):
        assert res.finish_reason == "stop" and re.fullmatch("[A-Z][a-z]{1,6} [0-9]{2}", res.text)


def test_bad_constraints_raise_before_any_token(llm):
    for spec, named in [
        (StructuredOutput(json_schema='{"type": "objekt"}'), "objekt"),
        (StructuredOutput(json_schema="{not json"), "not valid JSON"),
        (StructuredOutput(regex="(unclosed"), "regex"),
        (StructuredOutput(grammar="start: missing"), "missing"),
    ]:
        with pytest.raises(InvalidRequestError, match=named):
            llm.generate(PROMPT, SamplingParams(max_tokens=4, structured=spec))
    with pytest.raises(InvalidRequestError, match="exactly one"):
        StructuredOutput(regex="a", choice=("b",))
    with pytest.raises(InvalidRequestError, match="ignore_eos"):
        SamplingParams(ignore_eos=True, structured=StructuredOutput(regex="a"))
