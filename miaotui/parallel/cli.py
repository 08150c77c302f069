"""`miaotui serve` with the parallel flags (declared in server/cli.py): model-parallel ranks on one
or many machines (or under torchrun), data-parallel replicas on Ray. Flags and torchrun's
environment become a ParallelConfig here and nowhere else."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys

from miaotui.cli_args import engine_config
from miaotui.config import EngineConfig, ParallelConfig
from miaotui.errors import InvalidRequestError

log = logging.getLogger(__name__)
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def torchrun_rank(env) -> int | None:
    """This process's rank when started by torchrun (one process per rank), else None."""
    if all(k in env for k in TORCHRUN_VARS):
        return int(env["RANK"])
    return None


def parallel_config(a: argparse.Namespace, env) -> ParallelConfig:
    tp, pp = a.tensor_parallel_size, a.pipeline_parallel_size
    fields = dict(
        tensor_parallel_size=tp,
        pipeline_parallel_size=pp,
        data_parallel_size=a.data_parallel_size,
        nnodes=a.nnodes,
        node_rank=a.node_rank,
        master_addr=a.master_addr,
        master_port=a.master_port,
        init_timeout_s=a.dist_init_timeout,
        timeout_s=a.dist_timeout,
        num_micro_batches=a.num_micro_batches,
    )
    if torchrun_rank(env) is not None:
        world = int(env["WORLD_SIZE"])
        if world != tp * pp:
            raise InvalidRequestError(
                f"torchrun started WORLD_SIZE={world} processes but --tensor-parallel-size "
                f"{tp} x --pipeline-parallel-size {pp} = {tp * pp}; make them equal"
            )
        fields.update(
            master_addr=env["MASTER_ADDR"],
            master_port=int(env["MASTER_PORT"]),
            nnodes=1,
            node_rank=0,
            init_method="env",
        )
    if a.data_parallel_size > 1 and tp * pp > 1:
        raise InvalidRequestError(
            "--data-parallel-size > 1 with tensor or pipeline parallelism is not supported yet; "
            "use replicas of single-process engines"
        )
    return ParallelConfig(**fields)


def _engine_config(a: argparse.Namespace, ranks_here: int) -> EngineConfig:
    cfg = engine_config(a, max_waiting=a.max_waiting)
    if cfg.device.threads is None and ranks_here > 1:  # ranks of one machine share its cores
        threads = max(1, (os.cpu_count() or 1) // ranks_here)
        cfg = dataclasses.replace(cfg, device=dataclasses.replace(cfg.device, threads=threads))
    return cfg


def serve_model_parallel(a: argparse.Namespace, par: ParallelConfig, rank: int | None) -> None:
    """Node 0 (or torchrun rank 0) runs the driver and the HTTP server; every other rank of this
    machine is a child process. On other nodes this process runs the first local rank."""
    from miaotui.parallel.workers import (
        RankMonitor,
        build_driver_engine,
        run_worker,
        spawn_workers,
        stop_workers,
    )

    if rank is None:  # our own launcher: this process + children for the node's other ranks
        ranks = par.node_ranks()
        cfg = _engine_config(a, len(ranks))
        rank, procs = ranks[0], spawn_workers(cfg, par, ranks[1:])
    else:  # torchrun started every rank
        cfg, procs = _engine_config(a, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))), []
    try:
        if rank != 0:
            run_worker(cfg, par, rank)
            return
        _serve_driver(a, cfg, par, procs, build_driver_engine, RankMonitor)
    finally:
        stop_workers(procs)


def _serve_driver(a, cfg, par, procs, build_driver_engine, RankMonitor) -> None:
    import uvicorn

    from miaotui.engine.async_engine import AsyncEngine
    from miaotui.errors import DistributedError
    from miaotui.server.openai import ServerConfig, create_app

    name = a.served_model_name or (a.model or "smollm2-135m")
    llm_engine = build_driver_engine(cfg, par)
    engine = AsyncEngine(llm_engine, name)

    def on_death(msg: str) -> None:
        log.error("%s", msg)
        engine.error = DistributedError(msg)  # /health turns 503, new requests are refused

    monitor = RankMonitor(procs, on_death)
    app = create_app(engine, ServerConfig(model_name=name, api_key=a.api_key))
    kind = f"tp={par.tensor_parallel_size} pp={par.pipeline_parallel_size}"
    print(f"miaotui: serving {name} ({kind}) on http://{a.host}:{a.port}/v1", file=sys.stderr)
    try:
        uvicorn.run(app, host=a.host, port=a.port, log_level="warning")
    finally:
        monitor.stop()
        engine.shutdown()
        llm_engine.runner.shutdown()


def serve_data_parallel(a: argparse.Namespace, par: ParallelConfig) -> None:
    import uvicorn

    from miaotui.parallel.dp import ReplicaRouter, start_ray
    from miaotui.server.openai import ServerConfig, create_app

    cfg = _engine_config(a, 1)
    start_ray(a.ray_address)
    name = a.served_model_name or (a.model or "smollm2-135m")
    router = ReplicaRouter(cfg, par.data_parallel_size, name)
    app = create_app(router, ServerConfig(model_name=name, api_key=a.api_key))
    n = par.data_parallel_size
    print(f"miaotui: serving {name} ({n} replicas) on http://{a.host}:{a.port}/v1", file=sys.stderr)
    try:
        uvicorn.run(app, host=a.host, port=a.port, log_level="warning")
    finally:
        router.shutdown()
