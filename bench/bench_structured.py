"""Per-token cost of structured-output masking: decode throughput of the same batch of chat
requests with and without a json_schema constraint, in one run (free and constrained rounds
alternate, so that both see the same machine), on the default model.

Constrained requests stop when their JSON is complete, free ones run to max_tokens, so the figure
compared is generated tokens per second of wall time. Also reported, from the engine's mask
counters: the time spent filling masks (in llguidance's threads, beside the forward pass) and
the time the sampler waited for them and applied them (on the critical path), per step and per
constrained token; and the load average before and after (the CPU is shared).

    .venv/bin/python bench/bench_structured.py
    .venv/bin/python bench/bench_structured.py --batch 8 --tokens 48 --rounds 3 --weights packed

Prints one JSON object (and writes it to bench/out/structured.json). Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from miaotui.llm import LLM
from miaotui.sampling_params import SamplingParams, StructuredOutput

OUT = Path(__file__).resolve().parent / "out" / "structured.json"
SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 40},
        "year": {"type": "integer", "minimum": 1800, "maximum": 2030},
        "genres": {"type": "array", "items": {"enum": ["drama", "comedy", "horror"]}},
        "cast": {"type": "array", "items": {"type": "string", "maxLength": 24}, "maxItems": 6},
        "rating": {"type": "number", "minimum": 0, "maximum": 10},
    },
    "required": ["title", "year", "genres", "cast", "rating"],
    "additionalProperties": False,
}
TOPICS = ["a film about the sea", "a comedy set in Paris", "an old western", "a space opera"]


def log(msg: str) -> None:
    print(f"[bench_structured] {msg}", file=sys.stderr, flush=True)


def run(llm: LLM, prompts: list[str], params: SamplingParams) -> dict:
    stats = llm.engine.structured.stats
    before = (stats.steps, stats.rows, stats.fill_s, stats.wait_s)
    t0 = time.perf_counter()
    results = llm.generate(prompts, params)
    wall = time.perf_counter() - t0
    tokens = sum(len(r.token_ids) for r in results)
    steps, rows, fill_s, wait_s = (
        a - b for a, b in zip((stats.steps, stats.rows, stats.fill_s, stats.wait_s), before)
    )
    return {
        "tok_s": tokens / wall,
        "tokens": tokens,
        "wall_s": wall,
        "mask_steps": steps,
        "mask_rows": rows,
        "fill_s": fill_s,
        "wait_s": wait_s,
        "texts": [r.text for r in results],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8, help="concurrent requests")
    ap.add_argument("--tokens", type=int, default=48, help="max_tokens per request")
    ap.add_argument("--rounds", type=int, default=3, help="free/constrained pairs")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--weights", default="native", choices=["native", "packed", "float"])
    a = ap.parse_args()

    load_before = os.getloadavg()
    llm = LLM(threads=a.threads, max_model_len=512, weights=a.weights)
    tok = llm.tokenizer
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": f"Describe {TOPICS[i % 4]} as JSON."}])
        for i in range(a.batch)
    ]
    free = SamplingParams(max_tokens=a.tokens, temperature=0.0, ignore_eos=True)
    spec = StructuredOutput(json_schema=json.dumps(SCHEMA))
    constrained = SamplingParams(max_tokens=a.tokens, temperature=0.0, structured=spec)
    log("warm-up (builds llguidance's tokenizer)")
    run(llm, prompts[:2], SamplingParams(max_tokens=4, temperature=0.0, structured=spec))
    run(llm, prompts[:2], SamplingParams(max_tokens=4, temperature=0.0))
    rounds = []
    for r in range(a.rounds):
        pair = {"free": run(llm, prompts, free), "json_schema": run(llm, prompts, constrained)}
        log(
            f"round {r}: free {pair['free']['tok_s']:.1f} tok/s, "
            f"json_schema {pair['json_schema']['tok_s']:.1f} tok/s"
        )
        rounds.append(pair)
    load_after = os.getloadavg()

    def median(kind: str, key: str) -> float:
        return statistics.median(p[kind][key] for p in rounds)

    c = [p["json_schema"] for p in rounds]
    steps = sum(x["mask_steps"] for x in c)
    rows = sum(x["mask_rows"] for x in c)
    fill, wait = sum(x["fill_s"] for x in c), sum(x["wait_s"] for x in c)
    valid = sum(_valid(t) for x in c for t in x["texts"])
    out = {
        "model": "default (SmolLM2-135M-Instruct)",
        "weights": a.weights,
        "batch": a.batch,
        "max_tokens": a.tokens,
        "rounds": a.rounds,
        "free_tok_s": round(median("free", "tok_s"), 2),
        "json_schema_tok_s": round(median("json_schema", "tok_s"), 2),
        "json_schema_over_free": round(median("json_schema", "tok_s") / median("free", "tok_s"), 3),
        "mask_fill_ms_per_step": round(1e3 * fill / steps, 3),
        "mask_wait_ms_per_step": round(1e3 * wait / steps, 3),
        "mask_fill_us_per_row": round(1e6 * fill / rows, 1),
        "mask_wait_us_per_constrained_token": round(1e6 * wait / rows, 1),
        "constrained_outputs_valid_json": f"{valid}/{len(c) * a.batch}",
        "constrained_tokens_per_round": round(median("json_schema", "tokens"), 1),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in load_after],
        "cpus": os.cpu_count(),
    }
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


def _valid(text: str) -> bool:
    """Complete JSON that the schema's shape holds (cut-off outputs are not)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return False
    return isinstance(value, dict) and set(value) == set(SCHEMA["required"])


if __name__ == "__main__":
    main()
