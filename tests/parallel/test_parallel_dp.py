"""Data parallelism: two engine replicas on a local Ray instance behind one OpenAI endpoint.
Concurrent requests all succeed with the outputs of a single engine; killing a replica under
load neither loses nor hangs the other replica's requests, and the dead one is replaced."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict

import httpx
import pytest

from miaotui.config import CacheConfig, EngineConfig
from miaotui.llm import LLM
from miaotui.loader import build_engine
from miaotui.sampling_params import SamplingParams
from miaotui.server.openai import ServerConfig, create_app
from tests.helpers import hf_model, write_gguf

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

PROMPTS = [f"{i} is the number of the quick brown fox" for i in range(8)]


@pytest.fixture(scope="module")
def tiny_cfg(tmp_path_factory) -> EngineConfig:
    path = tmp_path_factory.mktemp("dp") / "tiny.gguf"
    write_gguf(hf_model("llama", num_hidden_layers=2), "llama", path, tokenizer="bytes")
    return EngineConfig.from_kwargs(
        model=str(path),
        threads=1,
        max_model_len=200,
        cache=CacheConfig(num_blocks=128, block_size=4),
    )


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1")
    yield
    ray.shutdown()


async def _complete(client: httpx.AsyncClient, prompt: str, max_tokens: int) -> httpx.Response:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    return await client.post("/v1/completions", json=body, timeout=120)


def test_replicas_behind_one_endpoint(tiny_cfg, local_ray):
    from miaotui.parallel.dp import ReplicaRouter

    expect = LLM.from_engine(build_engine(tiny_cfg)).generate(
        PROMPTS, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    )
    router = ReplicaRouter(tiny_cfg, 2, "tiny", replica_cpus=1, output_timeout_s=60)
    app = create_app(router, ServerConfig(model_name="tiny"))
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)

    async def run_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=transport, base_url="http://dp") as client:
            return await asyncio.gather(*[_complete(client, p, 12) for p in PROMPTS])

    try:
        responses = asyncio.run(run_all())
        texts = [r.json()["choices"][0]["text"] for r in responses]
        assert all(r.status_code == 200 for r in responses)
        assert texts == [e.text for e in expect]
        # Both replicas took requests (least-loaded routing), the same prefix goes back to one.
        assert all(r.inflight == 0 for r in router.replicas)
        assert all(r.served > 0 for r in router.replicas)

        # Kill replica 0 while both are busy: replica 1's requests finish, replica 0's fail
        # cleanly (or are retried), nothing hangs; replica 0 comes back.
        async def kill_under_load() -> tuple[list, float]:
            async with httpx.AsyncClient(transport=transport, base_url="http://dp") as client:
                tasks = [asyncio.create_task(_complete(client, p, 60)) for p in PROMPTS]
                while sum(r.inflight for r in router.replicas) < len(PROMPTS):
                    await asyncio.sleep(0.01)
                owners = {rid: rep.index for rid, rep in router._owner.items()}
                await asyncio.sleep(0.3)
                ray.kill(router.replicas[0].actor)
                t0 = time.monotonic()
                done = await asyncio.wait_for(asyncio.gather(*tasks), 120)
                return done, time.monotonic() - t0, owners

        done, elapsed, owners = asyncio.run(kill_under_load())
        ok = [r for r in done if r.status_code == 200]
        failed = [r for r in done if r.status_code != 200]
        on_survivor = sum(1 for i in owners.values() if i == 1)
        assert len(ok) >= on_survivor  # nothing on the surviving replica was lost
        assert all(r.status_code >= 500 for r in failed)
        assert len(ok) + len(failed) == len(PROMPTS)
        assert elapsed < 90

        deadline = time.monotonic() + 200  # a new actor process loads the model
        while router.num_restarts < 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert router.num_restarts == 1 and all(r.healthy for r in router.replicas)

        after = asyncio.run(run_all())
        assert [r.json()["choices"][0]["text"] for r in after] == [e.text for e in expect]
    finally:
        router.shutdown()


def test_routing_prefers_the_replica_caching_the_prefix():
    from miaotui.parallel.dp import ReplicaRouter, RouterMetrics, _Replica, prefix_hashes

    router = ReplicaRouter.__new__(ReplicaRouter)  # routing only: no Ray, no model
    router.replicas = [_Replica(0, None, healthy=True), _Replica(1, None, healthy=True)]
    router._prefix, router.prefix_slack, router.metrics = OrderedDict(), 2, RouterMetrics("t")
    system = list(range(100, 116))  # a shared 16-token system prompt: 4 blocks of 4

    def pick(ids: list[int]) -> int:
        rep = router._pick(prefix_hashes(ids, 4), set())
        rep.inflight += 1
        return rep.index

    assert pick(system + [1, 2]) == 0
    assert pick(system + [3, 4, 5]) == 0  # same prefix: its replica, though replica 1 is idle
    assert pick(list(range(50, 70))) == 1  # unrelated prompt: the least loaded
    router.replicas[0].inflight = 10
    assert pick(system + [6]) == 1  # beyond the slack, load wins
    router.replicas[1].healthy = False
    assert pick(list(range(30, 40))) == 0  # a dead replica gets nothing
