"""Soak benchmark: N requests of mixed traffic against `miaotui serve` on loopback, then checks
that nothing leaked.

The mix (seeded): chat and completions, streaming and not, n of 1-3, stop strings, a few
prefix-sharing groups (shared 60-token openings), 10 % clients that disconnect after two
events, 5 % malformed requests (expect 400), 5 % over the context (expect 400). Every answer
is checked against what its kind must get; anything else is an unexpected error (listed by
kind with samples). /metrics and the server's RSS are sampled throughout; at the end every KV
block must be back in the pool, the running/waiting gauges 0, and RSS must have grown < 10 %
after warm-up (the first 10 % of requests). The server is then stopped with SIGTERM and must
exit 0.

The started server gets a 0.1 GiB KV pool (--kv-cache-gib): the pool is allocated untouched and
its pages join the RSS as blocks are first written (the prefix cache cycles through every
block), which is growth up to the pool's size but no leak; a small pool is all touched during
warm-up, so that what RSS does after it is the server's own.

    .venv/bin/python bench/bench_soak.py                         # 10 000 requests, default model
    .venv/bin/python bench/bench_soak.py --requests 500 --concurrency 32
    .venv/bin/python bench/bench_soak.py --url http://127.0.0.1:8000 --pid 1234   # running server

Prints JSON (counts by kind, p50/p99 TTFT and latency, RSS, KV usage, the end checks) and
writes a plot of RSS, KV-block usage and queue depth over time to bench/out/soak.png.
Not a test (tests/server/test_soak.py runs a few hundred requests on a tiny model).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))
from _soak_mix import Planned, plan  # noqa: E402  (bench/_soak_mix.py: the traffic)
from health import stop_process, wait_healthy  # noqa: E402  (bench/health.py, next to this file)

WARMUP_FRACTION = 0.10
RSS_GROWTH_LIMIT = 0.10
EXPECTED = ("ok", "disconnected", "malformed_400", "over_context_400", "shed_429")
REFUSED_DRAINING = "refused_503_draining"
"""A request that arrived after SIGTERM: not accepted, so not lost."""
GONE = "refused_after_exit"
"""Sent after SIGTERM and never answered: the server had exited, or was closing the connection."""


@dataclass
class Outcome:
    kind: str
    """One of EXPECTED, or "unexpected:<what>"."""
    latency: float
    ttft: float | None = None
    detail: str = ""
    sent_at: float = 0.0
    connection_lost: bool = False
    """No HTTP answer at all (refused, reset, closed before the response)."""


@dataclass
class Samples:
    """Server state over time: (seconds since start, value)."""

    rss_mb: list[tuple[float, float]] = field(default_factory=list)
    kv_usage: list[tuple[float, float]] = field(default_factory=list)
    running: list[tuple[float, float]] = field(default_factory=list)
    waiting: list[tuple[float, float]] = field(default_factory=list)
    done: list[tuple[float, int]] = field(default_factory=list)
    """Requests completed by then."""


# ---- one request -------------------------------------------------------------------------------


async def run_one(http: httpx.AsyncClient, url: str, p: Planned) -> Outcome:
    t0 = time.monotonic()
    outcome = await _send(http, url, p, t0)
    outcome.sent_at = t0
    return outcome


async def _send(http: httpx.AsyncClient, url: str, p: Planned, t0: float) -> Outcome:
    kw = {"content": p.body} if isinstance(p.body, str) else {"json": p.body}
    headers = {"Content-Type": "application/json"}
    try:
        if not p.stream:
            r = await http.post(url + p.path, headers=headers, **kw)
            return _judge_whole(p, r, time.monotonic() - t0)
        async with http.stream("POST", url + p.path, headers=headers, **kw) as r:
            if r.status_code != 200:
                await r.aread()
                return _judge_whole(p, r, time.monotonic() - t0)
            return await _read_stream(p, r, t0)
    except httpx.HTTPError as e:
        lost = isinstance(e, httpx.TransportError)
        kind, detail = f"unexpected:{type(e).__name__}", str(e)[:200]
        return Outcome(kind, time.monotonic() - t0, detail=detail, connection_lost=lost)


def _judge_whole(p: Planned, r: httpx.Response, latency: float) -> Outcome:
    want = {"malformed": 400, "over_context": 400}.get(p.kind, 200)
    if r.status_code == 429 and r.headers.get("retry-after"):
        return Outcome("shed_429", latency)
    if r.status_code == 503 and "shutting down" in r.text and r.headers.get("retry-after"):
        return Outcome(REFUSED_DRAINING, latency)
    if r.status_code != want:
        return Outcome(f"unexpected:http_{r.status_code}", latency, r.text[:200])
    if want == 400:
        kind = "malformed_400" if p.kind == "malformed" else "over_context_400"
        ok = r.json().get("error", {}).get("message")
        return Outcome(kind if ok else "unexpected:400_without_message", latency, r.text[:200])
    choices = r.json().get("choices", [])
    if sorted(c["index"] for c in choices) != list(range(p.n)):
        return Outcome("unexpected:choices", latency, r.text[:200])
    if any(c["finish_reason"] not in ("length", "stop") for c in choices):
        return Outcome("unexpected:finish_reason", latency, r.text[:200])
    return Outcome("ok", latency)


async def _read_stream(p: Planned, r: httpx.Response, t0: float) -> Outcome:
    ttft, events, finished = None, 0, set()
    async for line in r.aiter_lines():
        if not line.startswith("data: "):
            continue
        data = line[6:]
        if data == "[DONE]":
            break
        chunk = json.loads(data)
        if "error" in chunk:
            return Outcome("unexpected:stream_error", time.monotonic() - t0, data[:200])
        for c in chunk.get("choices", []):
            text = c.get("text") or (c.get("delta") or {}).get("content")
            if text and ttft is None:
                ttft = time.monotonic() - t0
            if c.get("finish_reason"):
                finished.add(c["index"])
        events += 1
        if p.kind == "disconnect" and events >= 2:
            return Outcome("disconnected", time.monotonic() - t0, ttft=ttft)
    latency = time.monotonic() - t0
    if p.kind == "disconnect":  # finished before we could leave: still fine
        return Outcome("disconnected", latency, ttft)
    if finished != set(range(p.n)):
        return Outcome("unexpected:unfinished_stream", latency, f"finished {sorted(finished)}")
    return Outcome("ok", latency, ttft)


# ---- the server's state ----------------------------------------------------------------------


async def read_metrics(http: httpx.AsyncClient, url: str) -> dict[str, float]:
    r = await http.get(url + "/metrics", timeout=10)
    out = {}
    for line in r.text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name.split("{")[0]] = float(value)
    return out


def rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


async def sample_state(url: str, pid: int | None, every_s: float, s: Samples, done, stop):
    async with httpx.AsyncClient(timeout=10) as http:
        t0 = time.monotonic()
        while not stop.is_set():
            now = time.monotonic() - t0
            try:
                m = await read_metrics(http, url)
                s.kv_usage.append((now, m["miaotui_kv_cache_usage_perc"]))
                s.running.append((now, m["miaotui_num_requests_running"]))
                s.waiting.append((now, m["miaotui_num_requests_waiting"]))
            except (httpx.HTTPError, KeyError):
                pass
            rss = rss_mb(pid)
            if rss is not None:
                s.rss_mb.append((now, rss))
            s.done.append((now, done()))
            try:
                await asyncio.wait_for(stop.wait(), every_s)
            except asyncio.TimeoutError:
                pass


async def wait_idle(url: str, timeout: float) -> dict[str, float]:
    """The metrics once nothing runs or waits and every KV block is free (or at the timeout)."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=10) as http:
        while True:
            m = await read_metrics(http, url)
            keys = ("miaotui_num_requests_running", "miaotui_num_requests_waiting")
            idle = all(m[k] == 0 for k in keys) and m["miaotui_kv_cache_usage_perc"] == 0
            if idle or time.monotonic() > deadline:
                return m
            await asyncio.sleep(0.1)


