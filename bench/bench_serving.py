"""Serving benchmark: N concurrent clients against an OpenAI-compatible /v1/completions endpoint.

Each request is a distinct 128-token window of real English text (sent as token ids, so every
server sees the same tokens), asks for 128 new tokens with ignore_eos and greedy decoding, and
streams (SSE) so that time to first token and inter-token latency are measured at the client.
Prints JSON: total output tok/s (completion tokens / wall time from the first request to the
last token), p50/p90 request latency, mean TTFT, mean ITL, for our server and, in the same
command, for `llama-server --parallel N` on the same GGUF when bench/setup_peers.sh built it.

    .venv/bin/python bench/bench_serving.py                      # ours + llama-server if built
    .venv/bin/python bench/bench_serving.py --clients 16 --requests 32 --threads 2
    .venv/bin/python bench/bench_serving.py --url http://127.0.0.1:8000   # a running server

Not a test: never collected by pytest.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))
from health import stop_process, wait_healthy  # noqa: E402  (bench/health.py, next to this file)

try:  # bench/peers.py: llama.cpp peers built by bench/setup_peers.sh (optional)
    import peers
except ImportError:  # pragma: no cover - the peer is optional
    peers = None

FALLBACK_TEXT = (
    "The history of computing is a story of machines that became smaller, faster and cheaper "
    "with every decade. Early computers filled rooms; their programs were entered with switches "
    "and punched cards. The transistor and then the integrated circuit changed everything. "
)


def log(msg: str) -> None:
    print(f"[bench_serving] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- prompts -----------------------------------------------------------------------------------


def prompt_windows(gguf: str | None, n_prompt: int, count: int) -> list[list[int]]:
    """`count` distinct windows of exactly n_prompt token ids of English text (our tokenizer,
    which is the GGUF's vocabulary, so llama-server reads the same tokens)."""
    from miaotui.load.open import load_tokenizer, open_checkpoint

    tok = load_tokenizer(open_checkpoint(gguf))
    text_file = peers.default_text_file() if peers else None
    text = text_file.read_text(encoding="utf-8")[:400_000] if text_file else FALLBACK_TEXT * 400
    ids = tok.encode(text, add_special=False)
    while len(ids) < n_prompt * count:
        ids = ids + ids
    return [ids[i * n_prompt : (i + 1) * n_prompt] for i in range(count)]


# ---- the load ----------------------------------------------------------------------------------


async def one_request(http: httpx.AsyncClient, url: str, prompt: list[int], n_gen: int) -> dict:
    body = {
        "prompt": prompt,
        "max_tokens": n_gen,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    arrivals: list[float] = []
    usage = None
    async with http.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if chunk.get("usage"):
                usage = chunk["usage"]
            if any(c.get("text") for c in chunk.get("choices") or ()):
                arrivals.append(time.perf_counter())
    end = time.perf_counter()
    if not arrivals:
        raise RuntimeError("the stream carried no text")
    tokens = usage["completion_tokens"] if usage else len(arrivals)
    return {
        "latency": end - t0,
        "ttft": arrivals[0] - t0,
        "itl": (arrivals[-1] - arrivals[0]) / max(1, len(arrivals) - 1),
        "tokens": tokens,
        "end": end,
        "start": t0,
    }


async def run_load(url: str, prompts: list[list[int]], clients: int, n_gen: int) -> dict:
    """`clients` workers drain the list of prompts, one streaming request at a time each."""
    queue: asyncio.Queue = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    results: list[dict] = []
    errors: list[str] = []

    async def worker(http: httpx.AsyncClient) -> None:
        while not queue.empty():
            prompt = queue.get_nowait()
            try:
                results.append(await one_request(http, url, prompt, n_gen))
            except Exception as e:  # reported, not raised: one failure must not hide the rest
                errors.append(f"{type(e).__name__}: {e}")

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=httpx.Timeout(1800.0), limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(http) for _ in range(clients)))
        wall = time.perf_counter() - t0
    return summarize(results, errors, wall, clients, len(prompts[0]), n_gen)


