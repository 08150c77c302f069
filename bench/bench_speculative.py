"""Issue 11 benchmark: single-stream decode with each `--speculative-method` (ngram, layerskip,
and draft:MODEL when a draft is given) against the same engine without it, and against
llama.cpp's own prompt lookup (`llama-lookup`), on three kinds of prompts built from
../shared/data (read in place):

- extractive: a SQuAD passage and question, answered by copying the passage's sentence;
- rewriting: a Pride and Prejudice paragraph to repeat with one name changed;
- chat: an open TruthfulQA question.

Greedy, up to --new-tokens tokens, each prompt rendered once with the model's chat template and
given as the same text to both engines (llama-lookup takes raw text; its special tokens are
parsed); all engines share one loaded model and run interleaved, best of --repeats; their
tokens must be the same. Answers shorter than 16 tokens are left out of the speeds (too few to
time). `layerskip` (no depth given) calibrates at load and may turn itself off: then it is
reported as off with its calibration table, and not timed (it is the base engine). Also batch-16
throughput over a mix of the three, with and without, to see whether speculation should be on
by default. Writes JSON (with the load average and each method's spec_stats) and prints a table.

    .venv/bin/python bench/bench_speculative.py [--methods ngram,layerskip] [--draft MODEL]
        [--prompts 3] [--repeats 2] [--json bench/out/speculative.json]

No draft model shares SmolLM2's tokenizer on this machine (Gemma 3 270M has another one), so
`draft:` runs only with --draft (a smaller SmolLM2-family GGUF).

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


def engines(a: argparse.Namespace) -> dict:
    """The base engine and one engine per method, all on one loaded model."""
    from miaotui import LLM
    from miaotui.config import EngineConfig
    from miaotui.loader import engine_for_model

    base = LLM(threads=a.threads, max_model_len=2048)
    out = {"base": base}
    for method in a.methods:
        cfg = EngineConfig.from_kwargs(
            threads=a.threads, max_model_len=2048, speculative_method=method
        )
        model = base.engine.runner.model
        out[method] = LLM.from_engine(engine_for_model(model, base.tokenizer, cfg))
    return out


def run(a: argparse.Namespace) -> dict:
    from miaotui import SamplingParams

    load_before = os.getloadavg()
    llms = engines(a)
    off = {
        m: llm.engine.spec_stats().get("calibration")
        for m, llm in llms.items()
        if m != "base" and not llm.engine.speculating
    }
    timed = {m: llm for m, llm in llms.items() if m not in off}
    params = SamplingParams(max_tokens=a.new_tokens, temperature=0.0)
    chat = llms["base"].tokenizer.apply_chat_template
    kinds = {
        k: [chat([{"role": "user", "content": t}]) for t in texts]
        for k, texts in prompts(a.prompts).items()
    }
    out = {}
    for kind, texts in kinds.items():
        rows = []
        for text in texts:
            best = dict.fromkeys(timed, 0.0)
            tokens, stats = {}, {}
            for _ in range(a.repeats):
                for name, llm in timed.items():
                    before = llm.engine.spec_stats()
                    r = llm.generate([text], params)[0]
                    best[name] = max(best[name], r.decode_tokens_per_s)
                    tokens[name] = r.token_ids
                    stats[name] = delta(before, llm.engine.spec_stats())
            peer = None
            if peers.peer_unavailable_reason("llama-lookup") is None:
                peer = max(
                    peers.llama_lookup(text, a.new_tokens, threads=a.threads or 2)["decode_tok_s"]
                    for _ in range(a.repeats)
                )
            if len(tokens["base"]) < 16:
                print(f"{kind}: {len(tokens['base'])}-token answer left out", file=sys.stderr)
                continue
            row = {"base_tok_s": best["base"], "tokens": len(tokens["base"])}
            row["llama_lookup_tok_s"] = peer
            row["methods"] = {
                m: {
                    "tok_s": best[m],
                    "speedup": best[m] / best["base"],
                    "same_tokens": tokens[m] == tokens["base"],
                    **stats[m],
                }
                for m in timed
                if m != "base"
            }
            rows.append(row)
            print(f"{kind}: {row}", file=sys.stderr)
        out[kind] = summarize(rows, [m for m in timed if m != "base"])
    out["batch16"] = batch(timed, kinds, params)
    return {
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "off": off,
        "kinds": out,
        "spec_stats": {m: llm.engine.spec_stats() for m, llm in llms.items() if m != "base"},
    }


def delta(before: dict, after: dict) -> dict:
    """One run's acceptance, mean accepted length and times, from spec_stats before and after."""
    d = {k: after[k] - before[k] for k in ("proposed", "accepted", "drafts", "draft_s", "verify_s")}
    return {
        "acceptance": d["accepted"] / d["proposed"] if d["proposed"] else None,
        "mean_accepted_length": d["accepted"] / d["drafts"] if d["drafts"] else None,
        "draft_s": d["draft_s"],
        "verify_s": d["verify_s"],
    }


