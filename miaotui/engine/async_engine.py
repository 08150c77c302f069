"""AsyncEngine: the LLMEngine stepped by a background thread, with an asyncio face.

`generate()` yields RequestOutputs as tokens are produced; `abort()` stops a request and frees
its KV blocks. Only the step thread touches the engine: callers post "add" and "abort" commands
to an inbox that the thread applies between steps, so the event loop never waits for a forward
pass (one step can take a few hundred milliseconds on a busy CPU).

A step that raises (a bug, or an input the sampler cannot handle) fails the requests scheduled
in it and is forgotten: the engine keeps serving the others and the next ones. A step thread
that dies (an exception outside a step, a BaseException) fails every request, frees their KV
blocks and makes every later call raise EngineDeadError.

Admission: the scheduler bounds the waiting queue by count (max_waiting); `max_waiting_tokens`
bounds it by cost too (prompt + max_tokens of every waiting request). Once the queue is full,
new requests are refused on the caller's thread (CapacityError, no wait for a step).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

from miaotui.engine.engine import LLMEngine, RequestOutput
from miaotui.engine.metrics import EngineMetrics
from miaotui.errors import CapacityError, InvalidRequestError, MiaotuiError
from miaotui.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class EngineDeadError(MiaotuiError):
    """The step loop stopped (shut down or crashed); the engine no longer serves."""


class EngineStepError(MiaotuiError):
    """A step failed while this request was in flight; the request was aborted."""


class ShutdownAbortError(EngineDeadError):
    """The server shut down before this request finished (its drain window ran out)."""


@dataclass(eq=False)
class _Stream:
    """Where one request's outputs go: a queue on the consumer's event loop."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    last: RequestOutput | None = None
    """The newest output delivered (cumulative), to build the final one of an external abort."""
    last_token_time: float | None = None


@dataclass(frozen=True)
class _Add:
    request_id: str
    prompt: str | list[int]
    params: SamplingParams
    stream: _Stream


@dataclass(frozen=True)
class _Abort:
    request_id: str
    stream: _Stream | None
    """Abort only if this stream still owns the id (a consumer leaving); None: whoever owns it."""


@dataclass(frozen=True)
class _AbortAll:
    """Fail every request in the engine with `error` (a server's drain ran out of time)."""

    error: Exception


@dataclass(frozen=True)
class _Rejected:
    """The add failed: bad input (InvalidRequestError) or a full queue (CapacityError)."""

    error: Exception


