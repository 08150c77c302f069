"""The server's life: serving, draining, stopped; what /health and new requests see in each.

    serving --SIGTERM/SIGINT--> draining --in-flight requests done, or the drain window over-->
    stopped (the rest aborted with an error the client reads: a final SSE error event or a
    503 body) --> uvicorn exits, the process returns 0

While draining, new API requests get 503 with Retry-After and /health answers 503 with
{"status": "draining"}; requests already accepted run on. A dead engine (its step thread
stopped) makes /health and every new API request 503 at once instead of waiting on it.
A second signal stops at once.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import signal
import time
from dataclasses import dataclass

import uvicorn
from starlette.responses import JSONResponse, Response

from miaotui.engine.async_engine import ShutdownAbortError
from miaotui.server.errors import error_response

log = logging.getLogger(__name__)

RETRY = {"Retry-After": "1"}
AFTER_ABORT_S = 5.0  # after aborting the rest, how long their error responses may take to go out


class Phase(enum.Enum):
    SERVING = "serving"
    DRAINING = "draining"
    STOPPED = "stopped"


@dataclass
class Lifecycle:
    """Shared by the middleware (which counts requests in flight) and the server (which drains).
    Lives on the event loop: no locks."""

    engine: object
    """An AsyncEngine (anything with is_alive, error and abort_all)."""
    phase: Phase = Phase.SERVING
    in_flight: int = 0
    """API requests accepted and not yet answered (a stream counts until its last byte)."""

    def engine_down(self) -> str | None:
        """Why the engine cannot serve, or None if it can."""
        if getattr(self.engine, "is_alive", True):
            return None
        return f"engine failed: {getattr(self.engine, 'error', None) or 'step thread exited'}"

    async def drain(self, timeout: float) -> None:
        """Stop accepting, let requests in flight finish for up to `timeout` s, then abort the
        rest and give their error responses a moment to reach the clients."""
        self.phase = Phase.DRAINING
        log.warning("draining: %d requests in flight, %.1f s to finish", self.in_flight, timeout)
        if not await self._wait_idle(timeout) and hasattr(self.engine, "abort_all"):
            log.warning("drain window over: aborting %d requests", self.in_flight)
            self.engine.abort_all(
                ShutdownAbortError(
                    f"the server is shutting down and this request did not finish within "
                    f"the {timeout:g} s drain window"
                )
            )
            await self._wait_idle(AFTER_ABORT_S)
        self.phase = Phase.STOPPED

    async def _wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.in_flight > 0:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.02)
        return True


class LifecycleMiddleware:
    """Pure ASGI (streaming-safe): answers /health and refuses API requests by phase, and
    counts the API requests in flight."""

    def __init__(self, app, lifecycle: Lifecycle):
        self.app, self.lifecycle = app, lifecycle

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        lc, path = self.lifecycle, scope["path"]
        refusal = None
        if path == "/health" and lc.phase is not Phase.SERVING:
            refusal = JSONResponse({"status": lc.phase.value}, 503, headers=RETRY)
        elif path == "/health" or _is_api_call(scope):
            refusal = self._refusal()
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        if not _is_api_call(scope):
            await self.app(scope, receive, send)
            return
        lc.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            lc.in_flight -= 1

    def _refusal(self) -> Response | None:
        """The 503 answer while draining or with a dead engine; None while serving."""
        if self.lifecycle.phase is not Phase.SERVING:
            message = "the server is shutting down and accepts no new requests; retry elsewhere"
            return error_response(503, message, kind="server_error", headers=RETRY)
        down = self.lifecycle.engine_down()
        if down:
            return error_response(503, down, kind="server_error")
        return None


def _is_api_call(scope) -> bool:
    """A request that would reach the engine: POST under /v1."""
    return scope["method"] == "POST" and scope["path"].startswith("/v1")


def install_lifecycle(app, engine) -> Lifecycle:
    """Wrap `app` in the lifecycle middleware; the Lifecycle is kept as app.state.lifecycle."""
    lifecycle = Lifecycle(engine)
    app.add_middleware(LifecycleMiddleware, lifecycle=lifecycle)
    app.state.lifecycle = lifecycle
    return lifecycle


class DrainingServer(uvicorn.Server):
    """uvicorn that drains on SIGTERM/SIGINT (Lifecycle.drain) before it stops listening, and
    exits normally (status 0) after; a second signal stops at once."""

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle, shutdown_timeout: float):
        super().__init__(config)
        self.lifecycle, self.shutdown_timeout = lifecycle, shutdown_timeout
        self._drain_task: asyncio.Task | None = None

    def handle_exit(self, sig: int, frame) -> None:
        if self._drain_task is not None or self.should_exit:  # the second signal
            log.warning("second %s: stopping now", signal.Signals(sig).name)
            self.should_exit = self.force_exit = True
            return
        log.warning("%s: draining for up to %g s", signal.Signals(sig).name, self.shutdown_timeout)
        try:  # the handler runs on the main thread, between two steps of the running loop
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop yet (still starting): nothing to drain
            self.should_exit = True
            return
        loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.get_running_loop().create_task(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        try:
            await self.lifecycle.drain(self.shutdown_timeout)
        finally:
            self.should_exit = True
