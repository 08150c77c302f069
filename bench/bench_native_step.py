"""The native step's pieces on the default model, for kernel work (issue 10). Prints JSON.

    .venv/bin/python bench/bench_native_step.py [--threads 1,2]

- `linear`: one Q4_1 1536x576 layer (the MLP's shape) at N = 1, 16, 64, 512 activation rows:
  GMAC/s, best of 7 (in cache: the kernel's compute rate).
- `stream`: a 70 MB Q4_1 weight (beyond L3) at N = 1: GB/s streamed from DRAM.
- `step`: one decode step of the whole model (`NativeStepModel`, no engine) at a context of 2,
  1024 and 4000 tokens: ms/token, best of 3 x 10.
- `step_tokens`: a step scoring N = 2, 3, 5 tokens of one sequence (speculative proposals) at a
  300-token context, relative to N = 1.
- `gguf_header`: opening the default GGUF with our reader (load/gguf_parse.py) and with
  `gguf.GGUFReader`, seconds.
Runs alone on a quiet machine; the 1-minute load average is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch


def best_of(fn, reps: int, inner: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - t0) / inner)
    return best


def q4_1(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    import gguf

    w = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    q = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q4_1)
    return torch.from_numpy(np.ascontiguousarray(q))


def linear(ops, threads: list[int]) -> dict:
    w = q4_1(1536, 576)
    layers = {t: ops.BlockLinear(w, 3, 576, t, "auto") for t in threads}  # interleaved once
    out = {}
    for n in (1, 16, 40, 64, 512):
        x = torch.randn(n, 576)
        for t in threads:
            layer = layers[t]
            inner = max(3, int(1e6 / (1536 * n)))
            s = best_of(lambda layer=layer, x=x: layer(x), 7, inner)
            out[f"N{n}_t{t}_gmac_s"] = round(1536 * 576 * n / s / 1e9, 1)
    return out


def stream(ops, threads: list[int]) -> dict:
    w = torch.from_numpy(np.tile(q4_1(8192, 576).numpy(), (24, 1)))  # 196608 rows, 70 MB
    x = torch.randn(1, 576)
    out = {}
    for t in threads:
        layer = ops.BlockLinear(w, 3, 576, t, "auto")
        s = best_of(lambda layer=layer: layer(x), 9, 5)
        out[f"t{t}_gb_s"] = round(w.numel() / s / 1e9, 1)
    return out


def step(threads: list[int]) -> dict:
    from miaotui.load.open import open_checkpoint
    from miaotui.model.attention import build_attention_metadata
    from miaotui.model.kv_cache import KVCache
    from miaotui.model.native_step import build_native_step

    ckpt = open_checkpoint(None)
    c = ckpt.config
    ids, rows = torch.tensor([5]), torch.tensor([0])
    out = {}
    for t in threads:
        model = build_native_step(ckpt, threads=t)
        cache = KVCache(c.n_layers, 300 * 16, c.n_kv_heads, c.head_dim, torch.float16, "cpu")
        for layer in cache.k + cache.v:
            layer.normal_()  # finite K/V in every slot a context reads
        for ctx in (2, 1024, 4000):
            meta = build_attention_metadata([ctx], [1], [list(range(1, 290))], 16)
            with torch.inference_mode():
                s = best_of(lambda m=meta, f=model, kv=cache: f(ids, m, kv, rows), 3, 10)
            out[f"ctx{ctx}_t{t}_ms"] = round(s * 1e3, 2)
    return out


def step_tokens(threads: list[int]) -> dict:
    """A decode step scoring N tokens of one sequence (1 + N - 1 speculative proposals) at a
    300-token context, relative to N = 1: what speculation's extra rows cost."""
    from miaotui.load.open import open_checkpoint
    from miaotui.model.attention import build_attention_metadata
    from miaotui.model.kv_cache import KVCache
    from miaotui.model.native_step import build_native_step

    ckpt = open_checkpoint(None)
    c = ckpt.config
    out = {}
    for t in threads:
        model = build_native_step(ckpt, threads=t)
        cache = KVCache(c.n_layers, 40 * 16, c.n_kv_heads, c.head_dim, torch.float16, "cpu")
        for layer in cache.k + cache.v:
            layer.normal_()
        times = {}
        for n in (1, 2, 3, 5):
            meta = build_attention_metadata([300], [n], [list(range(1, 40))], 16)
            ids, rows = torch.arange(n) + 5, torch.arange(n)
            with torch.inference_mode():
                times[n] = best_of(
                    lambda m=meta, i=ids, r=rows, f=model, kv=cache: f(i, m, kv, r), 5, 10
                )
        for n in (2, 3, 5):
            out[f"n{n}_over_n1_t{t}"] = round(times[n] / times[1], 2)
    return out


def gguf_header() -> dict:
    import gguf

    from miaotui.load.gguf_parse import read_header
    from miaotui.load.resolve import resolve_model

    path = Path(resolve_model(None))
    t0 = time.perf_counter()
    read_header(path)
    ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    gguf.GGUFReader(str(path))
    theirs = time.perf_counter() - t0
    return {
        "ours_s": round(ours, 3),
        "gguf_reader_s": round(theirs, 3),
        "ratio": round(theirs / ours, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", default="1,2")
    a = ap.parse_args()
    from miaotui.kernels.build import load_native

    ops = load_native()
    if ops is None:
        raise SystemExit("the native step did not build here")
    threads = [int(t) for t in a.threads.split(",")]
    torch.set_num_threads(1)  # torch's own pool stays out of the way, as in the engine
    result = {"loadavg_before": os.getloadavg(), "isa": "vnni" if ops.cpu_has_vnni() else "avx2"}
    result["linear"] = linear(ops, threads)
    result["stream"] = stream(ops, threads)
    result["step"] = step(threads)
    result["step_tokens"] = step_tokens(threads)
    result["gguf_header"] = gguf_header()
    result["loadavg_after"] = os.getloadavg()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
