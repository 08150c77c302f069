"""Model proposers for speculative decoding: a second, smaller model (`draft:MODEL`) or the
served model's own first N layers (`layerskip:N`), proposing greedily over the target's blocks.

The draft addresses its KV through the target's block tables and slot mapping: a separate draft
model gets a KV cache with the target's block count and size (its own layers, heads and dtype),
so one allocator serves both; a layer-skip draft writes the target's own cache, whose layers
< N hold exactly what the draft would compute (the native step is batch-invariant; with the
per-module model the target rewrites those slots in the same step anyway).

Each step, after the scheduler has reserved slots for the proposals (`num_spec` placeholder
tokens), the draft catches up on the request's tokens it has not computed (the last known one
at least; a whole prompt the first time for a separate draft), then feeds its own proposals
back, k passes in all, batched across the requests that speculate. Proposals are the draft's
argmax: a point mass, so `LLMEngine._verify` (sample each row, accept while equal) is exact
rejection sampling and the output is what it would be without speculation (engine/speculative.py).

What pays: a run of k proposals costs k draft passes and a step of 1 + k tokens; it pays when
1 + accepted >= that cost in plain steps (both measured at load, `step_costs`). Layer-skip
without a depth calibrates: the agreement of the first N layers' argmax with the model's on a
greedy answer, for N in steps of n_layers / 8. SmolLM2-135M (not trained to exit early) agrees
at N = 3, 6, .., 27 of 30 on 0.00, 0.02, 0.04, 0.10, 0.10, 0.12, 0.25, 0.31, 0.43 of the tokens,
while an N-layer pass costs ~0.28 + 0.026 N of a one-token step (the 49k-row head is a fifth
of the weights): the best estimate is 0.64x, so `layerskip` turns itself off there (`layerskip:N`
forces a depth: 0.74-0.81x in a rough 24-token run of bench/bench_speculative.py --methods
layerskip:20 --prompts 1 --repeats 1 --new-tokens 24, load average 1.1).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from miaotui.engine.request import Request
from miaotui.engine.scheduler import SchedulerOutput
from miaotui.errors import InvalidRequestError
from miaotui.model.attention import build_attention_metadata
from miaotui.model.kv_cache import KVCache
from miaotui.tokenizer import TextTokenizer

log = logging.getLogger(__name__)

MIN_SPEEDUP = 1.1
"""A layer-skip depth is used only if calibration estimates at least this speed-up: below it
the measurement's noise could hide a slowdown."""


@dataclass
class DraftProposer:
    """Greedy proposals from `model` (a Transformer or NativeStepModel) over `cache`."""

    model: Any
    cache: KVCache
    block_size: int
    num_layers: int | None = None
    """Layer-skip: run only the first num_layers layers (then the final norm and head)."""
    max_tokens: int | None = None
    """Most proposals per step (layer-skip: the calibrated k); None: the engine's limit."""
    verify_cost: list[float] = dataclasses.field(default_factory=list)
    """verify_cost[k]: a target step scoring k proposals over a plain decode step (measured)."""
    cost: float = 0.0
    """A one-token draft pass over a plain target decode step (measured)."""
    calibration: list[dict] | None = None
    """Layer-skip calibration table, when the depth was chosen at load."""
    seconds: float = 0.0
    """Time in the draft's forward passes."""
    off: bool = False
    """Calibration found that no depth pays for itself: the engine does not speculate."""

    def min_accepted(self, k: int) -> int:
        """Accepted tokens a run of k proposals needs to pay for itself (1 + a >= verify_cost[k]
        + k * cost); fewer count as a miss (engine/speculative.py backs off after misses).
        Capped at k: a draft too costly to pay even when right is still used (warned at load)."""
        if not self.verify_cost:
            return 1
        step = self.verify_cost[min(k, len(self.verify_cost) - 1)]
        return min(k, max(1, math.ceil(step + k * self.cost - 1 - 1e-9)))

    @property
    def shares_cache(self) -> bool:
        return self.num_layers is not None

    def fill(self, out: SchedulerOutput, requests: dict[str, Request]) -> SchedulerOutput:
        """`out` with its placeholder proposals replaced by the draft's (and on the requests)."""
        items = [c for c in out.cached if c.num_spec > 0]
        if not items:
            return out
        t0 = time.perf_counter()
        reqs = [requests[c.request_id] for c in items]
        proposals = self.propose(reqs, [c.num_spec for c in items])
        filled = {}
        for c, req, p in zip(items, reqs, proposals):
            req.spec_token_ids = p
            filled[c.request_id] = dataclasses.replace(c, token_ids=c.token_ids[: -c.num_spec] + p)
        self.seconds += time.perf_counter() - t0
        return dataclasses.replace(out, cached=[filled.get(c.request_id, c) for c in out.cached])

    @torch.inference_mode()
    def propose(self, reqs: list[Request], ks: list[int]) -> list[list[int]]:
        """ks[i] greedy tokens after reqs[i]'s known tokens (each decoding: num_computed_tokens
        = num_tokens - 1, blocks reserved for num_tokens + ks[i] - 1 positions)."""
        starts = [
            r.num_computed_tokens
            if self.shares_cache
            else min(r.spec.draft_computed, r.num_computed_tokens)
            for r in reqs
        ]
        chunks = [r.token_slice(s, r.num_tokens) for r, s in zip(reqs, starts)]
        out = [[t] for t in self._greedy(reqs, starts, chunks)]
        for j in range(1, max(ks)):
            live = [i for i, k in enumerate(ks) if k > j]
            sub = [reqs[i] for i in live]
            nxt = self._greedy(
                sub, [r.num_tokens - 1 + j for r in sub], [[out[i][-1]] for i in live]
            )
            for i, t in zip(live, nxt):
                out[i].append(t)
        for r, k in zip(reqs, ks):
            r.spec.draft_computed = r.num_tokens - 1 + k  # valid while its proposals are accepted
            r.spec.min_accepted = self.min_accepted(k)
        return out

    def _greedy(self, reqs: list[Request], starts: list[int], chunks: list[list[int]]) -> list[int]:
        """One draft pass: each request's chunk at starts[i].. -> the argmax after its end."""
        lens = [len(c) for c in chunks]
        meta = build_attention_metadata(
            starts,
            lens,
            [r.block_ids for r in reqs],
            self.block_size,
            self.model.config.sliding_window,
            self.cache.k[0].device,
        )
        ids = torch.tensor([t for c in chunks for t in c], dtype=torch.long)
        last = torch.tensor([e - 1 for e in itertools.accumulate(lens)], dtype=torch.long)
        return self.model(ids, meta, self.cache, last, self.num_layers).argmax(-1).tolist()


