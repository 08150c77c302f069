"""Issue 2 benchmark: our engine on the default model against transformers (fp32, same GGUF) and
llama.cpp (llama-bench), in one command, 2 threads. Prints JSON with ratios.

    .venv/bin/python bench/bench_engine.py [--configs native,fp32] [--no-peers]

Each of our configurations runs in its own process (`miaotui bench`), so load time and peak RSS
are its own. Figures drift +-15 % on this shared machine: read the ratios."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402

CONFIG_FLAGS = {
    "native": ["--weights", "native"],
    "fp32": ["--weights", "float"],
    "bf16": ["--weights", "float", "--dtype", "bf16"],
}


def ours(config: str, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "bench.json"
        cmd = [
            sys.executable,
            "-m",
            "miaotui.cli",
            "bench",
            *CONFIG_FLAGS[config],
            "--threads",
            str(threads),
            "--json",
            str(out),
        ]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="native,fp32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-peers", action="store_true")
    a = ap.parse_args()
    result: dict = {"threads": a.threads, "ours": {}, "peers": {}}
    for c in a.configs.split(","):
        result["ours"][c] = ours(c, a.threads)
    if not a.no_peers:
        for name, fn in (
            ("transformers", peers.transformers_bench),
            ("llama.cpp", peers.llama_bench),
        ):
            try:
                result["peers"][name] = fn(threads=a.threads)
            except Exception as e:  # a missing peer is reported, not fatal
                result["peers"][name] = {"error": str(e)}
    ratios = {}
    for c, r in result["ours"].items():
        for peer, p in result["peers"].items():
            for key in ("prefill_tok_s", "decode_tok_s", "batch_tok_s"):
                if key in p and key in r:
                    ratios[f"{c}/{peer}:{key}"] = round(r[key] / p[key], 2)
    result["ratios"] = ratios
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
