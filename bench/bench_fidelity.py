"""Fidelity of the quantized paths, next to llama.cpp's on the same GGUF:

1. Greedy answers: how far our temperature-0 answers follow llama.cpp's own greedy answers, for
   the native step (the default), the per-module packed kernels (the path before it) and the
   fp32 reference (the GGUF decoded to float). Prompts: the first SQuAD dev questions of
   ../shared/data as token ids (the same ids to both engines). For each pair: the mean number of
   leading tokens that agree, and how many answers agree in full.
2. Perplexity gap to fp32 on wiki_dev.txt under llama-perplexity's protocol (512-token chunks
   from the start of the file, the second half of each scored): llama.cpp's Q4_1 against our
   fp32 reference, and our native step against the same reference.

    .venv/bin/python bench/bench_fidelity.py [--prompts 8] [--max-tokens 48] [--chunks 8]

Accuracy, not speed: it may run beside other work. Needs llama-server and llama-perplexity
(bench/setup_peers.sh).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import torch  # noqa: E402
from peers import _post, default_text_file, llama_perplexity, start_llama_server  # noqa: E402

from miaotui.llm import LLM  # noqa: E402
from miaotui.model.standalone import forward_sequences, token_logprobs  # noqa: E402
from miaotui.sampling_params import SamplingParams  # noqa: E402

SQUAD = Path(__file__).resolve().parents[1].parent / "shared/data/tasks/squad_dev.jsonl"
CTX = 512  # llama-perplexity's default chunk
ENGINES = {"native": "native", "packed": "packed", "float": "float"}


def dev_questions(n: int) -> list[str]:
    with open(SQUAD, encoding="utf-8") as f:
        lines = itertools.islice(f, n)
        return [f"Question: {json.loads(line)['question']}\nAnswer:" for line in lines]


def llama_cpp_greedy(prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """llama-server's greedy continuation (top_k 1, EOS ignored) of each prompt's token ids."""
    with start_llama_server(parallel=1, ctx_per_slot=1024) as url:
        out = []
        for ids in prompts:
            body = {
                "prompt": ids,
                "n_predict": max_tokens,
                "temperature": 0.0,
                "top_k": 1,
                "ignore_eos": True,
                "cache_prompt": False,
                "return_tokens": True,
            }
            out.append(_post(url + "/completion", body, timeout=300)["tokens"])
        return out


def agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    """Mean leading tokens in common, and answers identical in full."""
    lead = [
        next((i for i, (x, y) in enumerate(zip(s, t)) if x != y), min(len(s), len(t)))
        for s, t in zip(a, b)
    ]
    return {
        "mean_leading_tokens": round(sum(lead) / len(lead), 2),
        "identical": sum(s == t for s, t in zip(a, b)),
        "leading_tokens": lead,
    }


def chunked_nll(llm: LLM, ids: list[int], chunks: int) -> float:
    """Mean NLL under llama-perplexity's protocol: consecutive CTX-token chunks from the start,
    each from an empty cache, predictions of tokens CTX/2+1 .. CTX-1 scored."""
    model, kv = llm.engine.runner.model, type(llm.engine.runner.kv_cache)
    total, count = 0.0, 0
    with torch.inference_mode():
        for c in range(chunks):
            seq = ids[c * CTX : (c + 1) * CTX]
            logp = token_logprobs(forward_sequences(model, [seq], kv)[0], seq)  # token i+1 at i
            scored = logp[CTX // 2 :]  # tokens CTX/2+1 .. CTX-1
            total -= float(scored.double().sum())
            count += scored.numel()
    return total / count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--chunks", type=int, default=8, help="perplexity chunks of 512 tokens")
    a = ap.parse_args()
    params = SamplingParams(max_tokens=a.max_tokens, temperature=0.0, ignore_eos=True)
    text = default_text_file()
    answers, nll, ids, text_ids = {}, {}, None, None
    for name, weights in ENGINES.items():
        llm = LLM(weights=weights, max_model_len=1024)
        ids = ids or [llm.engine.tokenizer.encode(p) for p in dev_questions(a.prompts)]
        answers[name] = [r.outputs[0].token_ids for r in llm.generate(ids, params)]
        if name != "packed":
            text_ids = text_ids or llm.engine.tokenizer.encode(text.read_text(encoding="utf-8"))
            nll[name] = chunked_nll(llm, text_ids, a.chunks)
        del llm
    answers["llama.cpp"] = llama_cpp_greedy(ids, a.max_tokens)
    llama = llama_perplexity(chunks=a.chunks)
    pairs = [
        ("native", "llama.cpp"),
        ("packed", "llama.cpp"),
        ("float", "llama.cpp"),
        ("native", "float"),
        ("packed", "float"),
    ]
    ppl = {"float": math.exp(nll["float"]), "native": math.exp(nll["native"])}
    result = {
        "prompts": a.prompts,
        "max_tokens": a.max_tokens,
        **{f"{x} vs {y}": agreement(answers[x], answers[y]) for x, y in pairs},
        "perplexity": {
            "chunks": a.chunks,
            "fp32": round(ppl["float"], 4),
            "native": round(ppl["native"], 4),
            "llama.cpp": llama["ppl"],
            "native_gap_to_fp32": round(ppl["native"] / ppl["float"] - 1, 5),
            "llama.cpp_gap_to_fp32": round(llama["ppl"] / ppl["float"] - 1, 5),
        },
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