def check_same_tokenizer(target: TextTokenizer, draft: TextTokenizer, name: str) -> None:
    """A draft must tokenize exactly as the served model: its proposals are token ids."""
    need = (
        "a draft model must share the served model's tokenizer exactly (same vocabulary, same "
        "ids): a smaller model of the same family, e.g. SmolLM2-135M drafting for SmolLM2-360M "
        "or 1.7B (Gemma 3 270M and SmolLM2 do not share one)"
    )
    if draft.vocab_size != target.vocab_size:
        raise InvalidRequestError(
            f"draft model {name} has a vocabulary of {draft.vocab_size} tokens, the served model "
            f"{target.vocab_size}; {need}",
            "speculative_method",
        )
    a, b = target.tok.get_vocab(with_added_tokens=True), draft.tok.get_vocab(with_added_tokens=True)
    if a != b:
        diff = sorted(set(a.items()) ^ set(b.items()), key=lambda kv: kv[1])[:3]
        raise InvalidRequestError(
            f"draft model {name} has another tokenizer than the served model (e.g. tokens "
            f"{diff} differ); {need}",
            "speculative_method",
        )
    if draft.stop_ids != target.stop_ids:
        log.warning(
            "draft model %s stops on %s, the served model on %s",
            name,
            draft.stop_ids,
            target.stop_ids,
        )


def draft_cache(model, num_blocks: int, block_size: int) -> KVCache:
    """The separate draft's own KV cache: the target's block count and size, the draft's layers."""
    c = model.config
    n_kv_heads, dtype, device = model.kv_spec()
    return KVCache(c.n_layers, num_blocks * block_size, n_kv_heads, c.head_dim, dtype, device)


# ---- measured costs, and the layer-skip depth chosen by measured acceptance -------------------

CALIBRATION_PROMPT = (
    "Explain in a few sentences how a bicycle works, then list three things to check before "
    "riding one."
)


