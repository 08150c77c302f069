"""A short soak (bench/bench_soak.py's mix, a few hundred requests) against a real
`miaotui serve` on the tiny chat model with a small KV pool: every answer is what its kind must
get (no unexpected error), every KV block comes back, the gauges return to 0, RSS stays flat,
and SIGTERM at the end exits 0. Then the same mix with a SIGTERM in the middle: no request sent
before it is lost, the later ones are refused (503 while draining, then no listener)."""

from __future__ import annotations

import argparse

import pytest

from bench import bench_soak

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

REQUESTS = 120


def soak_args(model, **overrides) -> argparse.Namespace:
    """bench_soak's command line, on the tiny model with a ~260-block KV pool (the mix fills a
    good part of it)."""
    args = dict(
        requests=REQUESTS,
        concurrency=24,
        seed=1,
        url=None,
        pid=None,
        model=str(model),
        weights="float",
        threads=1,
        max_model_len=256,
        max_waiting=256,
        kv_cache_gib=0.003,
        sample_s=0.5,
        sigterm_after=None,
        shutdown_timeout=30.0,
    )
    return argparse.Namespace(**(args | overrides))


def test_short_soak_loses_nothing(tiny_chat_gguf, tmp_path):
    result, samples = bench_soak.run(soak_args(tiny_chat_gguf))
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


def test_sigterm_mid_soak_loses_no_accepted_request(tiny_chat_gguf):
    result, _ = bench_soak.run(soak_args(tiny_chat_gguf, requests=80, seed=2, sigterm_after=30))
    assert result["unexpected"] == {}, result["unexpected_examples"]
    assert result["sent_before_sigterm"] >= 30
    assert result["lost_before_sigterm"] == 0
    assert result["checks"]["server_exited_0_on_sigterm"], result
    assert result["checks"]["no_traceback_in_server_log"], result
    kinds = result["by_kind"]
    refused = kinds.get("refused_503_draining", 0) + kinds.get("refused_after_exit", 0)
    assert refused > 0, kinds  # requests did come after the signal, and were refused
    answered = sum(v for k, v in kinds.items() if not k.startswith("refused"))
    assert answered >= 30, kinds  # at least those answered before the signal
