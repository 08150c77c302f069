"""Sparse CSR linear (torch.sparse.mm, MKL on CPU) vs dense fp32 torch.mm, SmolLM2 shapes.

    python bench/bench_sparse.py [--out bench/out/sparse.json] [--threads T] [--rounds R]

For each weight shape ``(M out, K in)`` in {576x1536, 1536x576, 576x576}, batch ``N`` in
{1, 16, 512} and sparsity in {0.5, 0.7, 0.9, 0.95, 0.99}, it times ``sparse_linear(x, csr)``
(the function the model will call) and the bare ``torch.sparse.mm(csr, x^T)`` kernel against
dense ``torch.mm(x, w.t())`` measured in the same run. Dense and sparse timings are
interleaved over ``--rounds`` rounds; each reported time is the *minimum* over rounds of the
``torch.utils.benchmark`` median of that round (other processes on a shared machine only ever
add time, so the minimum is the best estimate of the uncontended cost; the median over rounds
is kept too as ``*_median_us``).

The weights are pruned with an exact per-row mask (every row has the same number of zeros,
as Wanda / N:M give). Output: JSON (stdout and ``--out``) with microseconds per call,
``speedup = dense_us / sparse_us`` and, per N, the crossover sparsity -- the lowest tested
sparsity from which on sparse is faster than dense -- both per shape and for the sum of the
three shapes (one of each per layer, roughly an MLP + attention projection mix), plus a
linear interpolation of where ``speedup`` crosses 1.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils import benchmark

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from miaotui.kernels.sparse import csr_nbytes, sparse_linear, to_csr  # noqa: E402
from miaotui.transforms.prune_math import apply_mask, unstructured_mask  # noqa: E402

SHAPES = [(576, 1536), (1536, 576), (576, 576)]
BATCHES = [1, 16, 512]
SPARSITIES = [0.5, 0.7, 0.9, 0.95, 0.99]


_CLOCK = {"wall": time.perf_counter, "cpu": time.thread_time}
_clock = time.perf_counter


def _time_us(stmt: str, env: dict, min_run_time: float) -> float:
    t = benchmark.Timer(stmt=stmt, globals=env, num_threads=torch.get_num_threads(), timer=_clock)
    return t.blocked_autorange(min_run_time=min_run_time).median * 1e6


def crossover(sparsities: list[float], speedups: list[float]) -> dict:
    """Lowest tested sparsity from which on every tested sparsity has speedup > 1, and the
    linear interpolation of speedup = 1 between it and the sparsity below it."""
    first = None
    for i in range(len(sparsities) - 1, -1, -1):
        if speedups[i] > 1.0:
            first = i
        else:
            break
    if first is None:
        return {"tested": None, "interpolated": None}
    if first == 0:
        return {"tested": sparsities[0], "interpolated": f"<= {sparsities[0]}"}
    s0, s1 = sparsities[first - 1], sparsities[first]
    r0, r1 = math.log(speedups[first - 1]), math.log(speedups[first])
    est = s0 + (s1 - s0) * (0.0 - r0) / (r1 - r0) if r1 != r0 else s1
    return {"tested": s1, "interpolated": round(est, 3)}


def run(rounds: int, min_run_time: float) -> dict:
    gen = torch.Generator().manual_seed(0)
    results = []
    for m_out, k_in in SHAPES:
        w = torch.randn(m_out, k_in, generator=gen)
        pruned = {}
        for s in SPARSITIES:
            mask = unstructured_mask(torch.rand(m_out, k_in, generator=gen), s, per_row=True)
            wp = apply_mask(w, mask)
            pruned[s] = (wp, to_csr(wp))
        for n in BATCHES:
            x = torch.randn(n, k_in, generator=gen)
            xt = x.t().contiguous()
            dense_t: list[float] = []
            sp_t: dict[float, list[float]] = {s: [] for s in SPARSITIES}
            kern_t: dict[float, list[float]] = {s: [] for s in SPARSITIES}
            for s in SPARSITIES:  # correctness check once, against the dense product
                wp, csr = pruned[s]
                ref = x.double() @ wp.double().T
                err = (sparse_linear(x, csr).double() - ref).abs().max().item()
                assert err < 1e-3 * max(1.0, ref.abs().max().item()), (m_out, k_in, n, s, err)
            for _ in range(rounds):
                dense_t.append(
                    _time_us("torch.mm(x, w.t())", {"torch": torch, "x": x, "w": w}, min_run_time)
                )
                for s in SPARSITIES:
                    env = {
                        "torch": torch,
                        "sparse_linear": sparse_linear,
                        "x": x,
                        "xt": xt,
                        "c": pruned[s][1],
                    }
                    sp_t[s].append(_time_us("sparse_linear(x, c)", env, min_run_time))
                    kern_t[s].append(_time_us("torch.sparse.mm(c, xt)", env, min_run_time))
            dense_us = min(dense_t)
            rows = []
            for s in SPARSITIES:
                sp_us = min(sp_t[s])
                k_us = min(kern_t[s])
                rows.append(
                    {
                        "sparsity": s,
                        "sparse_us": round(sp_us, 2),
                        "sparse_median_us": round(statistics.median(sp_t[s]), 2),
                        "kernel_us": round(k_us, 2),
                        "speedup": round(dense_us / sp_us, 3),
                        "kernel_speedup": round(dense_us / k_us, 3),
                        "csr_bytes": csr_nbytes(pruned[s][1]),
                    }
                )
            results.append(
                {
                    "shape": [m_out, k_in],
                    "n": n,
                    "dense_us": round(dense_us, 2),
                    "dense_median_us": round(statistics.median(dense_t), 2),
                    "dense_max_us": round(max(dense_t), 2),
                    "sparse": rows,
                    "crossover": crossover(SPARSITIES, [r["speedup"] for r in rows]),
                }
            )
            print(
                f"{m_out}x{k_in} N={n}: dense {dense_us:.1f} us; "
                + ", ".join(f"{r['sparsity']}: {r['sparse_us']:.1f}" for r in rows),
                file=sys.stderr,
            )

    per_n = {}
    for n in BATCHES:
        cfg = [r for r in results if r["n"] == n]
        dense_sum = sum(r["dense_us"] for r in cfg)
        sums = [sum(r["sparse"][i]["sparse_us"] for r in cfg) for i in range(len(SPARSITIES))]
        speedups = [dense_sum / s for s in sums]
        per_n[str(n)] = {
            "dense_us_sum": round(dense_sum, 2),
            "sparse_us_sum": [round(v, 2) for v in sums],
            "speedup_sum": [round(v, 3) for v in speedups],
            "crossover_sum": crossover(SPARSITIES, speedups),
            "crossover_per_shape": {
                f"{r['shape'][0]}x{r['shape'][1]}": r["crossover"]["tested"] for r in cfg
            },
        }
    return {"configs": results, "crossover_by_n": per_n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/out/sparse.json")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--min-run-time", type=float, default=0.05, help="seconds per measurement")
    ap.add_argument(
        "--clock",
        choices=["auto", "wall", "cpu"],
        default="auto",
        help="cpu = this thread's CPU time (only meaningful with --threads 1: it leaves out time "
        "the OS gave to other processes); auto = cpu with 1 thread, else wall",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    clock = args.clock
    if clock == "auto":
        clock = "cpu" if args.threads == 1 else "wall"
    if clock == "cpu" and args.threads != 1:
        ap.error("--clock cpu needs --threads 1 (other threads' work would not be counted)")
    global _clock
    _clock = _CLOCK[clock]
    load0 = os.getloadavg()
    t0 = time.time()
    body = run(args.rounds, args.min_run_time)
    report = {
        "benchmark": "sparse CSR linear vs dense fp32 torch.mm",
        "unit": "microseconds per call (min over rounds of per-round medians)",
        "speedup": "dense_us / sparse_us (>1: sparse faster)",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "clock": clock,
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "loadavg_start_end": [round(load0[0], 2), round(os.getloadavg()[0], 2)],
        "rounds": args.rounds,
        "seconds": round(time.time() - t0, 1),
        "weights": "fp32, exact per-row unstructured sparsity, CSR int32 indices",
        **body,
    }
    text = json.dumps(report, indent=1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
