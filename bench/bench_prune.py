"""Pruning against the unpruned model, with quantization points on the same plot.

    python bench/bench_prune.py [--out bench/out/prune] [--limit 100] [--ppl-tokens 4096]
                                [--configs fp32,prune-wanda-0.5,...] [--threads 1]

Runs `miaotui compare` (every configuration in its own processes: eval = wiki_dev.txt
perplexity + multiple choice, bench = prefill / decode / batch-16 tok/s) over the unpruned fp32
model, unstructured pruning at 25 % and 50 % (magnitude, Wanda, SparseGPT), 2:4, removal of
10/20/30 % of the layers and of the MLP channels, a third of the attention heads (one of three
GQA groups) with a quarter of the MLP channels, GGUF native, int4-rtn-g32 and Wanda 50 % +
int4-rtn-g32. Then it adds, per configuration:

* ratios against fp32 measured in the same command: perplexity, decode speed-up, size; for
  the configurations that can change speed (`--speed-pairs`) the decode speed-up is measured
  again, each between two fp32 runs (`paired_speed`), because the machine's load drifts
  during the hour the compare takes;
* `sparse_mib`: the bytes of the weights with every pruned (unstructured / N:M) matrix stored
  as a bitmask + kept fp32 values (kernels/sparse.py BitmaskSparse), the compact storage;
  the dense fp32 engine still reads `weights_mib` per decoded token;

checks the issue's targets and draws ppl against decode tok/s and against size (one plot,
pruning and quantization together). Output: JSON on stdout and `OUT/bench_prune.json`,
`OUT/compare.md`, `OUT/prune_quant.png`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = [
    "fp32",
    "prune-magnitude-0.25",
    "prune-wanda-0.25",
    "prune-sparsegpt-0.25",
    "prune-magnitude-0.5",
    "prune-wanda-0.5",
    "prune-sparsegpt-0.5",
    "prune-wanda-2:4",
    "prune-sparsegpt-2:4",
    "prune-layers-0.1",
    "prune-layers-0.2",
    "prune-layers-0.3",
    "prune-channels-0.1",
    "prune-channels-0.2",
    "prune-channels-0.3",
    "prune-heads-0.33+prune-channels-0.25",
    "native",
    "int4-rtn-g32",
    "prune-wanda-0.5+int4-rtn-g32",
]


def sparse_mib(config: str, fp32_weights_mib: float, block_linear_params: int) -> float | None:
    """Weights with the pruned block linears stored as bitmask + kept fp32 values."""
    from miaotui.transforms.spec import PruneSpec, parse_specs

    try:
        specs = parse_specs(config)
    except Exception:  # fp32, native, ...: not a transform spec
        return None
    if len(specs) != 1 or not isinstance(specs[0], PruneSpec):
        return None
    spec = specs[0]
    if spec.method not in ("magnitude", "wanda", "sparsegpt"):
        return None
    density = spec.nm[0] / spec.nm[1] if spec.nm else 1 - spec.sparsity
    saved = block_linear_params * (4 - (4 * density + 1 / 8))
    return fp32_weights_mib - saved / 2**20


def block_linear_params(model: str | None) -> int:
    from miaotui.load.open import open_checkpoint

    c = open_checkpoint(model).config
    attn = c.dim * c.head_dim * (2 * c.n_heads + 2 * c.n_kv_heads)
    mlp = 3 * c.dim * c.intermediate_size
    return c.n_layers * (attn + mlp)


def family(config: str) -> str:
    from miaotui.transforms.spec import PruneSpec, parse_specs

    if config in ("fp32", "bf16", "native", "kv-int8"):
        return "fp32" if config == "fp32" else "quantized"
    specs = parse_specs(config)
    prune = [s for s in specs if isinstance(s, PruneSpec)]
    if not prune:
        return "quantized"
    if len(prune) < len(specs):
        return "prune + quantize"
    methods = {s.method for s in prune}
    if methods <= {"layers"}:
        return "layers removed"
    if methods <= {"channels", "heads"}:
        return "heads / MLP channels removed"
    return "2:4" if prune[0].nm else "unstructured"


COLORS = {
    "fp32": "black",
    "unstructured": "tab:red",
    "2:4": "tab:orange",
    "layers removed": "tab:purple",
    "heads / MLP channels removed": "tab:brown",
    "quantized": "tab:blue",
    "prune + quantize": "tab:green",
}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [r for r in rows if r.get("ppl") and r.get("decode_speedup")]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 5.5), sharey=True)
    for r in pts:
        c = COLORS[family(r["config"])]
        label = r["config"].removeprefix("prune-")
        size = r.get("sparse_mib") or r.get("weights_mib")
        for ax, x in ((a1, r["decode_speedup"]), (a2, size)):
            if x is None:
                continue
            ax.scatter(x, r["ppl"], color=c, s=22)
            ax.annotate(
                label, (x, r["ppl"]), fontsize=6.5, xytext=(3, 2), textcoords="offset points"
            )
    for fam, c in COLORS.items():
        a1.scatter([], [], color=c, label=fam)
    a1.legend(fontsize=7, loc="upper left")
    a1.set_xlabel("decode speed-up vs fp32, 1 stream (paired runs where measured)")
    a2.set_xlabel("weights MiB (unstructured: bitmask + fp32 values)")
    a1.set_ylabel("perplexity, wiki_dev.txt (lower is better)")
    a1.set_yscale("log")
    for ax in (a1, a2):
        ax.grid(alpha=0.3, which="both")
    fig.suptitle("SmolLM2-135M: pruning and quantization (same command, shared CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


SPEED_CONFIGS = [
    "prune-wanda-0.5",  # dense kernels: a control, expected ~1.0
    "prune-layers-0.1",
    "prune-layers-0.2",
    "prune-layers-0.3",
    "prune-channels-0.1",
    "prune-channels-0.2",
    "prune-channels-0.3",
    "prune-heads-0.33+prune-channels-0.25",
    "native",
    "int4-rtn-g32",
    "prune-wanda-0.5+int4-rtn-g32",
]


def paired_speed(configs: list[str], a: argparse.Namespace) -> dict[str, dict]:
    """Decode tok/s of each config between two fp32 runs (fp32, c1, fp32, c2, fp32, ...): the
    load on a shared machine drifts over the hour a compare takes, so each speed-up is taken
    against the fp32 runs right before and after it."""
    from miaotui.eval.cli import config_args

    out = a.out / "pairs"
    out.mkdir(parents=True, exist_ok=True)

    def decode(name: str, i: int) -> float | None:
        path = out / f"{i:02d}-{name}.json"
        cmd = [sys.executable, "-m", "miaotui.cli", "bench", *config_args(name)]
        cmd += ["--threads", str(a.threads), "--prompt-tokens", "64", "--new-tokens", "128"]
        cmd += ["--batch", "1", "--repeats", "3", "--json", str(path)]
        cmd += ["--model", a.model] if a.model else []
        proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if proc.returncode != 0:
            print(f"[pairs] {name} failed: {proc.stderr[-500:]!r}", file=sys.stderr)
            return None
        return json.loads(path.read_text())["decode_tok_s"]

    result: dict[str, dict] = {}
    before = decode("fp32", 0)
    for i, c in enumerate(configs, start=1):
        print(f"[pairs] {c}", file=sys.stderr)
        tok_s = decode(c, 2 * i - 1)
        after = decode("fp32", 2 * i)
        if tok_s and before and after:
            base = (before + after) / 2
            result[c] = {
                "decode_tok_s": round(tok_s, 2),
                "fp32_decode_tok_s": round(base, 2),
                "decode_speedup": round(tok_s / base, 3),
            }
        before = after
    return result


def summarize(rows: list[dict], base: dict) -> dict:
    for r in rows:
        if r.get("ppl") and base.get("ppl"):
            r["ppl_ratio"] = round(r["ppl"] / base["ppl"], 4)
        if r.get("paired_decode_speedup"):
            r["decode_speedup"] = r["paired_decode_speedup"]
        elif r.get("decode_tok_s") and base.get("decode_tok_s"):
            r["decode_speedup"] = round(r["decode_tok_s"] / base["decode_tok_s"], 3)
        size = r.get("sparse_mib") or r.get("weights_mib")
        if size and base.get("weights_mib"):
            r["size_ratio"] = round(size / base["weights_mib"], 3)
    by = {r["config"]: r for r in rows}

    def ppl(c: str) -> float:
        return by.get(c, {}).get("ppl", float("inf"))

    targets = {}
    for method in ("wanda", "sparsegpt"):
        m, x = ppl("prune-magnitude-0.5"), ppl(f"prune-{method}-0.5")
        targets[f"{method}_0.5_vs_magnitude_0.5_ppl"] = round(x / m, 3) if m < 1e30 else None
    fast = [
        r
        for r in rows
        if family(r["config"]) in ("layers removed", "heads / MLP channels removed")
        and r.get("decode_speedup", 0) >= 1.25
        and r.get("ppl")
    ]
    best = min(fast, key=lambda r: r["ppl"], default=None)
    targets["structured_1.25x_best"] = (
        None
        if best is None
        else {k: best.get(k) for k in ("config", "decode_speedup", "ppl_ratio", "size_ratio")}
    )
    return targets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "prune")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--model", default=None)
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--ppl-tokens", type=int, default=4096)
    # One thread: on the shared 2-core machine a second OpenMP thread mostly spins (measured
    # 2-5x slower forward passes under load); ratios in one command are what count.
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--report-only", action="store_true", help="reuse OUT/compare.json")
    ap.add_argument(
        "--speed-pairs",
        default=",".join(SPEED_CONFIGS),
        help="configs whose decode speed-up is re-measured between fp32 runs ('' for none)",
    )
    a = ap.parse_args()

    t0 = time.time()
    if not a.report_only:
        cmd = [sys.executable, "-m", "miaotui.cli", "compare", "--configs", a.configs]
        cmd += ["--limit", str(a.limit), "--ppl-tokens", str(a.ppl_tokens)]
        cmd += ["--threads", str(a.threads), "--out", str(a.out), "--baseline", "fp32"]
        cmd += ["--model", a.model] if a.model else []
        subprocess.run(cmd, check=True, cwd=ROOT)
    rows = json.loads((a.out / "compare.json").read_text())
    base = next(r for r in rows if r["config"] == "fp32")
    n_lin = block_linear_params(a.model)
    for r in rows:
        if base.get("weights_mib"):
            s = sparse_mib(r["config"], base["weights_mib"], n_lin)
            if s is not None:
                r["sparse_mib"] = round(s, 1)
    pairs_path = a.out / "pairs.json"
    configs = [c for c in a.speed_pairs.split(",") if c]
    if configs and not (a.report_only and pairs_path.exists()):
        pairs_path.write_text(json.dumps(paired_speed(configs, a), indent=1))
    pairs = json.loads(pairs_path.read_text()) if pairs_path.exists() else {}
    for r in rows:
        if r["config"] in pairs:
            r["paired_decode_speedup"] = pairs[r["config"]]["decode_speedup"]
    targets = summarize(rows, base)
    plot(rows, a.out / "prune_quant.png")
    keys = ("config", "ppl", "ppl_ratio", "social_iqa", "strategyqa", "truthful_qa_mc")
    keys += ("decode_tok_s", "decode_speedup", "paired_decode_speedup", "weights_mib")
    keys += ("sparse_mib", "size_ratio")
    result = {
        "benchmark": "pruning (and quantization) vs unpruned fp32, miaotui compare",
        "limit": a.limit,
        "ppl_tokens": a.ppl_tokens,
        "threads": a.threads,
        "seconds": round(time.time() - t0, 1),
        "targets": targets,
        "rows": [{k: r.get(k) for k in keys} for r in rows],
        "plot": str(a.out / "prune_quant.png"),
    }
    text = json.dumps(result, indent=1)
    (a.out / "bench_prune.json").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
