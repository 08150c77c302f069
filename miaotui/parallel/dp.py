"""Data parallelism on Ray: N engine replicas (Ray actors, each an AsyncEngine in its own process,
on one machine or a cluster) behind one OpenAI endpoint.

    HTTP -> ReplicaRouter.generate -> pick a replica -> EngineReplica.generate (Ray streaming
         generator) -> RequestOutputs stream back one by one

Routing: the least-loaded live replica (fewest requests in flight), except that a request whose
prompt starts with blocks another request already sent to a replica goes to that replica (its
prefix cache holds them) unless it is more than `prefix_slack` requests busier than the least
loaded. A replica that dies is replaced by a fresh actor; its requests that produced nothing yet
are retried on another replica, the others fail with ReplicaDiedError (tokens already streamed
cannot be taken back). Every wait has a timeout: nothing hangs on a dead or stuck replica.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from miaotui.config import EngineConfig
from miaotui.engine.engine import RequestOutput
from miaotui.engine.metrics import EngineMetrics
from miaotui.errors import CapacityError, DistributedError, MiaotuiError
from miaotui.sampling_params import SamplingParams

log = logging.getLogger(__name__)
PREFIX_BLOCKS = 4  # prompt blocks hashed for routing: enough to tell system prompts apart
PREFIX_TABLE_SIZE = 65536


class ReplicaDiedError(DistributedError):
    """The replica serving a request died after it had streamed tokens."""


def start_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to a Ray cluster, or start a local one on loopback without the dashboard."""
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1")


class EngineReplica:
    """One engine in a Ray actor. Methods are async: they run on the actor's event loop, the
    engine steps in its own thread (AsyncEngine)."""

    def __init__(self, cfg: EngineConfig, model_name: str, index: int):
        from miaotui.engine.async_engine import AsyncEngine
        from miaotui.loader import build_engine

        self.index = index
        self.engine = AsyncEngine(build_engine(cfg), model_name)

    async def ready(self) -> int:
        """The actor's pid, once the model is loaded."""
        return os.getpid()

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        async for out in self.engine.generate(prompt_ids, params, request_id):
            yield out

    async def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)


@dataclass
class _Replica:
    index: int
    actor: Any
    inflight: int = 0
    healthy: bool = False
    restarts: int = 0
    served: int = 0


class RouterMetrics:
    """The router's view for /metrics: request latencies (as an engine reports them) plus
    per-replica load, restarts and prefix-routing hits."""

    def __init__(self, model_name: str):
        self.engine = EngineMetrics(model_name)
        self.registry = CollectorRegistry()
        r = self.registry
        self.inflight = Gauge(
            "miaotui_dp_replica_inflight", "Requests in flight", ["replica"], registry=r
        )
        self.restarts = Counter(
            "miaotui_dp_replica_restarts", "Replica restarts", ["replica"], registry=r
        )
        self.prefix_routed = Counter(
            "miaotui_dp_prefix_routed", "Requests routed by prompt prefix", registry=r
        )
        self.retried = Counter(
            "miaotui_dp_retried", "Requests retried after a replica died", registry=r
        )

    def render(self) -> bytes:
        return self.engine.render() + generate_latest(self.registry)