class Scratch:
    """A model on a KV cache of its own (one sequence, blocks 1..), for measurements at load."""

    def __init__(self, model, num_tokens: int, block_size: int = 16):
        c = model.config
        self.model, self.bs, self.window = model, block_size, c.sliding_window
        n_blocks = -(-num_tokens // block_size) + 1
        n_kv_heads, dtype, self.device = model.kv_spec()
        self.cache = KVCache(
            c.n_layers, n_blocks * block_size, n_kv_heads, c.head_dim, dtype, self.device
        )
        self.table = list(range(1, n_blocks))  # block 0 is the null block

    @torch.inference_mode()
    def step(
        self, ids: list[int], start: int, rows: list[int], num_layers: int | None = None
    ) -> torch.Tensor:
        meta = build_attention_metadata(
            [start], [len(ids)], [self.table], self.bs, self.window, self.device
        )
        idx = torch.tensor(rows, dtype=torch.long)
        return self.model(torch.tensor(ids), meta, self.cache, idx, num_layers)

    def seconds(self, n: int, start: int, num_layers: int | None = None, repeats: int = 3) -> float:
        """Best of `repeats` steps of n tokens at positions start.. (the machine is shared)."""
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            self.step([0] * n, start, list(range(n)), num_layers)
            best = min(best, time.perf_counter() - t0)
        return best


def step_costs(
    target, max_k: int, draft=None, num_layers: int | None = None, context: int = 64
) -> tuple[list[float], float]:
    """(verify, draft_cost): verify[k] = a target step of 1 + k tokens over a step of 1, for
    k = 0..max_k; draft_cost = a one-token draft pass (`draft`, or the target's first num_layers
    layers) over a target step of 1. Measured at a context of `context` tokens."""
    scratch = Scratch(target, context + max_k + 2)
    scratch.step([0] * context, 0, [context - 1])
    t = [scratch.seconds(1 + k, context) for k in range(max_k + 1)]
    if draft is not None:
        scratch = Scratch(draft, context + 2)
        scratch.step([0] * context, 0, [context - 1])
    t_draft = scratch.seconds(1, context, num_layers)
    return [x / t[0] for x in t], t_draft / t[0]


def calibrate_layerskip(
    model, tokenizer: TextTokenizer, max_k: int, new_tokens: int = 48, repeats: int = 3
) -> tuple[int | None, int, list[dict]]:
    """(num_layers or None for off, k, table): for each candidate depth N, the fraction p of
    positions of a greedy answer where the N-layer draft's argmax is the model's next token,
    and the estimated decode speed-up at k proposals, (1 + p + .. + p^k) * t(1) / (t(1 + k) +
    k * t_N), with t(n) a measured step of n tokens and t_N a measured N-layer draft step.
    Off when no (N, k) reaches MIN_SPEEDUP."""
    c = model.config
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": CALIBRATION_PROMPT}])
    except Exception:  # a tokenizer without a chat template: the plain text
        text = CALIBRATION_PROMPT
    prompt = tokenizer.encode(text)[: c.max_seq_len // 2]
    scratch = Scratch(model, len(prompt) + new_tokens + max_k + 2)
    seq = list(prompt)
    nxt = int(scratch.step(seq, 0, [len(seq) - 1]).argmax())
    for _ in range(new_tokens):  # the model's own greedy answer
        seq.append(nxt)
        nxt = int(scratch.step([nxt], len(seq) - 1, [0]).argmax())
    answer, pos = seq[len(prompt) :] + [nxt], len(seq)
    t_step = {n: scratch.seconds(n, pos, repeats=repeats) for n in range(1, max_k + 2)}
    rows = list(range(len(prompt) - 1, len(seq)))
    table, best = [], (0.0, None, 1)
    for n_layers in range(max(1, c.n_layers // 8), c.n_layers, max(1, c.n_layers // 8)):
        guess = scratch.step(seq, 0, rows, n_layers).argmax(-1).tolist()  # rewrites layers < N
        p = sum(g == a for g, a in zip(guess, answer)) / len(answer)
        t_draft = scratch.seconds(1, pos, n_layers, repeats)
        speedups = {
            k: sum(p**i for i in range(k + 1)) * t_step[1] / (t_step[1 + k] + k * t_draft)
            for k in range(1, max_k + 1)
        }
        k = max(speedups, key=speedups.get)
        table.append(
            {
                "num_layers": n_layers,
                "agreement": round(p, 3),
                "draft_cost": round(t_draft / t_step[1], 3),
                "k": k,
                "est_speedup": round(speedups[k], 3),
            }
        )
        if speedups[k] > best[0]:
            best = (speedups[k], n_layers, k)
    chosen = best[1] if best[0] >= MIN_SPEEDUP else None
    log.info(
        "layerskip calibration (step ms by tokens %s): %s -> %s",
        {n: round(t * 1e3, 2) for n, t in t_step.items()},
        table,
        f"{chosen} layers, k={best[2]}" if chosen else "off (no depth pays for itself)",
    )
    return chosen, best[2], table


def layerskip_proposer(
    model, cache: KVCache, tokenizer: TextTokenizer, block_size: int, method: str, max_k: int
) -> DraftProposer:
    """`layerskip:N` (N layers, up to max_k proposals) or `layerskip` (N and k calibrated;
    `off` when no depth pays for itself)."""
    n_layers = model.config.n_layers
    calibration = None
    if method == "layerskip":
        n, max_k, calibration = calibrate_layerskip(model, tokenizer, max_k)
        if n is None:
            best = max(calibration, key=lambda r: r["est_speedup"], default=None)
            log.warning(
                "layerskip: no depth of the model's %d layers is estimated to pay for itself "
                "(best %s); speculation is off",
                n_layers,
                best,
            )
            return DraftProposer(model, cache, block_size, calibration=calibration, off=True)
    else:
        n = int(method.removeprefix("layerskip:"))
        if not 1 <= n < n_layers:
            raise InvalidRequestError(
                f"layerskip:{n}: the model has {n_layers} layers; give 1 <= N < {n_layers}",
                "speculative_method",
            )
    verify, cost = step_costs(model, max_k, num_layers=n)
    return DraftProposer(
        model, cache, block_size, n, max_k, verify_cost=verify, cost=cost, calibration=calibration
    )
