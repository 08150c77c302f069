"""`miaotui eval`, `miaotui bench`, `miaotui compare`."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from miaotui.cli_args import add_engine_args, engine_config

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
MC_TASKS = ("social_iqa", "strategyqa", "truthful_qa_mc")


def register(sub) -> None:
    p = sub.add_parser("eval", help="perplexity, multiple-choice accuracy, extractive QA")
    add_engine_args(p)
    p.add_argument("--data", type=Path, default=DATA, help="folder with text/ and tasks/")
    p.add_argument("--ppl-file", default="text/wiki_dev.txt")
    p.add_argument("--ppl-tokens", type=int, default=4096, help="tokens of the file to score")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--stride", type=int, default=256)
    p.add_argument("--tasks", default=",".join(MC_TASKS), help="comma list ('' for none)")
    p.add_argument("--limit", type=int, default=200, help="items per task")
    p.add_argument("--squad", type=int, default=0, help="SQuAD questions to answer (0: skip)")
    p.add_argument("--json", type=Path, default=None, help="write results here")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", help="prefill/decode/batched tok/s, TTFT, peak RSS")
    add_engine_args(p)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("compare", help="eval + bench over configurations: table and plots")
    p.add_argument("--model", "-m", default=None)
    p.add_argument(
        "--configs",
        default="fp32,native,int8,int4-rtn-g32,int4-gptq-g32,int4-awq-g32,w8a8-smooth,kv-int8",
        help="comma list: fp32, bf16, native, kv-int8, transform specs, or LABEL=DIR for a "
        "saved transformed checkpoint",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--kv-cache-gib", type=float, default=0.5, help="KV budget of every config")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--ppl-tokens", type=int, default=4096)
    p.add_argument("--out", type=Path, default=Path("out/compare"))
    p.add_argument("--baseline", default="fp32")
    p.add_argument("--no-bench", action="store_true", help="accuracy only")
    p.set_defaults(func=cmd_compare)


def _llm(a: argparse.Namespace):
    from miaotui.llm import LLM

    cfg = engine_config(a)
    t0 = time.perf_counter()
    llm = LLM(cfg)
    return llm, time.perf_counter() - t0


def cmd_eval(a: argparse.Namespace) -> None:
    from miaotui.eval.perplexity import perplexity
    from miaotui.eval.tasks import extractive_qa, multiple_choice

    llm, load_s = _llm(a)
    model, tok = llm.engine.runner.model, llm.tokenizer
    kv = type(llm.engine.runner.kv_cache)  # scored on the cache it serves with (--kv-cache-dtype)
    progress = sys.stderr.isatty()
    result: dict = {"load_s": load_s}
    ppl = perplexity(
        model, tok, a.data / a.ppl_file, a.ppl_tokens, a.window, a.stride, progress, kv
    )
    result["ppl"], result["nll"], result["ppl_tokens"] = ppl.perplexity, ppl.nll, ppl.num_tokens
    for task in filter(None, a.tasks.split(",")):
        path = a.data / "tasks" / f"{task}_dev.jsonl"
        r = multiple_choice(model, tok, path, a.limit, progress, kv)
        result[task], result[f"{task}_stderr"] = r.accuracy, r.stderr
        result[f"{task}_norm"] = r.accuracy_norm
    if a.squad:
        qa = extractive_qa(llm, a.data / "tasks" / "squad_dev.jsonl", a.squad)
        result["squad_em"], result["squad_f1"] = qa.exact_match, qa.f1
    result["weights_mib"] = weight_bytes(model) / 2**20
    _emit(result, a.json)


def cmd_bench(a: argparse.Namespace) -> None:
    from miaotui.eval.speed import measure_speed

    llm, load_s = _llm(a)
    r = measure_speed(llm, a.prompt_tokens, a.new_tokens, a.batch, repeats=a.repeats)
    result = {
        "load_s": load_s,
        **asdict(r),
        "weights_mib": weight_bytes(llm.engine.runner.model) / 2**20,
    }
    if a.speculative_method:  # over all the runs above (decode, batch); None: turned itself off
        result["speculative"] = llm.engine.spec_stats()
    _emit(result, a.json)


def weight_bytes(model) -> int:
    """Bytes of parameters and buffers that hold weights (packed tensors included)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen or t.device.type == "meta":
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def _emit(result: dict, path: Path | None) -> None:
    text = json.dumps(result, indent=2)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    print(text)


def config_args(name: str) -> list[str]:
    """CLI flags that realise one comparison configuration."""
    if name == "fp32":
        return ["--weights", "float"]
    if name == "bf16":
        return ["--weights", "float", "--dtype", "bf16"]
    if name == "native":
        return ["--weights", "native"]
    if name == "kv-int8":
        return ["--weights", "native", "--kv-cache-dtype", "int8"]
    if Path(name).is_dir():  # a checkpoint saved by `miaotui quantize` / `miaotui prune`
        return ["--model", name]
    return ["--weights", "float", "--transforms", name]


def cmd_compare(a: argparse.Namespace) -> None:
    from miaotui.eval.report import write_report

    rows = []
    base = [sys.executable, "-m", "miaotui"]
    tmp = a.out / "runs"
    for item in [c.strip() for c in a.configs.split(",") if c.strip()]:
        name, _, target = item.partition("=")  # LABEL=DIR: a saved checkpoint
        target = target or name
        print(f"[compare] {name}", file=sys.stderr)
        row = {"config": name}
        saved = Path(target).is_dir()
        common = ["--threads", str(a.threads), "--kv-cache-gib", str(a.kv_cache_gib)]
        common += ["--model", a.model] if a.model and not saved else []
        ev = tmp / f"{name}.eval.json"
        cmd = base + [
            "eval",
            *config_args(target),
            *common,
            "--limit",
            str(a.limit),
            "--ppl-tokens",
            str(a.ppl_tokens),
            "--json",
            str(ev),
        ]
        if _run(cmd):
            row.update(json.loads(ev.read_text()))
        if not a.no_bench:
            bj = tmp / f"{name}.bench.json"
            # Each config runs in its own process so that peak RSS is its own.
            if _run(base + ["bench", *config_args(target), *common, "--json", str(bj)]):
                row.update(
                    {
                        k: v
                        for k, v in json.loads(bj.read_text()).items()
                        if k not in ("weights_mib",)
                    }
                )
        rows.append(row)
    paths = write_report(rows, a.out, a.baseline)
    print((a.out / "compare.md").read_text())
    print(json.dumps({k: str(v) for k, v in paths.items()}), file=sys.stderr)


def _run(cmd: list[str]) -> bool:
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        print(f"[compare] failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}", file=sys.stderr)
    return proc.returncode == 0
