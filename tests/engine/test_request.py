"""A prompt's length is checked once (engine/request.py: check_prompt), with one message, whether
it comes through the scheduler, the engine (LLM) or the HTTP server."""

from __future__ import annotations

import pytest

from miaotui.engine.block_pool import BlockPool
from miaotui.engine.request import Request, check_prompt
from miaotui.engine.scheduler import Scheduler, SchedulerConfig
from miaotui.errors import InvalidRequestError
from miaotui.server.calls import sampling_params
from miaotui.server.errors import APIError
from miaotui.server.protocol import ChatCompletionRequest, CompletionRequest

TOO_LONG = "the prompt has 20 tokens but the context holds 16; shorten it to at most 15 tokens"
EMPTY = "the prompt is empty; give at least one token"


def test_check_prompt_names_the_length_and_the_limit():
    check_prompt(15, 16)
    with pytest.raises(InvalidRequestError) as e:
        check_prompt(20, 16)
    assert str(e.value) == TOO_LONG and e.value.param == "prompt"
    with pytest.raises(InvalidRequestError) as e:
        check_prompt(0, 16, "messages")
    assert str(e.value) == EMPTY and e.value.param == "messages"


def test_the_scheduler_uses_the_same_check():
    sched = Scheduler(SchedulerConfig(max_model_len=16), BlockPool(8, 4))
    with pytest.raises(InvalidRequestError) as e:
        sched.add_request(Request("a", list(range(20)), max_tokens=1))
    assert str(e.value) == TOO_LONG
    with pytest.raises(InvalidRequestError) as e:
        sched.add_request(Request("b", [], max_tokens=1))
    assert str(e.value) == EMPTY


class _Engine:
    max_model_len = 16


@pytest.mark.parametrize(
    ("req", "param"),
    [
        (CompletionRequest(prompt="x"), "prompt"),
        (ChatCompletionRequest(messages=[{"role": "user", "content": "x"}]), "messages"),
    ],
)
def test_the_server_uses_the_same_check(req, param):
    """The same limit, in OpenAI's words and code (which litellm and LangChain match)."""
    chat = isinstance(req, ChatCompletionRequest)
    sampling_params(_Engine(), req, 15, chat)  # check_prompt(15, 16) passes too
    with pytest.raises(APIError) as e:
        sampling_params(_Engine(), req, 20, chat)
    assert (e.value.status, e.value.param, e.value.code) == (400, param, "context_length_exceeded")
    assert e.value.message.startswith("This model's maximum context length is 16 tokens.")


def test_llm_uses_the_same_check():
    import torch

    from miaotui.config import CacheConfig
    from miaotui.engine.engine import LLMEngine
    from miaotui.engine.runner import ModelRunner
    from miaotui.llm import LLM
    from miaotui.sampling_params import SamplingParams
    from tests import helpers

    cache = CacheConfig(block_size=4, num_blocks=8)
    runner = ModelRunner(helpers.tiny_transformer(0), cache, 8, torch.device("cpu"), torch.float32)
    engine = LLMEngine(
        runner, helpers.byte_tokenizer(), 8, cache, SchedulerConfig(max_model_len=16)
    )
    llm = LLM.from_engine(engine)
    with pytest.raises(InvalidRequestError) as e:
        llm.generate("twenty ascii letters", SamplingParams(max_tokens=1))
    assert str(e.value) == TOO_LONG
    with pytest.raises(InvalidRequestError) as e:
        llm.generate("", SamplingParams(max_tokens=1))
    assert str(e.value) == EMPTY
    assert not engine.has_unfinished()
