"""Parallelism benchmark: tensor parallel 1 vs 2, pipeline parallel 2, data parallel 1 vs 2 on the
default model, each under a load of 16 concurrent requests (distinct 64-token windows of English
text, 32 greedy tokens each, ignore_eos), in one command.

For the model-parallel runs the driver reports its step time split into communication (time
inside collectives / point-to-point calls, which includes waiting for the slower rank) and the
rest (compute), and the bytes it sent or received per token. Data-parallel replicas run as Ray
actors behind the same router the server uses. Prints one JSON object.

    .venv/bin/python bench/bench_parallel.py
    .venv/bin/python bench/bench_parallel.py --requests 16 --gen 32 --only tp1,tp2

Not a test: never collected by pytest.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from bench_serving import prompt_windows  # noqa: E402

from miaotui.config import CacheConfig, EngineConfig  # noqa: E402
from miaotui.sampling_params import SamplingParams  # noqa: E402

CORES = os.cpu_count() or 1


def log(msg: str) -> None:
    print(f"[bench_parallel] {msg}", file=sys.stderr, flush=True)


def _cfg(threads: int) -> EngineConfig:
    return EngineConfig.from_kwargs(
        threads=threads, max_model_len=512, cache=CacheConfig(num_blocks=1024)
    )


def _summary(results, wall: float, n_gen: int) -> dict:
    gen = sum(len(r.token_ids) for r in results)
    return {
        "requests": len(results),
        "output_tok_s": round(gen / wall, 2),
        "wall_s": round(wall, 2),
        "mean_ttft_s": round(sum(r.time_to_first_token for r in results) / len(results), 3),
        "mean_latency_s": round(sum(r.total_time for r in results) / len(results), 3),
        "generated_tokens": gen,
    }


def _model_parallel_job(kind: str, size: int, prompts, n_gen: int, cores: int, q) -> None:
    """Runs in a fresh process: the driver (rank 0) plus spawned workers, as `miaotui serve`."""
    globals()["CORES"] = cores
    from miaotui.llm import LLM
    from miaotui.loader import build_engine
    from miaotui.parallel.dist import ParallelConfig, free_port
    from miaotui.parallel.workers import build_driver_engine, spawn_workers, stop_workers

    params = SamplingParams(max_tokens=n_gen, temperature=0, ignore_eos=True)
    procs = []
    if size == 1:
        engine = build_engine(_cfg(CORES))
    else:
        sizes = {"tp": "tensor_parallel_size", "pp": "pipeline_parallel_size"}
        par = ParallelConfig(**{sizes[kind]: size}, master_port=free_port())
        cfg = _cfg(max(1, CORES // size))
        procs = spawn_workers(cfg, par, list(range(1, size)))
        engine = build_driver_engine(cfg, par)
    llm = LLM.from_engine(engine)
    llm.generate(prompts[:2], SamplingParams(max_tokens=4, temperature=0))  # warm-up
    runner = engine.runner
    if size > 1:
        runner.comm.counters.reset()
        runner.steps, runner.step_seconds = 0, 0.0
    t0 = time.perf_counter()
    results = llm.generate(prompts, params)
    out = _summary(results, time.perf_counter() - t0, n_gen)
    if size > 1:
        c = runner.comm.counters
        tokens = sum(len(p) for p in prompts) + out["generated_tokens"]
        out.update(
            steps=runner.steps,
            step_ms=round(1e3 * runner.step_seconds / runner.steps, 2),
            comm_ms_per_step=round(1e3 * c.seconds / runner.steps, 2),
            compute_ms_per_step=round(1e3 * (runner.step_seconds - c.seconds) / runner.steps, 2),
            comm_share=round(c.seconds / runner.step_seconds, 3),
            driver_bytes_per_token=round(c.bytes / tokens, 1),
            driver_bytes_per_generated_token=round(c.bytes / out["generated_tokens"], 1),
            comm_ops={k: dataclasses.asdict(v) for k, v in c.ops.items()},
        )
        runner.shutdown()
        stop_workers(procs)
    q.put(out)


def run_model_parallel(kind: str, size: int, prompts, n_gen: int) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_model_parallel_job, args=(kind, size, prompts, n_gen, CORES, q))
    p.start()
    try:
        return q.get(timeout=1800)
    finally:
        p.join(60)
        if p.is_alive():
            p.kill()


def run_data_parallel(replicas: int, prompts, n_gen: int) -> dict:
    import ray

    from miaotui.parallel.dp import ReplicaRouter, start_ray

    start_ray(num_cpus=CORES)
    threads = max(1, CORES // replicas)
    router = ReplicaRouter(_cfg(threads), replicas, "bench", replica_cpus=CORES / replicas)
    params = SamplingParams(max_tokens=n_gen, temperature=0, ignore_eos=True)

    async def one(i: int, p: list[int]) -> dict:
        t0 = time.perf_counter()
        first, last = None, None
        async for o in router.generate(p, params, f"bench-{replicas}-{i}"):
            first = first or time.perf_counter()
            last = o
        return {"ttft": first - t0, "total": time.perf_counter() - t0, "n": len(last.token_ids)}

    async def load() -> list[dict]:
        await one(-1, prompts[0][:8])  # warm-up
        return await asyncio.gather(*[one(i, p) for i, p in enumerate(prompts)])

    try:
        t0 = time.perf_counter()
        res = asyncio.run(load())
        wall = time.perf_counter() - t0
    finally:
        router.shutdown()
        ray.shutdown()
    gen = sum(r["n"] for r in res)
    return {
        "requests": len(res),
        "output_tok_s": round(gen / wall, 2),
        "wall_s": round(wall, 2),
        "mean_ttft_s": round(sum(r["ttft"] for r in res) / len(res), 3),
        "mean_latency_s": round(sum(r["total"] for r in res) / len(res), 3),
        "generated_tokens": gen,
        "served_per_replica": [r.served for r in router.replicas],
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--only", default="tp1,tp2,pp2,dp1,dp2")
    ap.add_argument("--cores", type=int, default=CORES, help="cores shared by the ranks/replicas")
    a = ap.parse_args(argv)
    globals()["CORES"] = a.cores
    prompts = prompt_windows(None, a.prompt, a.requests)
    runs = {
        "tp1": lambda: run_model_parallel("tp", 1, prompts, a.gen),
        "tp2": lambda: run_model_parallel("tp", 2, prompts, a.gen),
        "pp2": lambda: run_model_parallel("pp", 2, prompts, a.gen),
        "dp1": lambda: run_data_parallel(1, prompts, a.gen),
        "dp2": lambda: run_data_parallel(2, prompts, a.gen),
    }
    out = {
        "model": "smollm2-135m (native GGUF weights)",
        "cores": CORES,
        "concurrency": a.requests,
        "prompt_tokens": a.prompt,
        "gen_tokens": a.gen,
        "loadavg_before": os.getloadavg()[0],
    }
    for name in a.only.split(","):
        log(f"running {name}")
        out[name] = runs[name]()
        log(f"{name}: {out[name]}")
    for base, other in (("tp1", "tp2"), ("tp1", "pp2"), ("dp1", "dp2")):
        if base in out and other in out:
            out[f"{other}_vs_{base}_throughput"] = round(
                out[other]["output_tok_s"] / out[base]["output_tok_s"], 3
            )
    out["loadavg_after"] = os.getloadavg()[0]
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
