"""The evaluation harness on cases computed by hand: perplexity of a model with all-zero logits
is exactly the vocabulary size; perplexity of a tiny random model equals a plain loop over
transformers' logits under the same window/stride rule; multiple-choice accuracy, its standard
error and length normalisation on hand-made items; SQuAD normalisation, exact match and F1."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from miaotui.eval.perplexity import perplexity, perplexity_of_ids
from miaotui.eval.tasks import extractive_qa, f1_score, multiple_choice, normalize_answer
from miaotui.load.hf_dir import read_hf_dir
from miaotui.model.build import build_model
from tests.helpers import hf_model, save_hf_dir

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good "
    "fortune, must be in want of a wife."
)


class ByteTokenizer:
    """ids = UTF-8 bytes mod 128 (the tiny models have 128 tokens); no special tokens."""

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        return [b % 128 for b in text.encode()]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(transformers model, our model with the same weights)."""
    hf = hf_model("llama", seed=3)
    d = save_hf_dir(hf, tmp_path_factory.mktemp("llama"))
    return hf, build_model(read_hf_dir(d), torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def uniform(tiny):
    """Our tiny model with the final norm's weight zeroed: every logit is exactly 0."""
    import copy

    model = copy.deepcopy(tiny[1])
    model.norm.weight.data.zero_()
    return model


def text_file(tmp_path: Path, text: str = TEXT) -> Path:
    p = tmp_path / "tiny.txt"
    p.write_text(text)
    return p


# perplexity


def test_uniform_logits_give_perplexity_equal_to_vocab_size(uniform, tmp_path):
    r = perplexity(uniform, ByteTokenizer(), text_file(tmp_path), None, window=16, stride=8)
    assert r.num_tokens == len(TEXT.encode()) - 1  # every token but the first, scored once
    assert r.nll == pytest.approx(math.log(128), rel=1e-6)
    assert r.perplexity == pytest.approx(128, rel=1e-5)


def reference_nll(hf, ids: list[int], window: int, stride: int) -> tuple[float, int]:
    """The HF strided recipe written out: windows start every `stride` tokens; a token is
    scored by the first window that contains it, conditioned on that window's tokens before it.
    A token that starts a window and lies in no earlier one (stride == window) is not scored."""
    total, count, scored = 0.0, 0, set()
    for begin in range(0, len(ids) - 1, stride):
        seq = ids[begin : begin + window]
        with torch.no_grad():
            logp = torch.log_softmax(hf(torch.tensor([seq])).logits[0].double(), -1)
        for j in range(1, len(seq)):
            if begin + j not in scored:
                scored.add(begin + j)
                total -= float(logp[j - 1, seq[j]])
                count += 1
        if begin + window >= len(ids):
            break
    return total / count, count


@pytest.mark.parametrize("window,stride", [(16, 8), (32, 32), (24, 5), (500, 100)])
def test_perplexity_matches_a_plain_loop_over_transformers_logits(tiny, window, stride):
    hf, ours = tiny
    ids = ByteTokenizer().encode(TEXT)
    r = perplexity_of_ids(ours, ids, window, stride)
    ref, count = reference_nll(hf, ids, window, stride)
    assert r.num_tokens == count
    if stride < window:
        assert count == len(ids) - 1
    assert r.nll == pytest.approx(ref, rel=1e-5)
    assert r.perplexity == pytest.approx(math.exp(ref), rel=1e-5)


def test_perplexity_reads_the_first_max_tokens(tiny, tmp_path):
    _, ours = tiny
    r = perplexity(ours, ByteTokenizer(), text_file(tmp_path), 40, window=16, stride=8)
    assert r.num_tokens == 39
    assert r.nll == pytest.approx(
        perplexity_of_ids(ours, ByteTokenizer().encode(TEXT)[:40], 16, 8).nll
    )


# multiple choice


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


MC_ITEMS = [
    {"question": "Pick one", "choices": ["a long answer", "short", "medium"], "answer": 1},
    {"question": "Another", "choices": ["xy", "a much longer choice"], "answer": 0},
    {"question": "Third", "choices": ["abc", "abcdefgh", "ab"], "answer": 0},
    {"question": "Fourth", "choices": ["one two", "three"], "answer": 0},
]


def test_multiple_choice_by_hand_with_uniform_logits(uniform, tmp_path):
    """All logits 0: a choice c is scored on the bytes of " " + c, so it scores
    -(len(c) + 1) log V and the shortest choice wins; per character that is
    -(1 + 1 / len(c)) log V, so the longest choice wins the length-normalised score."""
    path = write_jsonl(tmp_path / "mc.jsonl", MC_ITEMS)
    r = multiple_choice(uniform, ByteTokenizer(), path)
    # shortest: "short" (1, right), "xy" (0, right), "ab" (2, wrong), "three" (1, wrong)
    assert r.num_items == 4 and r.accuracy == 0.5
    assert r.stderr == pytest.approx(math.sqrt(0.5 * 0.5 / 4))
    # longest: "a long answer" (0, wrong), idx 1 (wrong), "abcdefgh" (1, wrong), "one two" (0, right)
    assert r.accuracy_norm == 0.25
    assert multiple_choice(uniform, ByteTokenizer(), path, limit=1).num_items == 1


def test_multiple_choice_matches_transformers_scores(tiny, tmp_path):
    hf, ours = tiny
    tok = ByteTokenizer()
    path = write_jsonl(tmp_path / "mc.jsonl", MC_ITEMS)
    correct = correct_norm = 0
    for row in MC_ITEMS:
        ctx = tok.encode(f"Question: {row['question']}\nAnswer:")
        scores = []
        for c in row["choices"]:
            ids = tok.encode(f"Question: {row['question']}\nAnswer: {c}")
            with torch.no_grad():
                logp = torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), -1)
            scores.append(sum(float(logp[t - 1, ids[t]]) for t in range(len(ctx), len(ids))))
        norm = [s / len(c) for s, c in zip(scores, row["choices"])]
        correct += max(range(len(scores)), key=scores.__getitem__) == row["answer"]
        correct_norm += max(range(len(norm)), key=norm.__getitem__) == row["answer"]
    r = multiple_choice(ours, tok, path)
    assert (r.accuracy, r.accuracy_norm) == (correct / 4, correct_norm / 4)