# ---- the run ---------------------------------------------------------------------------------


async def soak(
    url: str,
    num_requests: int,
    concurrency: int,
    seed: int,
    pid: int | None,
    sample_s: float,
    sigterm_after: int | None = None,
) -> tuple[dict, Samples]:
    """Run the mix against `url`; returns the summary and the state samples. With
    `sigterm_after`, the server (`pid`) gets SIGTERM once that many requests are answered:
    every request sent before must still get its normal answer, later ones a 503 (draining)
    or a refused connection (exited); the run ends when the server is gone."""
    async with httpx.AsyncClient(timeout=30) as http:
        card = (await http.get(url + "/v1/models")).json()["data"][0]
    requests = plan(num_requests, int(card.get("max_model_len", 2048)), seed)
    outcomes: list[Outcome] = []
    samples = Samples()
    stop = asyncio.Event()
    sampler = asyncio.create_task(
        sample_state(url, pid, sample_s, samples, lambda: len(outcomes), stop)
    )
    queue: asyncio.Queue = asyncio.Queue()
    for p in requests:
        queue.put_nowait(p)
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency)
    t0 = time.monotonic()
    signalled: list[float] = []
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:

        async def worker() -> None:
            while not queue.empty():
                if sigterm_after is not None and not signalled and len(outcomes) >= sigterm_after:
                    signalled.append(time.monotonic())
                    os.kill(pid, signal.SIGTERM)
                outcome = await run_one(http, url, queue.get_nowait())
                if signalled and outcome.sent_at >= signalled[0] and outcome.connection_lost:
                    # Refused, or an idle keep-alive connection closed as the server exits.
                    outcome.kind = GONE
                    outcomes.append(outcome)
                    return  # the server is gone: nothing more to send
                outcomes.append(outcome)
                if outcome.kind == REFUSED_DRAINING:
                    await asyncio.sleep(1.0)  # as its Retry-After says

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.monotonic() - t0
    end = None if signalled else await wait_idle(url, timeout=30)
    stop.set()
    await sampler
    result = summarize(outcomes, samples, end, wall, num_requests, concurrency)
    if signalled:
        before = [o for o in outcomes if o.sent_at < signalled[0]]
        result["sigterm_after"] = sigterm_after
        result["sent_before_sigterm"] = len(before)
        # One still on its way when the drain began is refused cleanly (503): not accepted.
        answered = (*EXPECTED, REFUSED_DRAINING)
        result["lost_before_sigterm"] = sum(o.kind not in answered for o in before)
        result["checks"]["no_accepted_request_lost"] = result["lost_before_sigterm"] == 0
        result["passed"] = all(result["checks"].values())
    return result, samples


