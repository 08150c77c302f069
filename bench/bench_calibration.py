"""Calibrated quantization vs round-to-nearest on the default model: held-out perplexity and
greedy agreement with the float model, for a list of configurations, printed as JSON.

    .venv/bin/python bench/bench_calibration.py --configs int4-rtn-g128,int4-gptq-g128

The float model is built once and copied per configuration. Perplexity is `miaotui eval`'s
recipe (window 512, stride 256) on the head of wiki_dev.txt; greedy prompts come from further
into the same file; the calibration text (--calib) must be disjoint from both: `default` is
the novel `miaotui quantize` uses, `wiki-tail` starts 400,000 characters into wiki_dev.txt.
Knobs of the calibrated methods are module constants of miaotui.transforms.quantize and can be
overridden with --set NAME=VALUE (e.g. --set GPTQ_DAMP=0.01) for experiments.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
WIKI = ROOT.parent / "shared" / "data" / "text" / "wiki_dev.txt"
WIKI_TAIL = 400_000  # characters; the held-out text and prompts lie well before it
PROMPT_OFFSET = 100_000  # characters: greedy prompts start here (after the perplexity text)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="int4-rtn-g128,int4-gptq-g128,int4-awq-g128")
    p.add_argument("--calib", default="default", help="default | wiki-tail | PATH")
    p.add_argument("--calib-windows", type=int, default=None)
    p.add_argument("--calib-window", type=int, default=None)
    p.add_argument("--ppl-tokens", type=int, default=2048)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--stride", type=int, default=256)
    p.add_argument("--prompts", type=int, default=6)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--set", action="append", default=[], help="NAME=VALUE in transforms.quantize")
    p.add_argument("--no-float", action="store_true", help="skip the float row")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)

    from miaotui.cli_args import DEFAULT_CALIBRATION_TEXT
    from miaotui.load.open import load_tokenizer, open_checkpoint
    from miaotui.model.build import build_model
    from miaotui.transforms import quantize as qmod
    from miaotui.transforms.calibrate import CalibrationConfig
    from miaotui.transforms.pipeline import apply_transforms
    from miaotui.transforms.spec import TransformContext, parse_specs

    for item in a.set:
        name, _, value = item.partition("=")
        old = getattr(qmod, name)
        setattr(qmod, name, type(old)(value) if not isinstance(old, bool) else value == "1")

    ckpt = open_checkpoint(None)
    tok = load_tokenizer(ckpt)
    base = build_model(ckpt, torch.device("cpu"), torch.float32)
    text = WIKI.read_text(encoding="utf-8")
    ppl_ids = tok.encode(text[: a.ppl_tokens * 8], add_special=False)[: a.ppl_tokens]
    prompts = prompt_ids(tok, text[PROMPT_OFFSET:WIKI_TAIL], a.prompts)

    cal = CalibrationConfig(DEFAULT_CALIBRATION_TEXT)  # the CLI's default; the library has none
    if a.calib == "wiki-tail":
        cal = replace(cal, text_path=WIKI, start_char=WIKI_TAIL)
    elif a.calib != "default":
        cal = replace(cal, text_path=Path(a.calib))
    if a.calib_windows:
        cal = replace(cal, num_windows=a.calib_windows)
    if a.calib_window:
        cal = replace(cal, window=a.calib_window)

    ref_logits, ref_greedy = reference(base, ppl_ids, prompts, a)
    rows = []
    if not a.no_float:
        rows.append(measure("float", base, ppl_ids, prompts, ref_logits, ref_greedy, a, 0.0))
    for spec in filter(None, a.configs.split(",")):
        t0 = time.perf_counter()
        model = apply_transforms(copy.deepcopy(base), parse_specs(spec), TransformContext(tok, cal))
        dt = time.perf_counter() - t0
        rows.append(measure(spec, model, ppl_ids, prompts, ref_logits, ref_greedy, a, dt))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    out = {
        "calibration": f"{cal.text_path.name} from character {cal.start_char}: "
        f"{cal.num_windows} x {cal.window} tokens",
        "held_out": f"wiki_dev.txt head: {len(ppl_ids)} tokens, window {a.window}/{a.stride}",
        "set": a.set,
        "rows": rows,
    }
    print(json.dumps(out, indent=2))


def prompt_ids(tok, text: str, n: int, length: int = 32) -> list[list[int]]:
    """n prompts of `length` tokens, each starting a paragraph spread over `text`."""
    paras = [s for s in text.split("\n") if len(s) > 400 and not s.startswith("=")]
    step = max(1, len(paras) // max(n, 1))
    return [tok.encode(paras[i * step], add_special=False)[:length] for i in range(n)]


def greedy(model, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    from miaotui.model.standalone import forward_sequences

    seqs = [list(p) for p in prompts]
    for _ in range(new_tokens):
        logits = forward_sequences(model, seqs)
        for s, lg in zip(seqs, logits):
            s.append(int(lg[-1].argmax()))
    return [s[len(p) :] for s, p in zip(seqs, prompts)]


def window_logits(model, ids: list[int], a) -> list[torch.Tensor]:
    from miaotui.model.standalone import forward_sequences

    out = []
    for begin in range(0, max(1, len(ids) - 1), a.stride):
        out.append(forward_sequences(model, [ids[begin : begin + a.window]])[0])
        if begin + a.window >= len(ids):
            break
    return out


def reference(model, ppl_ids, prompts, a):
    return window_logits(model, ppl_ids, a), greedy(model, prompts, a.new_tokens)


def measure(name, model, ppl_ids, prompts, ref_logits, ref_greedy, a, seconds) -> dict:
    from miaotui.eval.perplexity import perplexity_of_ids

    ppl = perplexity_of_ids(model, ppl_ids, a.window, a.stride).perplexity
    logits = window_logits(model, ppl_ids, a)
    top1 = [
        float((x.argmax(-1) == r.argmax(-1)).float().mean()) for x, r in zip(logits, ref_logits)
    ]
    gen = greedy(model, prompts, a.new_tokens)
    agree = [
        next((i for i, (x, y) in enumerate(zip(g, r)) if x != y), len(r))
        for g, r in zip(gen, ref_greedy)
    ]
    return {
        "config": name,
        "ppl": round(ppl, 3),
        "top1_agreement": round(sum(top1) / len(top1), 4),
        "greedy_agree_tokens": agree,
        "greedy_agree_mean": round(sum(agree) / len(agree), 2),
        "quantize_s": round(seconds, 1),
    }


if __name__ == "__main__":
    main()