def prefix_hashes(ids: list[int], block_size: int, max_blocks: int = PREFIX_BLOCKS) -> list[int]:
    """Chained hashes of the prompt's first full blocks (as the block pool keys its cache)."""
    out, h = [], 0
    for b in range(min(max_blocks, len(ids) // block_size)):
        h = hash((h, tuple(ids[b * block_size : (b + 1) * block_size])))
        out.append(h)
    return out


class ReplicaRouter:
    """The engine face `server.openai.create_app` serves: generate / abort / tokenizer /
    max_model_len / metrics / error, spread over `num_replicas` Ray actors."""

    def __init__(
        self,
        cfg: EngineConfig,
        num_replicas: int,
        model_name: str = "default",
        replica_cpus: float = 1.0,
        prefix_slack: int = 4,
        output_timeout_s: float = 300.0,
        start_timeout_s: float = 600.0,
    ):
        import ray

        from miaotui.load.open import load_tokenizer, open_checkpoint

        ckpt = open_checkpoint(cfg.model)
        self.tokenizer = load_tokenizer(ckpt)
        limit = ckpt.config.max_seq_len
        self.max_model_len = cfg.scheduler.for_model(limit).max_model_len
        self.cfg, self.model_name = cfg, model_name
        self.block_size = cfg.cache.block_size
        self.prefix_slack, self.output_timeout_s = prefix_slack, output_timeout_s
        self.start_timeout_s = start_timeout_s
        self.metrics = RouterMetrics(model_name)
        self.error: BaseException | None = None
        self._actor_cls = ray.remote(num_cpus=replica_cpus, max_restarts=0)(EngineReplica)
        self._prefix: OrderedDict[int, int] = OrderedDict()
        self._owner: dict[str, _Replica] = {}
        self._closed = False
        self.replicas = [_Replica(i, self._new_actor(i)) for i in range(num_replicas)]
        try:
            ray.get([r.actor.ready.remote() for r in self.replicas], timeout=start_timeout_s)
        except Exception as e:
            self.shutdown()
            raise DistributedError(f"engine replicas failed to start: {e}") from e
        for r in self.replicas:
            r.healthy = True

    def _new_actor(self, index: int):
        return self._actor_cls.remote(self.cfg, self.model_name, index)

    # ---- the engine face ---------------------------------------------------------------------

    async def generate(
        self, prompt: str | list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        hashes = prefix_hashes(ids, self.block_size)
        tried: set[int] = set()
        while True:
            rep = self._pick(hashes, tried)
            emitted = 0
            stream = self._stream(rep, ids, params, request_id)
            try:
                async for out in stream:
                    emitted += 1
                    yield out
                return
            except _ReplicaLost as e:
                if emitted:
                    raise ReplicaDiedError(
                        f"replica {rep.index} died while serving request {request_id} after "
                        f"{emitted} outputs; it is being restarted, retry the request"
                    ) from e.__cause__
                tried.add(rep.index)
                self.metrics.retried.inc()
                log.warning("replica %d lost; retrying %s elsewhere", rep.index, request_id)
            finally:
                await stream.aclose()  # a client that went away aborts the request now

    def abort(self, request_id: str) -> None:
        rep = self._owner.get(request_id)
        if rep is not None:
            rep.actor.abort.remote(request_id)

    def shutdown(self) -> None:
        import ray

        self._closed = True
        for r in getattr(self, "replicas", []):
            try:
                ray.kill(r.actor, no_restart=True)
            except Exception:  # already gone
                pass

    @property
    def num_restarts(self) -> int:
        return sum(r.restarts for r in self.replicas)

    # ---- routing -----------------------------------------------------------------------------

    def _pick(self, hashes: list[int], exclude: set[int]) -> _Replica:
        live = [r for r in self.replicas if r.healthy and r.index not in exclude]
        if not live:
            live = [r for r in self.replicas if r.index not in exclude] or self.replicas
            if not any(r.healthy for r in live):
                raise CapacityError(
                    f"no live engine replica ({len(self.replicas)} configured, restarting); "
                    "retry shortly"
                )
        least = min(live, key=lambda r: r.inflight)
        for h in reversed(hashes):  # longest cached prefix first
            idx = self._prefix.get(h)
            if idx is None:
                continue
            rep = self.replicas[idx]
            if rep in live and rep.inflight <= least.inflight + self.prefix_slack:
                self.metrics.prefix_routed.inc()
                least = rep
            break
        for h in hashes:
            self._prefix[h] = least.index
            self._prefix.move_to_end(h)
        while len(self._prefix) > PREFIX_TABLE_SIZE:
            self._prefix.popitem(last=False)
        return least

    async def _stream(
        self, rep: _Replica, ids: list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """One attempt on one replica; _ReplicaLost if the replica died or went silent."""
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        actor = rep.actor
        rep.inflight += 1
        rep.served += 1
        self._owner[request_id] = rep
        self.metrics.inflight.labels(str(rep.index)).set(rep.inflight)
        m = self.metrics.engine
        m.running.inc()
        gen = actor.generate.options(num_returns="streaming").remote(ids, params, request_id)
        loop = asyncio.get_running_loop()
        t0 = last = loop.time()
        finished = False
        try:
            while True:
                try:
                    ref = await asyncio.wait_for(gen.__anext__(), self.output_timeout_s)
                    out = await asyncio.wait_for(ref, self.output_timeout_s)
                except StopAsyncIteration:
                    return
                except RayTaskError as e:  # the engine raised: hand its own error on
                    cause = getattr(e, "cause", None)
                    if isinstance(cause, MiaotuiError):
                        raise cause from None
                    raise
                except (RayActorError, asyncio.TimeoutError) as e:
                    self._replica_lost(rep, actor, e)
                    raise _ReplicaLost() from e
                now = loop.time()
                n = len(out.delta_token_ids)
                m.generation_tokens.inc(n)
                (m.ttft if last == t0 else m.itl).observe(now - last)
                last = now
                if out.finished:
                    finished = True
                    m.e2e.observe(now - t0)
                    m.requests_finished.inc()
                yield out
                if finished:
                    return
        finally:
            rep.inflight -= 1
            self._owner.pop(request_id, None)
            self.metrics.inflight.labels(str(rep.index)).set(rep.inflight)
            m.running.dec()
            if not finished and rep.actor is actor and rep.healthy:
                actor.abort.remote(request_id)  # the client went away: free the KV blocks
                try:
                    ray.cancel(gen)
                except Exception:  # already finished
                    pass

    # ---- failure handling --------------------------------------------------------------------

    def _replica_lost(self, rep: _Replica, actor, err: BaseException) -> None:
        """First report of a dead replica: replace its actor (in a thread, so the restart
        outlives the event loop of the request that noticed)."""
        if rep.actor is not actor or not rep.healthy:
            return  # already being replaced
        log.error("engine replica %d lost: %s", rep.index, err)
        rep.healthy = False
        threading.Thread(target=self._restart, args=(rep, actor), daemon=True).start()

    def _restart(self, rep: _Replica, old) -> None:
        import ray

        try:
            ray.kill(old, no_restart=True)
        except Exception:  # already dead
            pass
        while not self._closed:
            actor = self._new_actor(rep.index)
            try:
                ray.get(actor.ready.remote(), timeout=self.start_timeout_s)
            except Exception as e:
                log.error("replica %d failed to restart: %s; trying again", rep.index, e)
                try:
                    ray.kill(actor, no_restart=True)
                except Exception:
                    pass
                time.sleep(1.0)
                continue
            rep.actor, rep.healthy = actor, True
            rep.restarts += 1
            self.metrics.restarts.labels(str(rep.index)).inc()
            log.info("engine replica %d restarted", rep.index)
            return


class _ReplicaLost(Exception):
    """Internal: the replica of one attempt died or stopped answering."""
