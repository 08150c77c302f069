"""AsyncEngine: the LLMEngine stepped by a background thread, with an asyncio face.

`generate()` yields RequestOutputs as tokens are produced; `abort()` stops a request and frees
its KV blocks. Scheduler state is only touched under one lock, held by the step loop while it
computes a step and briefly by callers adding or aborting requests.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from miaotui.engine.engine import LLMEngine, RequestOutput
from miaotui.engine.metrics import EngineMetrics
from miaotui.errors import MiaotuiError
from miaotui.sampling_params import SamplingParams

log = logging.getLogger(__name__)


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    last_token_time: float | None = None


class EngineDeadError(MiaotuiError):
    """The step loop failed; the engine no longer serves."""


class AsyncEngine:
    def __init__(self, engine: LLMEngine, model_name: str = "default"):
        self.engine = engine
        self.model_name = model_name
        self.metrics = EngineMetrics(model_name)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._stopped = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="miaotui-engine", daemon=True)
        self._thread.start()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.config.max_model_len

    async def generate(
        self, prompt: str | list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """Yield cumulative outputs (with deltas) until the request finishes. Cancelling the
        consumer (e.g. a client disconnect) aborts the request."""
        if self.error is not None:
            raise EngineDeadError(f"the engine stopped after an error: {self.error}")
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:
            self.engine.add_request(prompt, params, request_id)  # raises on bad input
            self._streams[request_id] = stream
            self._update_gauges()
        self._wake.set()
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise EngineDeadError(f"the engine failed: {item}") from item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._streams.pop(request_id, None)
            self.engine.abort(request_id)
            self._update_gauges()

    def shutdown(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=10)

    # ---- the step loop (background thread) -----------------------------------------------------

    def _loop(self) -> None:
        while not self._stopped:
            if not self.engine.has_unfinished():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                with self._lock:
                    outputs = self.engine.step()
                    self._record(outputs)
                    self._update_gauges()
                    deliveries = [(self._streams.get(o.request_id), o) for o in outputs]
                    for o in outputs:
                        if o.finished:
                            self._streams.pop(o.request_id, None)
            except Exception as e:  # a bug in a step: fail every stream, never hang them
                log.exception("engine step failed")
                self.error = e
                self._fail_all(e)
                return
            for stream, out in deliveries:
                if stream is not None:
                    stream.loop.call_soon_threadsafe(stream.queue.put_nowait, out)

    def _fail_all(self, e: BaseException) -> None:
        with self._lock:
            streams, self._streams = self._streams, {}
        for s in streams.values():
            s.loop.call_soon_threadsafe(s.queue.put_nowait, e)

    def _record(self, outputs: list[RequestOutput]) -> None:
        m = self.metrics
        now = time.monotonic()
        for o in outputs:
            stream = self._streams.get(o.request_id)
            n = len(o.delta_token_ids)
            m.generation_tokens.inc(n)
            if stream is not None:
                if stream.last_token_time is None:
                    m.ttft.observe(now - o.arrival_time)
                else:
                    m.itl.observe(now - stream.last_token_time)
                stream.last_token_time = now
            if o.finished:
                m.e2e.observe(now - o.arrival_time)
                m.requests_finished.inc()

    def _update_gauges(self) -> None:
        e, m = self.engine, self.metrics
        m.running.set(e.scheduler.num_running)
        m.waiting.set(e.scheduler.num_waiting)
        m.kv_usage.set(e.block_pool.usage)
        m.prefix_hit_rate.set(e.block_pool.prefix_hit_rate)
        _sync_counter(m.prompt_tokens, e.num_prompt_tokens)
        _sync_counter(m.prefix_queries, e.block_pool.prefix_queries)
        _sync_counter(m.prefix_hits, e.block_pool.prefix_hits)
        _sync_counter(m.preemptions, e.scheduler.num_preemptions)


def _sync_counter(counter, total: float) -> None:
    """Raise a prometheus counter to an engine-side running total."""
    delta = total - counter._value.get()
    if delta > 0:
        counter.inc(delta)
