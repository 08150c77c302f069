"""Wait for an HTTP server started as a subprocess to answer `GET /health` with 200: the one helper
used by bench/peers.py (llama-server), bench/bench_serving.py and tests/server (miaotui serve).

Only the standard library is imported, so that it works from any python."""

from __future__ import annotations

import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path


def wait_healthy(
    url: str, proc: subprocess.Popen, log: Path, timeout: float, poll_s: float = 0.1
) -> None:
    """Poll `url + "/health"` until it returns 200. Raises RuntimeError with the tail of `log`
    (the server's output) if `proc` exits first or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode} ({log}):\n{_tail(log)}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"server not healthy after {timeout} s ({log}):\n{_tail(log)}")
        time.sleep(poll_s)


def _tail(log: Path, n: int = 3000) -> str:
    try:
        return log.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def stop_process(proc: subprocess.Popen, grace_s: float = 15) -> None:
    """SIGTERM, then SIGKILL if the server has not exited within `grace_s` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
