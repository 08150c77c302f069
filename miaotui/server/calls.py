"""One API request -> the engine requests that answer it: the chat prompt (the model's template,
tools rendered), sampling parameters and their checks (context length, logit_bias, structured
output), prompts x n (or best_of) jobs submitted through a FanOut. Shared by the OpenAI routes
(openai.py) and Anthropic Messages (anthropic.py)."""

from __future__ import annotations

from dataclasses import replace

from fastapi import Request

from miaotui.errors import InvalidRequestError, MiaotuiError
from miaotui.sampling_params import SamplingParams
from miaotui.server import tools
from miaotui.server.errors import APIError
from miaotui.server.fanout import FanOut, Job
from miaotui.server.protocol import ChatCompletionRequest, SamplingFields
from miaotui.server.responses import Call
from miaotui.server.structured import checked, structured_output
from miaotui.tokenizer import render_chat_template

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions


DEFAULT_CHAT_TOKENS = 512


GREEDY_BELOW = 1e-5  # temperatures this small are greedy (vLLM); dividing by them overflows


def chat_prompt(tokenizer, req: ChatCompletionRequest) -> str:
    """The request's messages (and tools) rendered with the model's chat template."""
    template = tokenizer.info.chat_template
    if template is None:
        raise APIError(400, "this model has no chat template; use /v1/completions", "messages")
    messages, extra = tools.template_messages(req, template)
    special = {
        "bos_token": _token_text(tokenizer, tokenizer.info.bos_id),
        "eos_token": _token_text(tokenizer, tokenizer.info.eos_id),
    }
    try:
        return render_chat_template(template, messages, True, **special, **extra)
    except MiaotuiError as e:
        raise APIError(400, str(e), "messages") from e
    except Exception as e:  # a template that fails on these messages: still their fault
        raise APIError(400, f"the chat template failed on these messages: {e}", "messages") from e


def _token_text(tokenizer, token_id: int | None) -> str:
    return "" if token_id is None else (tokenizer.id_to_token(token_id) or "")


def context_exceeded(limit: int, prompt_len: int, requested: int | None, param: str | None):
    """OpenAI's wording and code, which litellm and LangChain recognise."""
    if requested is None:
        detail = f"However, your prompt resulted in {prompt_len} tokens"
        advice = "Please reduce the length of the prompt."
    else:
        detail = (
            f"However, you requested {prompt_len + requested} tokens ({prompt_len} in the "
            f"prompt, {requested} for the completion)"
        )
        advice = f"Please reduce the length of the prompt or {param}."
    return APIError(
        400,
        f"This model's maximum context length is {limit} tokens. {detail}. {advice}",
        param,
        code="context_length_exceeded",
    )


def sampling_params(
    engine, req: SamplingFields, prompt_len: int, chat: bool, structured=None
) -> SamplingParams:
    limit = engine.max_model_len
    prompt_param = "messages" if chat else "prompt"
    if prompt_len == 0:
        raise APIError(400, "the prompt is empty; give at least one token", prompt_param)
    if prompt_len >= limit:  # before the default max_tokens, which needs room in the context
        raise context_exceeded(limit, prompt_len, None, prompt_param)
    requested = getattr(req, "max_completion_tokens", None) or req.max_tokens
    field_name = (
        "max_completion_tokens" if getattr(req, "max_completion_tokens", None) else "max_tokens"
    )
    if requested is None:
        requested = min(
            DEFAULT_CHAT_TOKENS if chat else DEFAULT_COMPLETION_TOKENS, limit - prompt_len
        )
    if prompt_len + requested > limit:
        raise context_exceeded(limit, prompt_len, requested, field_name)
    if chat:
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
    else:
        logprobs = req.logprobs
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    try:
        return SamplingParams(
            max_tokens=max(requested, 1),  # 0 (echo only) never reaches the engine
            temperature=0.0 if req.temperature < GREEDY_BELOW else req.temperature,
            top_p=req.top_p,
            top_k=max(req.top_k, 0),
            min_p=req.min_p,
            seed=req.seed,
            stop=stop,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            repetition_penalty=req.repetition_penalty,
            logprobs=logprobs,
            n=1,
            ignore_eos=req.ignore_eos,
            structured=structured,
            logit_bias=_logit_bias(req, engine),
        )
    except InvalidRequestError as e:
        raise APIError(400, str(e), e.param) from e


def _logit_bias(req: SamplingFields, engine) -> tuple[tuple[int, float], ...]:
    if not req.logit_bias:
        return ()
    vocab_size = engine.tokenizer.vocab_size
    bias = tuple((int(k), float(v)) for k, v in req.logit_bias.items())
    bad = [t for t, _ in bias if t >= vocab_size]
    if bad:
        raise APIError(
            400,
            f"logit_bias: token ids {bad[:5]} are outside the vocabulary ({vocab_size})",
            "logit_bias",
        )
    return bias


def _constraint(req: SamplingFields, chat: bool):
    """The request's one structured-output constraint: a forced tool call's or a format's."""
    forced = tools.forced_call_constraint(req) if chat else None
    if forced is not None:  # a function's parameters that are no valid schema
        forced = checked(forced, "tools")
    asked = structured_output(req)
    if forced is not None and asked is not None:
        raise APIError(
            400, "a forced tool call cannot be combined with a response format", "tool_choice"
        )
    return forced or asked


def chat_call(engine, req: ChatCompletionRequest, rid: str) -> Call:
    """A chat call (for other APIs built on the chat route, e.g. Anthropic Messages)."""
    return build_call(engine, req, [], True, rid)


async def start_call(engine, raw: Request, call: Call, prompts: list) -> FanOut:
    """Submit the call's engine requests; bad input, a full queue or a dead engine raise here,
    before anything is sent."""
    req = call.req
    constraint = _constraint(req, call.chat)
    jobs = []
    for i, prompt in enumerate(prompts):
        ids = engine.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        params = sampling_params(engine, req, len(ids), call.chat, constraint)
        if call.per_prompt > req.n and params.logprobs is None:
            params = replace(params, logprobs=0)  # best_of ranks by cumulative logprob
        for j in range(call.per_prompt):
            # The j-th of n completions: distinct but reproducible seeds (as LLM.generate).
            seed = None if req.seed is None else req.seed + j
            idx = i * call.per_prompt + j
            jobs.append(Job(idx, f"{call.rid}-{idx}", ids, replace(params, seed=seed)))
    fan = FanOut(engine, jobs, raw)
    await fan.start()
    return fan


def build_call(engine, req: SamplingFields, prompts: list, chat: bool, rid: str) -> Call:
    per_prompt = req.n
    echo_texts: tuple[str, ...] = ()
    if not chat:
        if req.best_of is not None:
            if req.best_of < req.n:
                raise APIError(400, f"best_of={req.best_of} must be >= n={req.n}", "best_of")
            if req.best_of > req.n and req.stream:
                raise APIError(400, "best_of > n cannot be streamed", "best_of")
            if req.best_of * len(prompts) > MAX_ENGINE_REQUESTS:
                raise APIError(
                    400, f"best_of x prompts is at most {MAX_ENGINE_REQUESTS}", "best_of"
                )
            per_prompt = req.best_of
        if req.echo:
            if req.stream:
                raise APIError(400, "echo cannot be streamed", "echo")
            echo_texts = tuple(
                p if isinstance(p, str) else engine.tokenizer.decode(p) for p in prompts
            )
        elif req.max_tokens == 0:
            raise APIError(400, "max_tokens=0 is only allowed with echo", "max_tokens")
    return Call(rid, req, chat, per_prompt, echo_texts)


MAX_ENGINE_REQUESTS = 64