def _pct(values: list[float], q: int) -> float | None:
    if len(values) < 2:
        return values[0] if values else None
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def summarize(
    outcomes: list[Outcome], samples: Samples, end: dict | None, wall: float, n: int, conc: int
) -> dict:
    """Counts, percentiles and the end checks (`end`: the idle server's metrics; None when it
    was stopped mid-run, and then only the answers are checked)."""
    kinds = Counter(o.kind for o in outcomes)
    expected = (*EXPECTED, REFUSED_DRAINING, GONE)
    unexpected = {k: v for k, v in kinds.items() if k not in expected}
    examples = {}
    for o in outcomes:
        if o.kind not in expected and o.kind not in examples:
            examples[o.kind] = o.detail
    ok = [o for o in outcomes if o.kind == "ok"]
    ttfts = [o.ttft for o in ok if o.ttft is not None]
    rss_growth = _rss_growth(samples, n)
    checks = {"zero_unexpected_errors": not unexpected}
    leaked_usage = None
    if end is not None:
        leaked_usage = end["miaotui_kv_cache_usage_perc"]
        checks["all_kv_blocks_back"] = leaked_usage == 0
        checks["gauges_zero"] = (
            end["miaotui_num_requests_running"] == 0 and end["miaotui_num_requests_waiting"] == 0
        )
        checks["rss_growth_under_10_percent"] = rss_growth is None or rss_growth < RSS_GROWTH_LIMIT
    end = end or {}
    return {
        "requests": n,
        "concurrency": conc,
        "wall_s": round(wall, 2),
        "requests_per_s": round(n / wall, 2) if wall else None,
        "by_kind": dict(sorted(kinds.items())),
        "unexpected": unexpected,
        "unexpected_examples": examples,
        "ttft_p50_s": _round(_pct(ttfts, 50)),
        "ttft_p99_s": _round(_pct(ttfts, 99)),
        "latency_p50_s": _round(_pct([o.latency for o in ok], 50)),
        "latency_p99_s": _round(_pct([o.latency for o in ok], 99)),
        "rss_mb_start": _round(samples.rss_mb[0][1]) if samples.rss_mb else None,
        "rss_mb_end": _round(samples.rss_mb[-1][1]) if samples.rss_mb else None,
        "rss_growth_after_warmup": _round(rss_growth),
        "kv_usage_peak": max((v for _, v in samples.kv_usage), default=None),
        "kv_usage_end": leaked_usage,
        "aborted_total": end.get("miaotui_request_aborted_total"),
        "rejected_total": end.get("miaotui_request_rejected_total"),
        "step_failures_total": end.get("miaotui_engine_step_failures_total"),
        "checks": checks,
        "passed": all(checks.values()),
    }