def summarize(results: list[dict], errors: list[str], wall: float, clients, n_prompt, n_gen):
    lat = sorted(r["latency"] for r in results)
    tokens = sum(r["tokens"] for r in results)

    def pct(q: float) -> float | None:
        return round(lat[min(len(lat) - 1, int(q * len(lat)))], 3) if lat else None

    return {
        "clients": clients,
        "requests": len(results) + len(errors),
        "ok": len(results),
        "errors": errors[:3],
        "n_prompt": n_prompt,
        "n_gen": n_gen,
        "completion_tokens": tokens,
        "seconds": round(wall, 2),
        "output_tok_s": round(tokens / wall, 2) if wall > 0 else None,
        "latency_p50_s": pct(0.5),
        "latency_p90_s": pct(0.9),
        "ttft_mean_s": round(statistics.mean(r["ttft"] for r in results), 3) if results else None,
        "itl_mean_ms": round(1000 * statistics.mean(r["itl"] for r in results), 2)
        if results
        else None,
    }


def bench_url(url: str, prompts, clients: int, n_gen: int) -> dict:
    warm = [list(reversed(prompts[0]))]  # shares no prefix with the measured prompts
    asyncio.run(run_load(url, warm, 1, 4))  # warm-up: kernels, allocator, connections
    return asyncio.run(run_load(url, prompts, clients, n_gen))


# ---- servers -----------------------------------------------------------------------------------


@contextmanager
def our_server(a: argparse.Namespace):
    """`miaotui serve` in a subprocess on a free port; yields its base URL."""
    port = free_port()
    cmd = [sys.executable, "-m", "miaotui.cli", "serve", "--port", str(port)]
    cmd += ["--threads", str(a.threads), "--max-num-seqs", str(a.clients)]
    cmd += ["--max-model-len", str(a.n_prompt + a.n_gen + 64)]
    cmd += ["--model", a.model] if a.model else []
    cmd += a.server_args
    log_path = Path(tempfile.mkdtemp(prefix="miaotui-bench-")) / "server.log"
    with open(log_path, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log_path, timeout=600)
        yield url
    finally:
        stop_process(proc)


def bench_peer(a: argparse.Namespace, prompts) -> dict:
    if peers is None:
        return {"skipped": "bench/peers.py is missing"}
    reason = peers.peer_unavailable_reason("llama-server")
    if reason:
        return {"skipped": reason}
    log(f"llama-server --parallel {a.clients} --threads {a.threads}")
    with peers.start_llama_server(a.model, parallel=a.clients, threads=a.threads) as url:
        return {
            "parallel": a.clients,
            "threads": a.threads,
            **bench_url(url, prompts, a.clients, a.n_gen),
        }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, default=16, help="concurrent clients")
    p.add_argument("--requests", type=int, default=None, help="total requests (default: clients)")
    p.add_argument("--n-prompt", type=int, default=128)
    p.add_argument("--n-gen", type=int, default=128)
    p.add_argument("--threads", type=int, default=2, help="threads of both servers")
    p.add_argument("--model", default=None, help="GGUF path (default: the SmolLM2-135M one)")
    p.add_argument("--url", default=None, help="bench this running server instead of ours")
    p.add_argument("--no-peer", action="store_true", help="skip llama-server")
    p.add_argument("--no-ours", action="store_true", help="skip our server")
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("server_args", nargs="*", help="extra `miaotui serve` flags (after --)")
    a = p.parse_args(argv)
    if a.model is None and peers is not None:
        a.model = str(peers.default_model_path())
    prompts = prompt_windows(a.model, a.n_prompt, a.requests or a.clients)
    out: dict = {"model": a.model, "clients": a.clients, "threads": a.threads}
    if a.url:
        log(f"{a.url}: {len(prompts)} requests, {a.clients} clients")
        out["target"] = bench_url(a.url, prompts, a.clients, a.n_gen)
    elif not a.no_ours:
        with our_server(a) as url:
            log(
                f"miaotui serve --threads {a.threads}: {len(prompts)} requests, {a.clients} clients"
            )
            out["miaotui"] = bench_url(url, prompts, a.clients, a.n_gen)
        log(json.dumps(out["miaotui"]))
    if not a.no_peer and not a.url:
        out["llama_server"] = bench_peer(a, prompts)
        log(json.dumps(out["llama_server"]))
    ours, peer = out.get("miaotui", {}), out.get("llama_server", {})
    if ours.get("output_tok_s") and peer.get("output_tok_s"):
        out["ratio_vs_llama_server"] = {
            "output_tok_s": round(ours["output_tok_s"] / peer["output_tok_s"], 3),
            "latency_p50": round(ours["latency_p50_s"] / peer["latency_p50_s"], 3),
            "ttft_mean": round(ours["ttft_mean_s"] / peer["ttft_mean_s"], 3),
            "itl_mean": round(ours["itl_mean_ms"] / peer["itl_mean_ms"], 3),
        }
    text = json.dumps(out, indent=2)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
