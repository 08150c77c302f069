"""Issue 11 benchmark: single-stream decode with `--speculative-method ngram` against the same
engine without it, and against llama.cpp's own prompt lookup (`llama-lookup`), on three kinds of
prompts built from ../shared/data (read in place):

- extractive: a SQuAD passage and question, answered by copying the passage's sentence;
- rewriting: a Pride and Prejudice paragraph to repeat with one name changed;
- chat: an open TruthfulQA question.

Greedy, up to --new-tokens tokens, each prompt rendered once with the model's chat template and
given as the same text to both engines (llama-lookup takes raw text; its special tokens are
parsed); ours with and without speculation interleaved, best of --repeats; their tokens must be
the same. Answers shorter than 16 tokens are left out of the speeds (too few to time).
Also batch-16 throughput over a mix of the three, with and without, to see whether speculation
should be on by default. Writes JSON (with the load average) and prints a table.

    .venv/bin/python bench/bench_speculative.py [--prompts 3] [--repeats 2] [--json bench/out/speculative.json]

Targets (issue 11): >= 1.8x single-stream decode on extractive and rewriting with ngram,
>= 1.3x on open chat with the best proposer, never slower than without speculation.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import peers  # noqa: E402  (bench/peers.py)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def read_jsonl(path: Path, n: int) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for _, line in zip(range(n), f)]


def prompts(n: int) -> dict[str, list[str]]:
    """n user messages of each kind."""
    squad = read_jsonl(DATA / "tasks" / "squad_dev.jsonl", 40)[::13][:n]
    extractive = [
        f"{r['context']}\n\nQuestion: {r['question']}\nCopy, word for word, the sentence of the "
        "passage above that answers the question."
        for r in squad
    ]
    novel = (DATA / "text" / "austen_pride_and_prejudice.txt").read_text(encoding="utf-8")
    paragraphs = [p.replace("\n", " ") for p in novel.split("\n\n") if 400 < len(p) < 900]
    rewriting = [
        f"{p}\n\nRepeat the paragraph above word for word, but write Anna instead of Elizabeth."
        for p in paragraphs[10 : 10 + n]
    ]
    qa = read_jsonl(DATA / "tasks" / "truthful_qa_mc_dev.jsonl", 3 * n)[::3][:n]
    chat = [f"{r['question']} Answer in a few sentences." for r in qa]
    return {"extractive": extractive, "rewriting": rewriting, "chat": chat}


def run(a: argparse.Namespace) -> dict:
    from miaotui import LLM, SamplingParams

    load_before = os.getloadavg()
    base = LLM(threads=a.threads, max_model_len=2048)
    spec = LLM(threads=a.threads, max_model_len=2048, speculative_method="ngram")
    params = SamplingParams(max_tokens=a.new_tokens, temperature=0.0)
    chat = base.tokenizer.apply_chat_template
    kinds = {
        k: [chat([{"role": "user", "content": t}]) for t in texts]
        for k, texts in prompts(a.prompts).items()
    }
    out = {}
    for kind, texts in kinds.items():
        rows = []
        for text in texts:
            best = {"base": 0.0, "ngram": 0.0}
            tokens = {}
            for _ in range(a.repeats):
                for name, llm in (("base", base), ("ngram", spec)):
                    before = (llm.engine.num_spec_proposed, llm.engine.num_spec_accepted)
                    r = llm.generate([text], params)[0]
                    best[name] = max(best[name], r.decode_tokens_per_s)
                    tokens[name] = r.token_ids
                    if name == "ngram":
                        proposed = llm.engine.num_spec_proposed - before[0]
                        accepted = llm.engine.num_spec_accepted - before[1]
            peer = None
            if peers.peer_unavailable_reason("llama-lookup") is None:
                peer = max(
                    peers.llama_lookup(text, a.new_tokens, threads=a.threads or 2)["decode_tok_s"]
                    for _ in range(a.repeats)
                )
            if len(tokens["base"]) < 16:
                print(f"{kind}: {len(tokens['base'])}-token answer left out", file=sys.stderr)
                continue
            rows.append(
                {
                    "base_tok_s": best["base"],
                    "ngram_tok_s": best["ngram"],
                    "speedup": best["ngram"] / best["base"],
                    "same_tokens": tokens["base"] == tokens["ngram"],
                    "tokens": len(tokens["ngram"]),
                    "acceptance": accepted / proposed if proposed else None,
                    "llama_lookup_tok_s": peer,
                }
            )
            print(f"{kind}: {rows[-1]}", file=sys.stderr)
        out[kind] = summarize(rows)
    out["batch16"] = batch(base, spec, kinds, params)
    return {"loadavg_before": load_before, "loadavg_after": os.getloadavg(), "kinds": out}


def summarize(rows: list[dict]) -> dict:
    def mean(key: str) -> float | None:
        vals = [r[key] for r in rows if r[key] is not None]
        return sum(vals) / len(vals) if vals else None

    s = {k: mean(k) for k in ("base_tok_s", "ngram_tok_s", "speedup", "acceptance")}
    s["llama_lookup_tok_s"] = mean("llama_lookup_tok_s")
    if s["llama_lookup_tok_s"]:
        s["ngram_over_llama_lookup"] = s["ngram_tok_s"] / s["llama_lookup_tok_s"]
    s["all_same_tokens"] = all(r["same_tokens"] for r in rows)
    s["min_speedup"] = min(r["speedup"] for r in rows)
    s["rows"] = rows
    return s


def batch(base, spec, kinds: dict[str, list[str]], params) -> dict:
    """16 requests (the three kinds, repeated) at once: generated tokens / wall time."""
    import time

    mix = [t for texts in kinds.values() for t in texts]
    mix = (mix * (16 // len(mix) + 1))[:16]
    res = {}
    for name, llm in (("base", base), ("ngram", spec), ("base", base), ("ngram", spec)):
        t0 = time.perf_counter()
        outs = llm.generate(mix, params)
        rate = sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t0)
        res[f"{name}_tok_s"] = max(res.get(f"{name}_tok_s", 0.0), rate)
    res["speedup"] = res["ngram_tok_s"] / res["base_tok_s"]
    return res


def print_table(r: dict) -> None:
    print(f"load average before {r['loadavg_before'][0]:.2f}, after {r['loadavg_after'][0]:.2f}")
    print(
        f"{'prompts':11s} {'base':>7s} {'ngram':>7s} {'speedup':>8s} {'accept':>7s} {'llama-lookup':>13s} {'ours/peer':>10s} same"
    )
    for kind in ("extractive", "rewriting", "chat"):
        k = r["kinds"][kind]
        peer = k["llama_lookup_tok_s"] or 0.0
        print(
            f"{kind:11s} {k['base_tok_s']:7.1f} {k['ngram_tok_s']:7.1f} {k['speedup']:8.2f} "
            f"{k['acceptance'] or 0:7.2f} {peer:13.1f} {k.get('ngram_over_llama_lookup') or 0:10.2f} "
            f"{k['all_same_tokens']}"
        )
    b = r["kinds"]["batch16"]
    print(
        f"batch 16 mix: {b['base_tok_s']:.1f} -> {b['ngram_tok_s']:.1f} tok/s ({b['speedup']:.2f}x)"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=3, help="prompts per kind")
    p.add_argument("--new-tokens", type=int, default=96)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, default=Path(__file__).parent / "out" / "speculative.json")
    a = p.parse_args()
    r = run(a)
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(r, indent=2))
    print_table(r)


if __name__ == "__main__":
    main()
