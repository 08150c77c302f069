"""`miaotui serve`: the OpenAI-compatible server on one engine, on model-parallel ranks
(-tp / -pp, on one or many machines or under torchrun) or on data-parallel replicas (-dp, Ray).
All of serve's flags are declared here; parallel/cli.py turns the parallel ones into a
ParallelConfig and runs the ranks or replicas."""

from __future__ import annotations

import argparse
import os
import sys

from miaotui.cli_args import add_engine_args, engine_config
from miaotui.parallel import cli as parallel_cli


def register(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (FastAPI + uvicorn)")
    add_engine_args(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    p.add_argument("--served-model-name", default=None)
    p.add_argument(
        "--allowed-origins",
        nargs="*",
        default=[],
        help="browser origins allowed by CORS, e.g. http://localhost:3000 (default: none)",
    )
    p.add_argument(
        "--max-waiting",
        type=int,
        default=256,
        help="queue bound; beyond it requests get 429 + Retry-After",
    )
    p.add_argument(
        "--max-waiting-tokens",
        type=int,
        default=None,
        help="queue bound by cost: prompt + max_tokens summed over waiting requests; beyond it "
        "requests get 429 + Retry-After (default: no bound)",
    )
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="on SIGTERM/SIGINT, seconds that requests in flight get to finish before they are "
        "aborted (new requests get 503 meanwhile)",
    )
    g = p.add_argument_group("parallel")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    g.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1)
    g.add_argument("--data-parallel-size", "-dp", type=int, default=1, help="Ray replicas")
    g.add_argument("--nnodes", type=int, default=1, help="machines running model-parallel ranks")
    g.add_argument("--node-rank", type=int, default=0, help="this machine's index (0: driver)")
    g.add_argument("--master-addr", default="127.0.0.1", help="address of node 0")
    g.add_argument("--master-port", type=int, default=29500)
    g.add_argument("--dist-init-timeout", type=float, default=60.0, help="s for ranks to meet")
    g.add_argument("--dist-timeout", type=float, default=120.0, help="s per collective")
    g.add_argument("--num-micro-batches", type=int, default=0, help="pipeline micro-batches")
    g.add_argument("--ray-address", default=None, help="existing Ray cluster (default: local)")
    p.set_defaults(func=cmd_serve)


def cmd_serve(a: argparse.Namespace) -> None:
    par = parallel_cli.parallel_config(a, os.environ)
    if par.data_parallel_size > 1:
        return parallel_cli.serve_data_parallel(a, par)
    if par.world_size > 1:
        return parallel_cli.serve_model_parallel(a, par, parallel_cli.torchrun_rank(os.environ))
    return serve_one(a)


def serve_one(a: argparse.Namespace) -> None:
    """One engine in this process."""
    import uvicorn

    from miaotui.engine.async_engine import AsyncEngine
    from miaotui.load.resolve import resolve_model
    from miaotui.loader import build_engine
    from miaotui.server.lifecycle import DrainingServer
    from miaotui.server.openai import ServerConfig, create_app

    cfg = engine_config(a, max_waiting=a.max_waiting)
    name = a.served_model_name or (a.model or "smollm2-135m")
    engine = AsyncEngine(build_engine(cfg), name, max_waiting_tokens=a.max_waiting_tokens)
    origins = tuple(a.allowed_origins)
    path = str(resolve_model(cfg.model))  # for embeddings (served by a float build if native)
    server = ServerConfig(name, a.api_key, allowed_origins=origins, model_path=path)
    app = create_app(engine, server)
    print(f"miaotui: serving {name} on http://{a.host}:{a.port}/v1", file=sys.stderr)
    config = uvicorn.Config(
        app, host=a.host, port=a.port, log_level="warning", timeout_graceful_shutdown=5
    )
    DrainingServer(config, app.state.lifecycle, a.shutdown_timeout).run()
    engine.shutdown()
    print("miaotui: stopped", file=sys.stderr)
