"""Quantized linear kernels vs PyTorch peers on SmolLM2-135M shapes; prints JSON.

For every weight shape (M out, K in) and number of activation rows N it times, in the same run:
ours int8 (G=32, like Q8_0) and int4 (G=32 with offsets, like Q4_1), fp32 `F.linear` (MKL),
`torch._weight_int8pack_mm` and `torch._weight_int4pack_mm_for_cpu` (both with bf16 activations,
their fast case). Times are medians in µs per call; GB/s counts the weight bytes each op reads
(codes + fp32 scales/offsets for ours). "hot" repeats one weight (it stays in the 32 MiB L3 when
small enough); "cold" (N=1 only) cycles through copies totalling > 64 MiB so every call streams
its weight from DRAM, as in a real decode step.

    .venv/bin/python bench/bench_kernels.py [--threads 2] [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from miaotui.kernels import (
    choose_path,
    kernels_available,
    linear_int4,
    linear_int8,
    pack_int4,
    pack_int8,
)

# SmolLM2-135M: hidden 576, 9 heads / 3 kv heads of 64, MLP 1536, vocab 49152 (tied head);
# 3072 x 576 is the fused gate+up projection.
SHAPES = [(576, 576), (192, 576), (1536, 576), (3072, 576), (576, 1536), (49152, 576)]
NS = [1, 4, 16, 128, 512]
GROUP = 32
COLD_BYTES = 64 << 20


def timeit(fn: Callable[[int], object], budget_s: float, min_reps: int = 3) -> float:
    """Median µs of fn(i) over at least min_reps calls and about budget_s seconds."""
    fn(0)
    times: list[float] = []
    start = time.perf_counter()
    i = 1
    while len(times) < min_reps or time.perf_counter() - start < budget_s:
        t = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t)
        i += 1
        if len(times) >= 2000:
            break
    return statistics.median(times) * 1e6


def make_op(
    name: str, m: int, k: int, copies: int, gen: torch.Generator
) -> tuple[list, int, Callable]:
    """(weights, one per copy; bytes read per call; fn(x_fp32, x_bf16, weight)) for one op."""
    ws: list = []
    for _ in range(copies):
        scale = torch.rand(m, k // GROUP, generator=gen) * 0.01
        if name.startswith("ours_int8"):
            ws.append(
                pack_int8(
                    torch.randint(-127, 128, (m, k), generator=gen, dtype=torch.int8), scale, GROUP
                )
            )
        elif name.startswith("ours_int4"):
            q4 = torch.randint(0, 16, (m, k), generator=gen, dtype=torch.uint8)
            ws.append(pack_int4(q4, scale, -8 * scale, GROUP))
        elif name == "fp32_mm":
            ws.append(torch.randn(m, k, generator=gen))
        elif name == "torch_int8pack_bf16":
            q8 = torch.randint(-127, 128, (m, k), generator=gen, dtype=torch.int8)
            ws.append((q8, torch.rand(m, generator=gen).to(torch.bfloat16)))
        else:
            q4 = torch.randint(0, 16, (m, k), generator=gen, dtype=torch.int32)
            sz = torch.rand(k // GROUP, m, 2, generator=gen).to(torch.bfloat16)
            ws.append((torch._convert_weight_to_int4pack_for_cpu(q4, 2), sz))
    if name == "ours_int8":
        return ws, m * k + m * (k // GROUP) * 4, lambda x, xb, w: linear_int8(x, w)
    if name == "ours_int4":
        return ws, m * k // 2 + 2 * m * (k // GROUP) * 4, lambda x, xb, w: linear_int4(x, w)
    if name == "ours_int8_gemm":
        return ws, m * k + m * (k // GROUP) * 4, lambda x, xb, w: linear_int8(x, w, path="gemm")
    if name == "ours_int4_gemm":
        return (
            ws,
            m * k // 2 + 2 * m * (k // GROUP) * 4,
            lambda x, xb, w: linear_int4(x, w, path="gemm"),
        )
    if name == "fp32_mm":
        return ws, m * k * 4, lambda x, xb, w: F.linear(x, w)
    if name == "torch_int8pack_bf16":
        return ws, m * k + m * 2, lambda x, xb, w: torch._weight_int8pack_mm(xb, *w)
    return (
        ws,
        m * k // 2 + (k // GROUP) * m * 4,
        lambda x, xb, w: torch._weight_int4pack_mm_for_cpu(xb, w[0], GROUP, w[1]),
    )


OPS = ["ours_int8", "ours_int4", "fp32_mm", "torch_int8pack_bf16", "torch_int4pack_bf16"]
# Our dequantize + MKL path, timed where it could compete (the evidence for never choosing it).
GEMM_OPS = ["ours_int8_gemm", "ours_int4_gemm"]


def bench_shape(m: int, k: int, ns: list[int], budget_s: float, gen: torch.Generator) -> list[dict]:
    rows = []
    hot = {name: make_op(name, m, k, 1, gen) for name in OPS + GEMM_OPS}
    for n in ns:
        x = torch.randn(n, k, generator=gen)
        xb = x.to(torch.bfloat16)
        row: dict = {
            "M": m,
            "K": k,
            "N": n,
            "int8_path": choose_path(n, 8),
            "int4_path": choose_path(n, 4),
        }
        for name, (ws, nbytes, fn) in hot.items():
            if name == "torch_int4pack_bf16" and n > 16:  # minutes per call at prefill sizes
                continue
            if name in GEMM_OPS and n < 16:
                continue
            us = timeit(lambda i, fn=fn, w=ws[0], x=x, xb=xb: fn(x, xb, w), budget_s)
            row[name] = {"us": round(us, 1), "GBps": round(nbytes / us / 1e3, 2)}
        for ours in ("ours_int8", "ours_int4"):
            for peer in ("fp32_mm", "torch_int8pack_bf16", "torch_int4pack_bf16", ours + "_gemm"):
                if peer in row:
                    row[ours][f"speedup_vs_{peer}"] = round(row[peer]["us"] / row[ours]["us"], 2)
        rows.append(row)
    return rows


def bench_cold(m: int, k: int, budget_s: float, gen: torch.Generator) -> dict:
    """N=1 with weights streamed from DRAM: cycle through copies larger than the L3."""
    x = torch.randn(1, k, generator=gen)
    xb = x.to(torch.bfloat16)
    out: dict = {"M": m, "K": k, "N": 1}
    for name in OPS[:4]:
        one = make_op(name, m, k, 1, gen)[1]
        copies = max(2, -(-COLD_BYTES // one))
        ws, nbytes, fn = make_op(name, m, k, copies, gen)
        us = timeit(
            lambda i, fn=fn, ws=ws: fn(x, xb, ws[i % len(ws)]), budget_s, min_reps=2 * copies
        )
        out[name] = {"us": round(us, 1), "GBps": round(nbytes / us / 1e3, 2), "copies": copies}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="N in {1, 16}, shorter timing")
    ap.add_argument("--budget", type=float, default=0.3, help="seconds of timing per measurement")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    ns = [1, 16] if args.quick else NS
    budget = args.budget / 3 if args.quick else args.budget
    result = {
        "bench": "kernels",
        "threads": args.threads,
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "machine": platform.machine(),
        "kernels_available": kernels_available(),
        "group_size": GROUP,
        "hot": [r for m, k in SHAPES for r in bench_shape(m, k, ns, budget, gen)],
        "cold_N1": [
            bench_cold(m, k, budget, gen) for m, k in [(3072, 576), (576, 1536), (49152, 576)]
        ],
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
