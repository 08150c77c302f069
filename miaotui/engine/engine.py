"""The engine loop: requests in, one scheduled forward pass per step, text deltas out.

prompt ids -> Scheduler.schedule() -> ModelRunner.prepare/execute -> sample()
           -> Scheduler.update_from_output() -> detokenize, stop strings -> RequestOutput
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field

import torch

from miaotui.config import CacheConfig
from miaotui.engine.block_pool import BlockPool
from miaotui.engine.draft import DraftProposer
from miaotui.engine.request import Request, RequestStatus
from miaotui.engine.runner import ModelRunner
from miaotui.engine.sampler import SampledToken, make_generator, sample
from miaotui.engine.scheduler import Scheduler, SchedulerConfig
from miaotui.engine.speculative import PROBE_EVERY, UNPAID_LIMIT, propose_ngram
from miaotui.engine.structured import StructuredOutputs
from miaotui.errors import InvalidRequestError
from miaotui.sampling_params import SamplingParams
from miaotui.tokenizer import IncrementalDetokenizer, StopStringMatcher, TextTokenizer

log = logging.getLogger(__name__)


@dataclass
class Produced:
    """Everything one request produced, append-only. Each step's RequestOutput reads its own
    prefix of these lists: a step copies nothing (copying all ids each step is O(n^2) per
    request), and an output handed to another thread is a snapshot that later steps (which
    only append) cannot change."""

    token_ids: list[int] = field(default_factory=list)
    """The request's own output_token_ids (shared, not copied)."""
    text: list[str] = field(default_factory=list)
    """Text deltas, one per output."""
    logprobs: list[SampledToken] = field(default_factory=list)
    """One per sampled token, when logprobs were asked for."""


@dataclass(frozen=True)
class RequestOutput:
    """What a request produced so far (cumulative), plus the newest delta for streaming."""

    request_id: str
    prompt_token_ids: list[int]
    delta_text: str
    delta_token_ids: list[int]
    finished: bool
    finish_reason: str | None
    delta_logprobs: list[SampledToken] = field(default_factory=list)
    num_cached_tokens: int = 0
    arrival_time: float = 0.0
    first_token_time: float | None = None
    finish_time: float | None = None
    produced: Produced = field(default_factory=Produced, repr=False, compare=False)
    """The request's history, shared by all its outputs; read it through the properties."""
    upto: tuple[int, int, int] = (0, 0, 0)
    """This output's prefix of produced.(token_ids, text, logprobs)."""

    @property
    def token_ids(self) -> list[int]:
        """All tokens sampled so far (a new list)."""
        return self.produced.token_ids[: self.upto[0]]

    @property
    def text(self) -> str:
        """All text so far."""
        return "".join(self.produced.text[: self.upto[1]])

    @property
    def logprobs(self) -> list[SampledToken]:
        """Log-probabilities of all tokens so far (a new list; empty unless requested)."""
        return self.produced.logprobs[: self.upto[2]]


@dataclass
class _RequestState:
    """Driver-side state of one request: sampling, detokenizing, stop strings, timings."""

    request: Request
    params: SamplingParams
    generator: torch.Generator | None
    detok: IncrementalDetokenizer
    stops: StopStringMatcher
    produced: Produced
    first_token_time: float | None = None
    emitted_tokens: int = 0
    emitted_logprobs: int = 0


