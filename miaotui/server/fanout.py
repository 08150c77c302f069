"""One API call = prompts x n engine requests: `FanOut` runs them as engine streams and merges
their outputs, tagged with their choice index, and aborts whatever is left when the call ends
(client gone, error, done)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from miaotui.engine.engine import RequestOutput
from miaotui.sampling_params import SamplingParams
from miaotui.server.errors import api_error_for

DISCONNECT_POLL_S = 1.0  # how often a non-streaming call checks that its client is still there


@dataclass(frozen=True)
class Job:
    index: int
    """The choice index: prompt i, completion j -> i * n + j."""
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams


class ClientGone(Exception):
    """The client disconnected while we waited for tokens."""


_END = object()  # a sub-request's stream ended


class FanOut:
    """Runs the jobs of one call as engine requests and merges their outputs, tagged with their
    choice index. `close()` cancels and aborts whatever is still running (idempotent)."""

    def __init__(self, engine, jobs: list[Job], raw: Request):
        self.engine, self.jobs, self.raw = engine, jobs, raw
        self.queue: asyncio.Queue = asyncio.Queue()
        self.tasks: list[asyncio.Task] = []
        self.started: list[tuple[int, Any]] = []  # items read by start(), replayed by outputs()
        self.closed = False
        self.last_check = time.monotonic()

    async def start(self) -> None:
        """Submit every job and wait for each one's first output, so that bad input (400), a
        full queue (429) or a dead engine (503) is answered before any byte is sent."""
        self.tasks = [asyncio.create_task(self._pump(job)) for job in self.jobs]
        pending = {job.index for job in self.jobs}
        try:
            while pending:
                idx, item = await self._next(check_disconnect=True)
                if isinstance(item, BaseException):
                    raise item
                pending.discard(idx)
                self.started.append((idx, item))
        except BaseException as e:
            self.close()
            if isinstance(e, Exception) and not isinstance(e, ClientGone):
                raise api_error_for(e) from e
            raise

    async def outputs(self, check_disconnect: bool) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Every output of every job until all have finished. Raises ClientGone (if checking)
        and an engine failure as it comes."""
        remaining = len(self.jobs)
        items = list(self.started)
        self.started = []
        while remaining:
            idx, item = items.pop(0) if items else await self._next(check_disconnect)
            if item is _END:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield idx, item

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for t in self.tasks:
            t.cancel()
        for job in self.jobs:  # belt and braces: a cancelled generator aborts its request too
            self.engine.abort(job.request_id)

    async def _pump(self, job: Job) -> None:
        try:
            async for out in self.engine.generate(job.prompt_ids, job.params, job.request_id):
                self.queue.put_nowait((job.index, out))
        except Exception as e:  # forwarded to the consumer (CancelledError is not an Exception)
            self.queue.put_nowait((job.index, e))
        self.queue.put_nowait((job.index, _END))

    async def _next(self, check_disconnect: bool) -> tuple[int, Any]:
        """The next (index, item); with check_disconnect, raises ClientGone within about
        DISCONNECT_POLL_S of the client leaving, whether tokens are flowing or not."""
        if not check_disconnect:
            return await self.queue.get()
        while True:
            now = time.monotonic()
            if now - self.last_check >= DISCONNECT_POLL_S:
                self.last_check = now
                if await self.raw.is_disconnected():
                    raise ClientGone()
            try:
                return await asyncio.wait_for(self.queue.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                continue
