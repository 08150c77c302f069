"""Shared fixtures; the helpers they use live in tests/helpers.py (test modules never import each
other). A module that runs tiny models opts into one thread with
`pytestmark = pytest.mark.usefixtures("one_thread")`."""

from __future__ import annotations

import os
import random
from pathlib import Path
from unittest import mock

import pytest
import torch

from tests import helpers


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("order", "test order (no test may depend on another having run)")
    group.addoption("--reverse", action="store_true", help="run the tests in reverse order")
    group.addoption(
        "--shuffle",
        type=int,
        metavar="SEED",
        help="run the modules in a random order, and each module's tests in a random order",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--reverse"):
        items.reverse()
    seed = config.getoption("--shuffle")
    if seed is not None:
        # Whole modules stay together, so that module fixtures (a server, a model) are set up
        # once per module as in file order.
        rng = random.Random(seed)
        modules: dict[str, list[pytest.Item]] = {}
        for item in items:
            modules.setdefault(item.nodeid.split("::")[0], []).append(item)
        order = list(modules.values())
        rng.shuffle(order)
        for group in order:
            rng.shuffle(group)
        items[:] = [item for group in order for item in group]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models are all per-op overhead: more intra-op threads only add synchronisation, and
    on a busy 2-core machine threads that wait for each other are many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session", autouse=True)
def one_default_gguf_parse():
    """Our loader, our tokenizer tests and transformers' GGUF loader each open the default model
    with gguf.GGUFReader, whose header parse (49k tokens, 49k merges) costs seconds: parse it
    once per session. Read-only, and only for that one file (tests write and read others)."""
    import gguf

    default = str(helpers.default_model_path())
    original = gguf.GGUFReader
    readers = {}

    def reader(path, mode="r"):
        if os.path.realpath(path) != default:
            return original(path, mode)
        if mode not in readers:
            readers[mode] = original(path, mode)
        return readers[mode]

    with mock.patch.object(gguf, "GGUFReader", reader):
        yield


@pytest.fixture(scope="session")
def smollm_path() -> Path:
    """The real default model (SmolLM2-135M-Instruct, Q4_1 GGUF)."""
    return helpers.default_model_path()


@pytest.fixture(scope="session")
def smollm_float():
    """The real default model with weights decoded to fp32, loaded once per session. Shared:
    run requests on `helpers.engine_variant(smollm_float)` (own KV cache), not on this LLM."""
    from miaotui.llm import LLM

    return LLM(str(helpers.default_model_path()), weights="float")


@pytest.fixture(scope="session")
def smollm_native():
    """The real default model on the native int kernels (its Q4_1 blocks repacked), loaded once
    per session. Shared: run requests on `helpers.engine_variant(smollm_native)`."""
    from miaotui.llm import LLM

    return LLM(str(helpers.default_model_path()))


@pytest.fixture(scope="session")
def tiny_chat_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny random llama GGUF (fp32) with SmolLM2's vocabulary, tokenizer and chat template."""
    return helpers.write_tiny_chat_gguf(tmp_path_factory.mktemp("tiny_chat") / "tiny.gguf")


@pytest.fixture(scope="session")
def api_server():
    """One `miaotui serve` on the default model for the API-feature tests (structured outputs,
    tools, endpoints, OpenAI semantics): one thread, API_MAX_MODEL_LEN tokens of context, CORS
    for API_ORIGIN."""
    args = ("--threads", "1", "--max-model-len", str(helpers.API_MAX_MODEL_LEN))
    with helpers.miaotui_serve(*args, "--allowed-origins", helpers.API_ORIGIN) as url:
        yield url


@pytest.fixture(scope="session")
def app_server():
    """`miaotui serve` on the default model with the chat page, speech and translation (API key
    helpers.APP_API_KEY), shared by the application tests; its base URL."""
    args = ("--threads", "1", "--max-model-len", "2048", "--api-key", helpers.APP_API_KEY)
    with helpers.miaotui_serve(*args) as url:
        yield url


@pytest.fixture(scope="session")
def tiny_api_server(tiny_chat_gguf):
    """`miaotui serve` on the tiny chat model with float weights (a `Transformer`, compared
    with its transformers twin `helpers.tiny_chat_hf_model()`)."""
    args = ("--model", str(tiny_chat_gguf), "--weights", "float", "--threads", "1")
    with helpers.miaotui_serve(*args) as url:
        yield url
