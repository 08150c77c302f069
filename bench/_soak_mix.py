"""The soak's traffic (bench/bench_soak.py): a seeded list of requests in the issue's mix.

Chat and completions, streaming and not, n of 1-3, stop strings, prefix-sharing groups (shared
60-token openings), 10 % clients that disconnect after two events, 5 % malformed requests,
5 % over the context."""

from __future__ import annotations

import random
from dataclasses import dataclass

WORDS = (
    "the a of river city light machine garden winter letter music window story small quiet "
    "bright old new green under over near far early late because while every other"
).split()
SHARED_PREFIXES = 4
DISCONNECT, MALFORMED, OVER_CONTEXT = 0.10, 0.05, 0.05


@dataclass(frozen=True)
class Planned:
    """One request of the mix."""

    kind: str
    """"ok" (a valid request), "disconnect", "malformed" or "over_context"."""
    path: str
    body: dict | str
    stream: bool
    n: int = 1


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def plan(num_requests: int, max_model_len: int, seed: int) -> list[Planned]:
    rng = random.Random(seed)
    prefixes = [f"[group {g}] " + _words(rng, 60) for g in range(SHARED_PREFIXES)]
    return [_one(rng, prefixes, max_model_len) for _ in range(num_requests)]


def _one(rng: random.Random, prefixes: list[str], max_model_len: int) -> Planned:
    chat = rng.random() < 0.5
    path = "/v1/chat/completions" if chat else "/v1/completions"
    roll = rng.random()
    if roll < MALFORMED:
        return Planned("malformed", path, _malformed(rng, chat), stream=False)
    text = (rng.choice(prefixes) + " " if rng.random() < 0.3 else "") + _words(rng, 8)
    if roll < MALFORMED + OVER_CONTEXT:
        text = _words(rng, max_model_len + 16)  # more tokens than the context holds
    body: dict = {"max_tokens": rng.randint(4, 32), "temperature": rng.choice([0.0, 0.8])}
    body["seed"] = rng.randint(0, 1 << 30)
    if chat:
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = text
    n = rng.choice([1, 1, 1, 2, 3])
    body["n"] = n
    if rng.random() < 0.2:
        body["stop"] = rng.choice([["\n"], [".", "!"], " the"])
    disconnect = MALFORMED + OVER_CONTEXT <= roll < MALFORMED + OVER_CONTEXT + DISCONNECT
    stream = disconnect or rng.random() < 0.5
    body["stream"] = stream
    if disconnect:
        body["max_tokens"] = 64  # long enough to be cut
        body["ignore_eos"] = True
    kind = "over_context" if roll < MALFORMED + OVER_CONTEXT else "ok"
    return Planned("disconnect" if disconnect else kind, path, body, stream, n)


def _malformed(rng: random.Random, chat: bool) -> dict | str:
    base: dict = {"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "hi"}
    return rng.choice(
        [
            '{"prompt": "unterminated',
            {**base, "max_tokens": -3},
            {**base, "temperature": "hot"},
            {**base, "n": 0},
            {"max_tokens": 4},  # no prompt / messages
            {**base, "top_p": 7},
        ]
    )