def _rss_growth(s: Samples, n: int) -> float | None:
    """RSS at the end over RSS once WARMUP_FRACTION of the requests were done, minus 1."""
    if not s.rss_mb:
        return None
    warm_t = next((t for t, d in s.done if d >= WARMUP_FRACTION * n), None)
    base = next((v for t, v in s.rss_mb if warm_t is not None and t >= warm_t), None)
    return None if base is None else s.rss_mb[-1][1] / base - 1


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def plot(samples: Samples, result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    if samples.rss_mb:
        top.plot(*zip(*samples.rss_mb), color="tab:red")
    top.set_ylabel("server RSS (MB)")
    top.set_title(
        f"soak: {result['requests']} requests at concurrency {result['concurrency']}, "
        f"unexpected errors {sum(result['unexpected'].values())}"
    )
    for series, label in ((samples.running, "running"), (samples.waiting, "waiting")):
        if series:
            bottom.plot(*zip(*series), label=label, linewidth=0.8)
    bottom.set_ylabel("requests")
    bottom.set_xlabel("seconds")
    bottom.legend(loc="upper left")
    if samples.kv_usage:
        kv = bottom.twinx()
        t, v = zip(*samples.kv_usage)
        kv.plot(t, [100 * x for x in v], color="tab:purple", label="KV blocks in use")
        kv.set_ylabel("KV blocks in use (%)", color="tab:purple")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


@contextmanager
def local_server(model: str | None, threads: int | None, max_model_len: int, extra: list[str]):
    """`miaotui serve` on a free loopback port; yields (url, process); SIGTERM at the end."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "miaotui.cli", "serve", "--port", str(port)]
    cmd += ["--max-model-len", str(max_model_len), *extra]
    if model:
        cmd += ["--model", model]
    if threads:
        cmd += ["--threads", str(threads)]
    log = Path(tempfile.mkdtemp(prefix="miaotui-soak-")) / "server.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc, log, timeout=300)
        yield url, proc, log
    finally:
        if proc.poll() is None:
            stop_process(proc, grace_s=60)


def run(a: argparse.Namespace) -> tuple[dict, Samples]:
    """The soak against --url, or against a server started here (then stopped with SIGTERM,
    which must exit 0)."""

    def go(url: str, pid: int | None) -> tuple[dict, Samples]:
        if a.sigterm_after is not None and pid is None:
            raise SystemExit("--sigterm-after needs the server's --pid")
        return asyncio.run(
            soak(url, a.requests, a.concurrency, a.seed, pid, a.sample_s, a.sigterm_after)
        )

    if a.url:
        return go(a.url.rstrip("/"), a.pid)
    extra = ["--max-waiting", str(a.max_waiting)] + (["--weights", a.weights] if a.weights else [])
    if a.kv_cache_gib:
        extra += ["--kv-cache-gib", str(a.kv_cache_gib)]
    extra += ["--shutdown-timeout", str(a.shutdown_timeout)]
    with local_server(a.model, a.threads, a.max_model_len, extra) as (url, proc, log):
        result, samples = go(url, proc.pid)
        if a.sigterm_after is not None:  # it was signalled: it must exit on its own
            try:
                proc.wait(timeout=a.shutdown_timeout + 30)
            except subprocess.TimeoutExpired:
                pass
        stop_process(proc, grace_s=60)
        result["server_exit_code"] = proc.returncode
        result["checks"]["server_exited_0_on_sigterm"] = proc.returncode == 0
        result["server_log_tracebacks"] = log.read_text().count("Traceback")
        result["checks"]["no_traceback_in_server_log"] = result["server_log_tracebacks"] == 0
        result["passed"] = all(result["checks"].values())
    return result, samples


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=10_000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--url", default=None, help="a running server (default: start one)")
    p.add_argument("--pid", type=int, default=None, help="its process id, for RSS (with --url)")
    p.add_argument("--model", default=None, help="model of the started server (default model)")
    p.add_argument("--weights", default=None, help="--weights of the started server")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--max-waiting", type=int, default=256)
    p.add_argument(
        "--kv-cache-gib",
        type=float,
        default=0.1,
        help="KV pool of the started server (small: warm-up touches all of it)",
    )
    p.add_argument(
        "--sigterm-after",
        type=int,
        default=None,
        help="SIGTERM the server once this many requests are answered (drain check)",
    )
    p.add_argument("--shutdown-timeout", type=float, default=30.0, help="of the started server")
    p.add_argument("--sample-s", type=float, default=1.0, help="metrics/RSS sampling period")
    p.add_argument("--plot", type=Path, default=BENCH_DIR / "out" / "soak.png")
    a = p.parse_args()
    result, samples = run(a)
    plot(samples, result, a.plot)
    result["plot"] = str(a.plot)
    print(json.dumps(result, indent=1))
    sys.exit(0 if result["passed"] else 1)


if __name__ == "__main__":
    main()