def summarize(rows: list[dict], methods: list[str]) -> dict:
    def mean(vals: list) -> float | None:
        vals = [v for v in vals if v is not None]
        return sum(vals) / len(vals) if vals else None

    s = {
        "base_tok_s": mean([r["base_tok_s"] for r in rows]),
        "llama_lookup_tok_s": mean([r["llama_lookup_tok_s"] for r in rows]),
        "methods": {},
    }
    for m in methods:
        per = [r["methods"][m] for r in rows]
        keys = ("tok_s", "speedup", "acceptance", "mean_accepted_length")
        ms = {k: mean([p[k] for p in per]) for k in keys}
        ms["min_speedup"] = min((p["speedup"] for p in per), default=None)
        ms["all_same_tokens"] = all(p["same_tokens"] for p in per)
        if s["llama_lookup_tok_s"] and ms["tok_s"]:
            ms["over_llama_lookup"] = ms["tok_s"] / s["llama_lookup_tok_s"]
        s["methods"][m] = ms
    s["rows"] = rows
    return s


def batch(llms: dict, kinds: dict[str, list[str]], params) -> dict:
    """16 requests (the three kinds, repeated) at once: generated tokens / wall time, best of 2
    interleaved rounds after an untimed one (each engine's first batch faults in the KV cache
    pages it touches: measured 0.6x of later rounds)."""
    import time

    mix = [t for texts in kinds.values() for t in texts]
    mix = (mix * (16 // len(mix) + 1))[:16]
    for llm in llms.values():
        llm.generate(mix, params)
    res = {}
    for _ in range(2):
        for name, llm in llms.items():
            t0 = time.perf_counter()
            outs = llm.generate(mix, params)
            rate = sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t0)
            res[f"{name}_tok_s"] = max(res.get(f"{name}_tok_s", 0.0), rate)
    for name in llms:
        if name != "base":
            res[f"{name}_speedup"] = res[f"{name}_tok_s"] / res["base_tok_s"]
    return res


def print_table(r: dict) -> None:
    print(f"load average before {r['loadavg_before'][0]:.2f}, after {r['loadavg_after'][0]:.2f}")
    for m, table in r["off"].items():
        print(f"{m}: off (turned itself off at load); calibration {table}")
    print(
        f"{'prompts':11s} {'method':14s} {'base':>7s} {'spec':>7s} {'speedup':>8s} {'min':>6s} "
        f"{'accept':>7s} {'acc.len':>7s} {'llama-lookup':>13s} same"
    )
    for kind in ("extractive", "rewriting", "chat"):
        k = r["kinds"][kind]
        for m, s in k["methods"].items():
            print(
                f"{kind:11s} {m:14s} {k['base_tok_s']:7.1f} {s['tok_s']:7.1f} "
                f"{s['speedup']:8.2f} {s['min_speedup']:6.2f} {s['acceptance'] or 0:7.2f} "
                f"{s['mean_accepted_length'] or 0:7.2f} {k['llama_lookup_tok_s'] or 0:13.1f} "
                f"{s['all_same_tokens']}"
            )
    b = r["kinds"]["batch16"]
    for name in b:
        if name.endswith("_speedup"):
            m = name.removesuffix("_speedup")
            print(
                f"batch 16 mix, {m}: {b['base_tok_s']:.1f} -> {b[m + '_tok_s']:.1f} tok/s "
                f"({b[name]:.2f}x)"
            )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="ngram,layerskip", help="comma list of methods")
    p.add_argument("--draft", default=None, help="also run draft:DRAFT (a smaller model)")
    p.add_argument("--prompts", type=int, default=3, help="prompts per kind")
    p.add_argument("--new-tokens", type=int, default=96)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, default=Path(__file__).parent / "out" / "speculative.json")
    a = p.parse_args()
    a.methods = [m for m in a.methods.split(",") if m] + ([f"draft:{a.draft}"] if a.draft else [])
    r = run(a)
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(r, indent=2))
    print_table(r)


if __name__ == "__main__":
    main()
