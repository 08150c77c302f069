"""Comparison reports: a Markdown table, JSON, and matplotlib plots of speed against accuracy."""

from __future__ import annotations

import json
from pathlib import Path

COLUMNS = [
    ("config", "config", "{}"),
    ("ppl", "wiki ppl", "{:.3f}"),
    ("ppl_delta", "Δppl", "{:+.2%}"),
    ("social_iqa", "social_iqa", "{:.3f}"),
    ("strategyqa", "strategyqa", "{:.3f}"),
    ("truthful_qa_mc", "truthful_qa", "{:.3f}"),
    ("decode_tok_s", "decode tok/s", "{:.1f}"),
    ("prefill_tok_s", "prefill tok/s", "{:.1f}"),
    ("batch_tok_s", "batch-16 tok/s", "{:.1f}"),
    ("peak_rss_mib", "peak RSS MiB", "{:.0f}"),
    ("weights_mib", "weights MiB", "{:.1f}"),
]


def add_deltas(rows: list[dict], baseline: str) -> None:
    base = next((r for r in rows if r["config"] == baseline and r.get("ppl")), None)
    for r in rows:
        if base and r.get("ppl"):
            r["ppl_delta"] = r["ppl"] / base["ppl"] - 1


def markdown_table(rows: list[dict]) -> str:
    cols = [c for c in COLUMNS if any(c[0] in r for r in rows)]
    head = "| " + " | ".join(c[1] for c in cols) + " |"
    sep = "|" + "|".join("---" for _ in cols) + "|"
    lines = [head, sep]
    for r in rows:
        cells = []
        for key, _, fmt in cols:
            v = r.get(key)
            cells.append("—" if v is None else fmt.format(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], out: Path, title: str = "speed vs accuracy") -> list[Path]:
    """decode tok/s against perplexity, and memory per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    pts = [r for r in rows if r.get("ppl") and r.get("decode_tok_s")]
    fig, ax = plt.subplots(figsize=(7, 5))
    for r in pts:
        kind = (
            "tab:red" if "prune" in r["config"] else ("tab:green" if r.get("peer") else "tab:blue")
        )
        ax.scatter(r["ppl"], r["decode_tok_s"], color=kind)
        ax.annotate(
            r["config"],
            (r["ppl"], r["decode_tok_s"]),
            fontsize=7,
            xytext=(4, 3),
            textcoords="offset points",
        )
    ax.set_xlabel("perplexity on wiki_dev.txt (lower is better)")
    ax.set_ylabel("decode tokens/s, 1 stream (higher is better)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    speed_path = out / "speed_vs_ppl.png"
    fig.tight_layout()
    fig.savefig(speed_path, dpi=120)
    plt.close(fig)

    mem = [r for r in rows if r.get("peak_rss_mib")]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.barh([r["config"] for r in mem], [r["peak_rss_mib"] for r in mem], color="tab:gray")
    ax.set_xlabel("peak RSS (MiB)")
    ax.set_title("memory")
    fig.tight_layout()
    mem_path = out / "memory.png"
    fig.savefig(mem_path, dpi=120)
    plt.close(fig)
    return [speed_path, mem_path]


def write_report(rows: list[dict], out: Path, baseline: str) -> dict[str, Path]:
    add_deltas(rows, baseline)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(rows, indent=2))
    (out / "compare.md").write_text(markdown_table(rows) + "\n")
    paths = plot(rows, out)
    return {"json": out / "compare.json", "markdown": out / "compare.md", "plots": paths}