class AsyncEngine:
    def __init__(
        self,
        engine: LLMEngine,
        model_name: str = "default",
        max_waiting_tokens: int | None = None,
    ):
        if max_waiting_tokens is not None and max_waiting_tokens <= 0:
            raise InvalidRequestError(
                f"max_waiting_tokens must be positive (or None), got {max_waiting_tokens}",
                "max_waiting_tokens",
            )
        self.engine = engine
        self.model_name = model_name
        self.max_waiting_tokens = max_waiting_tokens
        """Bound on prompt + max_tokens summed over waiting requests (None: count bound only)."""
        self._queue_full = False  # published by the step thread after every step
        self.metrics = EngineMetrics(model_name)
        self._lock = threading.Lock()  # held by the step thread while it touches the engine
        self._wake = threading.Event()
        self._inbox: deque[_Add | _Abort | _AbortAll] = deque()  # append/popleft are thread-safe
        self._streams: dict[str, _Stream] = {}  # step thread only
        self._stopped = False
        self.error: BaseException | None = None
        """Why the step loop stopped, if it did (then every call raises EngineDeadError)."""
        self._update_gauges()
        self._thread = threading.Thread(target=self._loop, name="miaotui-engine", daemon=True)
        self._thread.start()

    @property
    def is_alive(self) -> bool:
        """The step thread runs and has not failed: requests can be served."""
        return self.error is None and self._thread.is_alive()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.config.max_model_len

    async def generate(
        self, prompt: str | list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """Yield cumulative outputs (with deltas) until the request finishes. Bad input raises
        InvalidRequestError and a full queue CapacityError, both at the first iteration.
        Leaving early (break, cancel, client disconnect) aborts the request."""
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._post(_Add(request_id, prompt, params, stream))
        done = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, _Rejected):
                    done = True
                    raise item.error
                if isinstance(item, BaseException):
                    done = True
                    raise item
                yield item
                if item.finished:
                    done = True
                    return
        finally:
            if not done:
                self._post_abort(_Abort(request_id, stream))

    def abort(self, request_id: str) -> None:
        """Stop a request and free its KV blocks before the next step; its consumer receives a
        last output with finish_reason "abort". Unknown or finished ids are ignored."""
        self._post_abort(_Abort(request_id, None))

    def abort_all(self, error: Exception) -> None:
        """Fail every request now in the engine with `error` (their consumers raise it) and
        free their KV blocks before the next step."""
        self._post_abort(_AbortAll(error))

    def shutdown(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=10)

    def _post(self, command: _Add) -> None:
        self._check_alive()
        if self._queue_full:  # refused here and now: no wait for the current step to end
            self.metrics.requests_rejected.inc()
            raise CapacityError(f"the waiting queue is full ({self._queue_limits()}); retry later")
        self._inbox.append(command)
        self._wake.set()
        self._check_alive()  # the loop died before it could see the command

    def _check_alive(self) -> None:
        if self.error is not None:
            raise EngineDeadError(f"the engine is not running: {self.error}")
        if not self._thread.is_alive():
            raise EngineDeadError("the engine is not running: its step thread has exited")

    def _post_abort(self, command: _Abort) -> None:
        """Never raises: aborts run in cleanup code (finally blocks, disconnects)."""
        self._inbox.append(command)
        self._wake.set()

    # ---- the step loop (background thread) -----------------------------------------------------

    def _loop(self) -> None:
        try:
            while not self._stopped:
                if not self._inbox and not self.engine.has_unfinished():
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                self._deliver(self._step())
            self.error = EngineDeadError("the engine was shut down")
        except BaseException as e:  # a bug outside a step: stop, never leave a consumer hanging
            log.exception("engine loop failed")
            self.error = e
        self._fail_all(self.error)

    def _step(self) -> list[tuple[_Stream, RequestOutput | BaseException]]:
        """Apply the inbox, run one step; returns what to deliver to which stream."""
        deliveries: list[tuple[_Stream, RequestOutput | BaseException]] = []
        with self._lock:
            while self._inbox:
                command = self._inbox.popleft()
                if isinstance(command, _Add):
                    self._apply_add(command, deliveries)
                elif isinstance(command, _AbortAll):
                    self._fail_requests(
                        list(self.engine.scheduler.requests), command.error, deliveries
                    )
                else:
                    self._apply_abort(command, deliveries)
            outputs: list[RequestOutput] = []
            if self.engine.has_unfinished():
                self.engine.step_request_ids = []  # set by the step once it has scheduled
                try:
                    outputs = self.engine.step()
                except Exception as e:
                    log.exception("engine step failed; aborting its requests")
                    self._step_failed(e, deliveries)
            self._record(outputs)
            for o in outputs:
                stream = self._streams.get(o.request_id)
                if o.finished:
                    self._streams.pop(o.request_id, None)
                if stream is not None:
                    stream.last = o
                    deliveries.append((stream, o))
            self._update_gauges()
        return deliveries

    def _apply_add(self, cmd: _Add, deliveries: list) -> None:
        rid = cmd.request_id
        existed = rid in self.engine.scheduler.requests
        try:
            self.engine.add_request(cmd.prompt, cmd.params, rid)
        except Exception as e:
            if not isinstance(e, MiaotuiError) and not existed:
                self.engine.abort(rid)  # an unexpected failure may leave it half added
            if isinstance(e, CapacityError):
                self.metrics.requests_rejected.inc()
            deliveries.append((cmd.stream, _Rejected(e)))
            return
        if self._over_token_budget(rid):
            self.engine.abort(rid)
            self.metrics.requests_rejected.inc()
            error = CapacityError(
                f"the waiting queue is full ({self._queue_limits()}); retry later"
            )
            deliveries.append((cmd.stream, _Rejected(error)))
            return
        self._streams[rid] = cmd.stream

    def _waiting_tokens(self) -> int:
        return sum(len(r.prompt_token_ids) + r.max_tokens for r in self.engine.scheduler.waiting)

    def _over_token_budget(self, rid: str) -> bool:
        """The request just queued as `rid` pushes the waiting tokens over the budget (a
        request alone in the queue is always admitted: it could never run otherwise)."""
        budget, waiting = self.max_waiting_tokens, self.engine.scheduler.waiting
        if budget is None or len(waiting) <= 1 or waiting[-1].request_id != rid:
            return False
        return self._waiting_tokens() > budget

    def _queue_limits(self) -> str:
        limits = f"max_waiting={self.engine.config.max_waiting}"
        if self.max_waiting_tokens is not None:
            limits += f", max_waiting_tokens={self.max_waiting_tokens}"
        return limits

    def _apply_abort(self, cmd: _Abort, deliveries: list) -> None:
        rid = cmd.request_id
        stream = self._streams.get(rid)
        if cmd.stream is not None and stream is not cmd.stream:
            return  # that consumer's request already finished, or the id is someone else's
        request = self.engine.scheduler.requests.get(rid)
        self.engine.abort(rid)
        self._streams.pop(rid, None)
        if request is None:
            return
        self.metrics.requests_aborted.inc()
        if stream is not None and cmd.stream is None:  # aborted from outside: end the consumer
            deliveries.append((stream, _abort_output(rid, stream, request)))

    def _step_failed(self, error: Exception, deliveries: list) -> None:
        """Fail the requests of the step that raised. If it raised before it had scheduled any
        (the scheduler itself failed), fail them all: a step that keeps failing must not
        leave the others waiting forever."""
        self.metrics.step_failures.inc()
        failure = EngineStepError(
            f"the engine step failed and aborted this request: {type(error).__name__}: {error}"
        )
        requests = self.engine.scheduler.requests
        in_step = [rid for rid in self.engine.step_request_ids if rid in requests]
        self._fail_requests(in_step or list(requests), failure, deliveries)

    def _fail_requests(self, request_ids: list[str], error: Exception, deliveries: list) -> None:
        """Abort these requests (freeing their blocks); their consumers receive `error`."""
        for rid in list(request_ids):
            if rid not in self.engine.scheduler.requests:
                continue
            self.engine.abort(rid)
            self.metrics.requests_aborted.inc()
            stream = self._streams.pop(rid, None)
            if stream is not None:
                deliveries.append((stream, error))

    def _deliver(self, deliveries: list) -> None:
        for stream, item in deliveries:
            try:
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)
            except RuntimeError:  # the consumer's event loop is closed: nobody will read
                if isinstance(item, RequestOutput) and not item.finished:
                    self._inbox.append(_Abort(item.request_id, stream))

    def _fail_all(self, error: BaseException) -> None:
        with self._lock:
            streams = list(self._streams.values())
            self._streams.clear()
            try:  # free the KV blocks of whatever the dead loop held
                for rid in list(self.engine.scheduler.requests):
                    self.engine.abort(rid)
                self._update_gauges()
            except Exception:
                log.exception("could not free the requests of the stopped engine")
            while self._inbox:
                command = self._inbox.popleft()
                if isinstance(command, _Add):
                    streams.append(command.stream)
        dead = EngineDeadError(f"the engine is not running: {error}")
        self._deliver([(s, dead) for s in streams])

    def _record(self, outputs: list[RequestOutput]) -> None:
        m = self.metrics
        now = time.monotonic()
        for o in outputs:
            stream = self._streams.get(o.request_id)
            m.generation_tokens.inc(len(o.delta_token_ids))
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
        full = e.scheduler.num_waiting >= e.config.max_waiting
        if self.max_waiting_tokens is not None and not full:
            full = e.scheduler.num_waiting > 0 and self._waiting_tokens() >= self.max_waiting_tokens
        self._queue_full = full
        m.kv_usage.set(e.block_pool.usage)
        m.prefix_hit_rate.set(e.block_pool.prefix_hit_rate)
        _sync_counter(m.prompt_tokens, e.num_prompt_tokens)
        _sync_counter(m.prefix_queries, e.block_pool.prefix_queries)
        _sync_counter(m.prefix_hits, e.block_pool.prefix_hits)
        _sync_counter(m.preemptions, e.scheduler.num_preemptions)
        _sync_counter(m.spec_draft_tokens, e.num_spec_proposed)
        _sync_counter(m.spec_accepted_tokens, e.num_spec_accepted)
        _sync_counter(m.spec_propose_seconds, e.spec_propose_seconds)
        if e.speculating:
            spec = e.spec_stats()
            _sync_counter(m.spec_drafts, spec["drafts"])
            _sync_counter(m.spec_draft_seconds, spec["draft_s"])
            _sync_counter(m.spec_verify_seconds, spec["verify_s"])
            m.spec_acceptance_rate.set(spec["acceptance_rate"])
            m.spec_mean_accepted_length.set(spec["mean_accepted_length"])


def _abort_output(rid: str, stream: _Stream, request) -> RequestOutput:
    """The last output of a request aborted from outside: what it had produced, finished."""
    now = time.monotonic()
    if stream.last is not None:
        return dataclasses.replace(
            stream.last,
            delta_text="",
            delta_token_ids=[],
            finished=True,
            finish_reason="abort",
            finish_time=now,
        )
    return RequestOutput(
        request_id=rid,
        prompt_token_ids=list(request.prompt_token_ids),
        delta_text="",
        delta_token_ids=[],
        finished=True,
        finish_reason="abort",
        num_cached_tokens=request.num_cached_tokens,
        arrival_time=request.arrival_time,
        finish_time=now,
    )


def _sync_counter(counter, total: float) -> None:
    """Raise a prometheus counter to an engine-side running total."""
    delta = total - counter._value.get()
    if delta > 0:
        counter.inc(delta)
