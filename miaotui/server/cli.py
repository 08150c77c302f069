"""`miaotui serve`: the OpenAI-compatible server on one engine (or on replicas / model-parallel
ranks when the parallel flags are given)."""

from __future__ import annotations

import argparse
import logging
import sys

log = logging.getLogger(__name__)


def register(sub) -> None:
    from miaotui.cli import add_engine_args

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (FastAPI + uvicorn)")
    add_engine_args(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    p.add_argument("--served-model-name", default=None)
    p.add_argument(
        "--max-waiting",
        type=int,
        default=256,
        help="queue bound; beyond it requests get 429 + Retry-After",
    )
    p.set_defaults(func=cmd_serve)


def cmd_serve(a: argparse.Namespace) -> None:
    import dataclasses

    import uvicorn

    from miaotui.cli import engine_config
    from miaotui.engine.async_engine import AsyncEngine
    from miaotui.engine.loader import build_engine
    from miaotui.server.openai import ServerConfig, create_app

    cfg = dataclasses.replace(engine_config(a), max_waiting=a.max_waiting)
    name = a.served_model_name or (a.model or "smollm2-135m")
    engine = AsyncEngine(build_engine(cfg), name)
    app = create_app(engine, ServerConfig(model_name=name, api_key=a.api_key))
    print(f"miaotui: serving {name} on http://{a.host}:{a.port}/v1", file=sys.stderr)
    uvicorn.run(app, host=a.host, port=a.port, log_level="warning")
    engine.shutdown()