# extractive QA (SQuAD v1.1 rules)


@pytest.mark.parametrize(
    "raw,norm",
    [
        ("The Eiffel Tower!", "eiffel tower"),
        ("  an  apple, a pear ", "apple pear"),
        ("Theatre", "theatre"),  # articles only as whole words
        ("U.S.A.", "usa"),
        ("", ""),
    ],
)
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


def test_f1_by_hand():
    assert f1_score("the cat sat", "a cat sat down") == pytest.approx(2 * 1 * (2 / 3) / (1 + 2 / 3))
    assert f1_score("Paris", "paris.") == 1.0
    assert f1_score("London", "Paris") == 0.0
    assert f1_score("", "Paris") == 0.0
    assert f1_score("cat cat", "cat") == pytest.approx(2 * 0.5 * 1 / 1.5)  # counts, not sets


def test_extractive_qa_scores_best_reference(tmp_path):
    rows = [
        {"context": "c", "question": "q1", "answers": {"text": ["Denver Broncos", "Broncos"]}},
        {"context": "c", "question": "q2", "answers": ["the Eiffel Tower"]},
        {"context": "c", "question": "q3", "answers": ["1066"]},
    ]
    path = write_jsonl(tmp_path / "squad.jsonl", rows)
    replies = ["  Broncos\n", "Eiffel tower.", "in 1067"]

    class FakeLLM:
        def generate(self, prompts, params):
            assert len(prompts) == 3 and params.temperature == 0.0 and "\n" in params.stop
            assert prompts[0].startswith("c\n\nQuestion: q1")
            return [SimpleNamespace(text=t) for t in replies]

    r = extractive_qa(FakeLLM(), path, limit=None)
    assert r.num_items == 3
    assert r.exact_match == pytest.approx(2 / 3)
    assert r.f1 == pytest.approx((1 + 1 + 0) / 3)


def test_perplexity_is_scored_on_the_given_kv_cache(tiny):
    """`miaotui eval --kv-cache-dtype int8` scores on the int8 cache it serves with: the NLL moves
    (by little), where a flag that silently did nothing would leave it bit-identical."""
    from miaotui.model.kv_cache import Int8KVCache

    _, ours = tiny
    ids = [(7 * i + 3) % 128 for i in range(300)]
    plain = perplexity_of_ids(ours, ids, window=128, stride=64)
    int8 = perplexity_of_ids(ours, ids, window=128, stride=64, kv_cache=Int8KVCache)
    assert int8.nll != plain.nll
    assert abs(int8.nll - plain.nll) < 1e-2 * plain.nll
