"""A short soak (bench/bench_soak.py's mix, a few hundred requests) against a real
`miaotui serve` on the tiny chat model with a small KV pool: every answer is what its kind must
get (no unexpected error), every KV block comes back, the gauges return to 0, RSS stays flat,
and SIGTERM at the end exits 0."""

from __future__ import annotations

import argparse

import pytest

from bench import bench_soak

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

REQUESTS = 200


def test_short_soak_loses_nothing(tiny_chat_gguf, tmp_path):
    args = argparse.Namespace(
        requests=REQUESTS,
        concurrency=24,
        seed=1,
        url=None,
        pid=None,
        model=str(tiny_chat_gguf),
        weights="float",
        threads=1,
        max_model_len=256,
        max_waiting=256,
        kv_cache_gib=0.003,  # ~260 blocks: the mix fills a good part of the pool
        sample_s=0.5,
    )
    result, samples = bench_soak.run(args)
    assert result["unexpected"] == {}, result["unexpected_examples"]
    assert result["checks"] == {
        "zero_unexpected_errors": True,
        "all_kv_blocks_back": True,
        "gauges_zero": True,
        "rss_growth_under_10_percent": True,
        "server_exited_0_on_sigterm": True,
        "no_traceback_in_server_log": True,
    }, result
    kinds = result["by_kind"]
    assert sum(kinds.values()) == REQUESTS
    for kind in ("ok", "disconnected", "malformed_400", "over_context_400"):
        assert kinds.get(kind, 0) > 0, kinds  # the mix really had each kind
    assert result["aborted_total"] >= kinds["disconnected"] - 5  # (a few finish first)
    assert result["kv_usage_peak"] > 0.05  # the pool was really used ...
    assert result["kv_usage_end"] == 0  # ... and every block came back
    assert result["ttft_p50_s"] <= result["ttft_p99_s"]
    bench_soak.plot(samples, result, tmp_path / "soak.png")
    assert (tmp_path / "soak.png").stat().st_size > 10_000
