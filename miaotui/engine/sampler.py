"""Logits -> next tokens: penalties, greedy or temperature/top-k/top-p/min-p sampling with a
per-request seeded generator, and log-probabilities of the chosen token and top alternatives."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from miaotui.engine.structured import GrammarStep
from miaotui.sampling_params import SamplingParams


@dataclass(frozen=True)
class SampledToken:
    token_id: int
    logprob: float | None = None
    """Log-probability of the chosen token (when requested)."""
    top_logprobs: tuple[tuple[int, float], ...] = ()
    """(token id, log-probability) of the most likely alternatives, best first."""


def apply_penalties(
    logits: torch.Tensor, params: SamplingParams, prompt_ids: list[int], output_ids: list[int]
) -> torch.Tensor:
    """logits: (V,) -> penalised copy. Repetition penalty over prompt+output (CTRL / HF);
    presence and frequency penalties over the output (OpenAI)."""
    if params.repetition_penalty != 1.0 and (prompt_ids or output_ids):
        seen = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), dtype=torch.long)
        vals = logits[seen]
        p = params.repetition_penalty
        logits = logits.clone()
        logits[seen] = torch.where(vals > 0, vals / p, vals * p)
    if (params.presence_penalty or params.frequency_penalty) and output_ids:
        ids, counts = torch.tensor(output_ids, dtype=torch.long).unique(return_counts=True)
        logits = logits.clone()
        logits[ids] -= params.frequency_penalty * counts.to(logits.dtype) + params.presence_penalty
    return logits


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature-scaled logits (V,) with excluded tokens set to -inf (top-k, top-p, min-p)."""
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens before it already reach top_p (always keep the first).
        drop = (probs.cumsum(-1) - probs) >= params.top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    if params.min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    return logits


def sample_row(
    logits: torch.Tensor,
    params: SamplingParams,
    prompt_ids: list[int],
    output_ids: list[int],
    generator: torch.Generator | None,
) -> SampledToken:
    """One request's next token from its logits (V,) (float32)."""
    logits = apply_penalties(logits, params, prompt_ids, output_ids)
    if params.logit_bias:
        ids, bias = zip(*params.logit_bias)
        logits = logits.clone()
        logits[list(ids)] += torch.tensor(bias, dtype=logits.dtype)
    if params.greedy:
        token = int(torch.argmax(logits))
    else:
        probs = filter_logits(logits, params).softmax(-1)
        token = int(torch.multinomial(probs, 1, generator=generator))
    if params.logprobs is None:
        return SampledToken(token)
    logp = torch.log_softmax(logits, -1)
    top = ()
    if params.logprobs > 0:
        vals, ids = torch.topk(logp, params.logprobs)
        # Tokens a constraint forbids (-inf) are no alternatives (and -inf is not JSON).
        top = tuple((i, v) for i, v in zip(ids.tolist(), vals.tolist()) if v != float("-inf"))
    return SampledToken(token, float(logp[token]), top)


def needs_full_sampler(params: SamplingParams) -> bool:
    return (
        not params.greedy
        or params.logprobs is not None
        or params.repetition_penalty != 1.0
        or bool(params.presence_penalty)
        or bool(params.frequency_penalty)
        or bool(params.logit_bias)
    )


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    prompt_ids: list[list[int]],
    output_ids: list[list[int]],
    generators: list[torch.Generator | None],
    grammar: GrammarStep | None = None,
    argmax: list[int] | None = None,
) -> list[SampledToken]:
    """logits: (B, V) -> one token per row. Plain greedy rows take one batched argmax, or
    `argmax` when the model found it with the logits (-1: a row it left to this one). Rows
    under a structured-output constraint (`grammar`) sample among the tokens it allows, and
    their matchers then consume the chosen tokens."""
    logits = logits.float()
    if grammar is not None:
        logits = grammar.apply(logits)
        argmax = None  # the constraint's masked logits have their own
    greedy = argmax
    if greedy is None or -1 in greedy:
        greedy = torch.argmax(logits, dim=-1).tolist()
    out = []
    for b, p in enumerate(params):
        if needs_full_sampler(p):
            out.append(sample_row(logits[b], p, prompt_ids[b], output_ids[b], generators[b]))
        else:
            out.append(SampledToken(greedy[b]))
    if grammar is not None:
        grammar.commit([t.token_id for t in out])
    return out


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A request's own generator on the device of its logits (torch.multinomial needs both on
    one device): seeded requests repeat exactly, whatever else is batched."""
    g = torch.Generator(device=device)
    g.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, ()).item()))
    return g
