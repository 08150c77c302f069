"""Multiple-choice accuracy by log-likelihood (with standard error) and extractive QA
(exact match / F1 by greedy generation), on the JSONL tasks in ../shared/data/tasks."""

from __future__ import annotations

import json
import math
import re
import string
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from miaotui.model.kv_cache import KVCache
from miaotui.model.standalone import forward_sequences, token_logprobs


@dataclass(frozen=True)
class AccuracyResult:
    task: str
    accuracy: float
    """Raw log-likelihood choice."""
    stderr: float
    """Standard error of the accuracy: sqrt(p (1 - p) / n)."""
    accuracy_norm: float
    """Choice by log-likelihood per character (length-normalised)."""
    num_items: int


def load_jsonl(path: Path, limit: int | None = None) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
            if limit is not None and len(rows) >= limit:
                break
    return rows


def choice_logprob(
    model, tokenizer, context: str, choices: list[str], kv_cache: type[KVCache] = KVCache
) -> list[float]:
    """Sum of log p(choice tokens | context) for each choice, scored in one batch."""
    ctx = tokenizer.encode(context)
    seqs, spans = [], []
    for c in choices:
        cont = tokenizer.encode(context + " " + c)[len(ctx) :]
        if not cont:
            cont = tokenizer.encode(" " + c, add_special=False)
        seqs.append(ctx + cont)
        spans.append(len(cont))
    logits = forward_sequences(model, seqs, kv_cache)
    return [float(token_logprobs(lg, s)[-n:].sum()) for lg, s, n in zip(logits, seqs, spans)]


def multiple_choice(
    model,
    tokenizer,
    path: Path,
    limit: int | None = None,
    progress: bool = False,
    kv_cache: type[KVCache] = KVCache,
) -> AccuracyResult:
    rows = load_jsonl(path, limit)
    correct = correct_norm = 0
    for row in _progress(rows, progress, Path(path).stem):
        context = f"Question: {row['question']}\nAnswer:"
        scores = choice_logprob(model, tokenizer, context, row["choices"], kv_cache)
        norm = [s / max(1, len(c)) for s, c in zip(scores, row["choices"])]
        correct += int(max(range(len(scores)), key=scores.__getitem__) == row["answer"])
        correct_norm += int(max(range(len(norm)), key=norm.__getitem__) == row["answer"])
    n = len(rows)
    acc = correct / n
    return AccuracyResult(Path(path).stem, acc, math.sqrt(acc * (1 - acc) / n), correct_norm / n, n)


@dataclass(frozen=True)
class QAResult:
    exact_match: float
    f1: float
    num_items: int


def normalize_answer(s: str) -> str:
    """SQuAD v1.1 official normalisation: lower, strip punctuation, articles and whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def f1_score(prediction: str, truth: str) -> float:
    p, t = normalize_answer(prediction).split(), normalize_answer(truth).split()
    common = Counter(p) & Counter(t)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(t)
    return 2 * precision * recall / (precision + recall)


def extractive_qa(llm, path: Path, limit: int | None = 50, max_tokens: int = 24) -> QAResult:
    """Greedy answers to SQuAD questions, scored against all reference answers."""
    from miaotui.sampling_params import SamplingParams

    rows = load_jsonl(path, limit)
    prompts = [
        f"{r['context']}\n\nQuestion: {r['question']}\nAnswer (a short span from the text):"
        for r in rows
    ]
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=("\n",))
    outs = llm.generate(prompts, params)
    em = f1 = 0.0
    for r, o in zip(rows, outs):
        answers = r["answers"]
        answers = answers.get("text", answers) if isinstance(answers, dict) else answers
        pred = o.text.strip()
        em += max(float(normalize_answer(pred) == normalize_answer(a)) for a in answers)
        f1 += max(f1_score(pred, a) for a in answers)
    n = len(rows)
    return QAResult(em / n, f1 / n, n)


def _progress(items, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="item", leave=False)