class LLMEngine:
    def __init__(
        self,
        runner: ModelRunner,
        tokenizer: TextTokenizer,
        num_blocks: int,
        cache: CacheConfig,
        sched: SchedulerConfig,
        drafter: DraftProposer | None = None,
    ):
        self.runner = runner
        self.drafter = drafter
        """The model proposer of `draft:` / `layerskip` (engine/draft.py); None for ngram."""
        method = sched.speculative_method
        self.speculating = method == "ngram" or (drafter is not None and not drafter.off)
        """False also when layerskip calibration found no depth that pays for itself."""
        if method not in (None, "ngram") and drafter is None:
            log.warning("speculative_method %s is not available here; speculation is off", method)
        self.tokenizer = tokenizer
        self.block_pool = BlockPool(num_blocks, cache.block_size, cache.enable_prefix_caching)
        self.scheduler = Scheduler(sched, self.block_pool)
        self.config = sched
        self.states: dict[str, _RequestState] = {}
        self._ids = itertools.count()
        self.step_request_ids: list[str] = []
        """The requests scheduled in the newest step (a failed step fails only these)."""
        self.fault_hook = None
        """Tests: called as fault_hook(step_request_ids) in every step before the forward pass;
        what it raises is that step's failure (it may also sleep, to slow steps down)."""
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0
        self.num_spec_proposed = 0
        """Proposed tokens scored (speculative decoding) and how many of them were accepted."""
        self.num_spec_accepted = 0
        self.num_spec_drafts = 0
        """Proposal runs scored (one per request and step that scored any)."""
        self.spec_propose_seconds = 0.0
        """Proposing (prompt lookup, or the draft model's passes), in all."""
        self.spec_verify_seconds = 0.0
        """Forward passes that scored proposals, and their verification."""
        self.spec_unpaid = 0
        """A draft model's proposal runs in a row (any request) that did not pay for themselves."""
        self._num_propose_steps = 0
        self.structured = StructuredOutputs(tokenizer, runner.model.config.vocab_size)

    # ---- requests ---------------------------------------------------------------------------

    def add_request(
        self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None
    ) -> str:
        """Queue a request (n must be 1 here; callers fan out n > 1). Returns its id."""
        if isinstance(prompt, str):  # an empty text is refused even if the tokenizer adds BOS
            ids = self.tokenizer.encode(prompt) if prompt else []
        else:
            ids = list(prompt)
        bad = [t for t in ids if not 0 <= t < self.runner.model.config.vocab_size]
        if bad:
            raise InvalidRequestError(f"token ids {bad[:5]} are outside the vocabulary", "prompt")
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        eos = set(params.stop_token_ids)
        if not params.ignore_eos:
            eos |= self.tokenizer.stop_ids
        matcher = self.structured.matcher_for(params)  # a bad constraint fails here, first
        req = Request(rid, ids, params.max_tokens, eos_token_ids=frozenset(eos), matcher=matcher)
        self.scheduler.add_request(req)  # checks the id, the length (check_prompt), max_tokens
        gen = None if params.greedy else make_generator(params.seed, self.runner.device)
        self.states[rid] = _RequestState(
            req,
            params,
            gen,
            IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens),
            StopStringMatcher(list(params.stop)),
            Produced(req.output_token_ids),
        )
        return rid

    def abort(self, request_id: str) -> None:
        """Stop a request now and free its KV blocks (unknown ids are ignored)."""
        self.scheduler.abort_request(request_id)
        self.states.pop(request_id, None)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- one step -----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        if self.speculating:
            t0 = time.perf_counter()
            self._propose()
            self.spec_propose_seconds += time.perf_counter() - t0
        out = self.scheduler.schedule()
        if not out.scheduled:
            return []
        if self.drafter is not None and self.speculating:
            t0 = time.perf_counter()
            for r in out.new:  # (re-)admitted: the draft's KV of its blocks is not its own
                self.scheduler.requests[r.request_id].spec.draft_computed = 0
            out = self.drafter.fill(out, self.scheduler.requests)
            self.spec_propose_seconds += time.perf_counter() - t0
        t_verify = time.perf_counter()
        self.step_request_ids = [s.request_id for s in out.scheduled]
        if self.fault_hook is not None:
            self.fault_hook(self.step_request_ids)
        inp = self.runner.prepare(out)
        states = [self.states[rid] for rid in inp.sample_ids]
        # Structured outputs' masks are computed while the forward pass runs.
        grammar = self.structured.start_step([s.request.matcher for s in states])
        logits = self.runner.execute(inp)
        first = [0, *itertools.accumulate(inp.num_rows)][:-1]  # each request's first row
        argmax = self.runner.greedy_tokens(logits.shape[0])
        tokens = sample(
            logits if len(first) == logits.shape[0] else logits[first],
            [s.params for s in states],
            [s.request.prompt_token_ids for s in states],
            [s.request.output_token_ids for s in states],
            [s.generator for s in states],
            grammar,
            None if argmax is None else [argmax[i] for i in first],
        )
        self.num_prompt_tokens += sum(self._prompt_tokens_in(s) for s in out.scheduled)
        sampled = {}
        for st, row, n, tok in zip(states, first, inp.num_rows, tokens):
            seq = self._verify(st, logits[row : row + n], tok) if n > 1 else [tok]
            if st.params.logprobs is not None:
                st.produced.logprobs.extend(seq)
            sampled[st.request.request_id] = [t.token_id for t in seq]
            self.num_spec_proposed += n - 1
            self.num_spec_accepted += len(seq) - 1
            self.num_spec_drafts += n > 1
            if n > 1:
                paid = len(seq) - 1 >= st.request.spec.min_accepted
                self.spec_unpaid = 0 if paid else self.spec_unpaid + 1
        if len(first) < logits.shape[0]:  # some request scored proposals
            self.spec_verify_seconds += time.perf_counter() - t_verify
        updated = self.scheduler.update_from_output(out, sampled)
        self.num_generation_tokens += sum(len(v) for v in sampled.values())
        return [self._output(self.states[r.request_id]) for r in updated]

    def _propose(self) -> None:
        """Proposals for the running requests about to decode (engine/speculative.py; none under
        a structured-output constraint, whose mask is per known prefix, nor in a batch larger
        than speculative_max_running). A draft model's are placeholders here: the scheduler
        reserves their slots, then the draft fills them in (engine/draft.py)."""
        k, n_max, n_min = (
            self.config.num_speculative_tokens,
            self.config.ngram_max,
            self.config.ngram_min,
        )
        if self.drafter is not None and self.drafter.max_tokens is not None:
            k = min(k, self.drafter.max_tokens)
        if len(self.scheduler.running) > self.config.speculative_max_running:
            return
        self._num_propose_steps += 1
        if self.drafter is not None and self.spec_unpaid >= UNPAID_LIMIT:
            if self._num_propose_steps % PROBE_EVERY:
                return  # nothing has paid lately: probe only now and then
        for req in self.scheduler.running:
            if req.matcher is not None or req.num_tokens - req.num_computed_tokens != 1:
                continue
            if req.spec.ready():
                n = min(k, req.spec.next_tokens)
                if self.drafter is None:
                    req.spec_token_ids = propose_ngram(req.all_token_ids, n, n_max, n_min)
                else:
                    req.spec_token_ids = [0] * n

    def spec_stats(self) -> dict[str, float | int | str | None]:
        """Speculative decoding so far: acceptance rate (accepted / proposed), mean accepted
        length (accepted tokens per scored proposal run; a step then yields 1 + that) and time."""
        method = self.config.speculative_method if self.speculating else None
        stats: dict[str, float | int | str | None] = {
            "method": method,
            "proposed": self.num_spec_proposed,
            "accepted": self.num_spec_accepted,
            "drafts": self.num_spec_drafts,
            "acceptance_rate": self.num_spec_accepted / max(1, self.num_spec_proposed),
            "mean_accepted_length": self.num_spec_accepted / max(1, self.num_spec_drafts),
            "propose_s": self.spec_propose_seconds,
            "draft_s": self.drafter.seconds if self.drafter is not None else 0.0,
            "verify_s": self.spec_verify_seconds,
        }
        if self.drafter is not None and self.drafter.num_layers is not None:
            stats["layerskip_layers"] = self.drafter.num_layers
        if self.drafter is not None and self.drafter.calibration is not None:
            stats["calibration"] = self.drafter.calibration
        return stats

    def _verify(
        self, st: _RequestState, rows: torch.Tensor, first: SampledToken
    ) -> list[SampledToken]:
        """Tokens a request keeps from a step that scored its proposals: row i's logits follow
        proposal i - 1; each row is sampled with the request's own sampler and generator, in
        order, while the token sampled equals the proposal (engine/speculative.py: exact for
        greedy and for seeded sampling). Returns the accepted proposals + the next token."""
        req = st.request
        proposed = req.spec_token_ids
        seq = [first]
        for i in range(1, rows.shape[0]):
            if seq[-1].token_id != proposed[i - 1] or seq[-1].token_id in req.eos_token_ids:
                break
            history = req.output_token_ids + [t.token_id for t in seq]
            tok = sample(
                rows[i : i + 1], [st.params], [req.prompt_token_ids], [history], [st.generator]
            )
            seq.append(tok[0])
        return seq

    def _prompt_tokens_in(self, s) -> int:
        num_prompt = len(self.states[s.request_id].request.prompt_token_ids)
        return max(0, min(s.start_pos + len(s.token_ids), num_prompt) - s.start_pos)

    def _output(self, st: _RequestState) -> RequestOutput:
        req = st.request
        now = time.monotonic()
        if st.first_token_time is None:
            st.first_token_time = now
        new_tokens = req.output_token_ids[st.emitted_tokens :]
        delta = ""
        stopped = False
        for i, t in enumerate(new_tokens):
            if t in req.eos_token_ids and req.status == RequestStatus.FINISHED_STOPPED:
                continue
            piece, stopped = st.stops.feed(st.detok.add(t))
            delta += piece
            if stopped:
                self.scheduler.finish_request(
                    req.request_id, RequestStatus.FINISHED_STOPPED, "stop_string"
                )
                # tokens a step accepted past the stop (speculation) never happened
                del req.output_token_ids[st.emitted_tokens + i + 1 :]
                del st.produced.logprobs[st.emitted_logprobs + i + 1 :]
                new_tokens = new_tokens[: i + 1]
                break
        st.emitted_tokens = req.num_output_tokens
        if req.is_finished and not stopped:
            delta += st.stops.flush()
        produced = st.produced
        produced.text.append(delta)
        new_logprobs = produced.logprobs[st.emitted_logprobs :]
        st.emitted_logprobs = len(produced.logprobs)
        finished = req.is_finished
        if finished:
            self.states.pop(req.request_id, None)
        return RequestOutput(
            request_id=req.request_id,
            prompt_token_ids=req.prompt_token_ids,
            delta_text=delta,
            delta_token_ids=new_tokens,
            finished=finished,
            finish_reason=req.status.finish_reason,
            delta_logprobs=new_logprobs,
            num_cached_tokens=req.num_cached_tokens,
            arrival_time=req.arrival_time,
            first_token_time=st.first_token_time,
            finish_time=now if finished else None,
            produced=produced,
            upto=(st.emitted_tokens, len(produced.text), st.emitted_logprobs),
        )
