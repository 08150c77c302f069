"""Translation: sentence splitting that keeps paragraphs, the two prompt styles (chat template for
chat models, few-shot for base models), batched translation equal to one sentence at a time
(the engine computes each token alike whatever shares its step), `/v1/translate` on a real
server equal to the in-process path, and `miaotui translate` keeping paragraphs."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest

from miaotui import cli
from miaotui.config import CacheConfig
from miaotui.errors import InvalidRequestError
from miaotui.load.open import load_tokenizer, open_checkpoint
from miaotui.translate import (
    TranslationConfig,
    clean_output,
    loop_cut,
    sampling_params,
    sentence_prompt,
    sentence_prompts,
    shared_prefix,
    split_document,
    translate_sentences,
    translate_with_llm,
)
from tests.helpers import APP_API_KEY, REPO, engine_variant

pytestmark = pytest.mark.usefixtures("one_thread")

DOCUMENT = """Mr. Bennet replied that he had not. "But it is," returned she!
Is it true? Yes.

The house is large.
It has a garden."""


@pytest.fixture(scope="module")
def llm(smollm_native):
    return engine_variant(smollm_native, max_model_len=1024, cache=CacheConfig(num_blocks=256))


def test_split_keeps_paragraphs_titles_and_quotes():
    doc = split_document(DOCUMENT)
    assert doc.paragraphs == (
        (
            "Mr. Bennet replied that he had not.",
            '"But it is," returned she!',
            "Is it true?",
            "Yes.",
        ),
        ("The house is large.", "It has a garden."),
    )
    assert doc.assemble(doc.sentences).split("\n\n") == [
        " ".join(p.split()) for p in DOCUMENT.split("\n\n")
    ]


def test_empty_or_unknown_is_refused():
    with pytest.raises(InvalidRequestError, match="empty"):
        split_document(" \n\n ")
    with pytest.raises(InvalidRequestError, match="201 sentences; at most 200"):
        split_document("Yes. " * 201)
    with pytest.raises(InvalidRequestError, match="unknown target language 'xx'"):
        TranslationConfig("xx")


def test_chat_models_get_the_template_base_models_few_shot():
    chat = load_tokenizer(open_checkpoint("smollm2-135m"))
    base = load_tokenizer(open_checkpoint("gemma3-270m"))
    config = TranslationConfig("fr")
    prompt = sentence_prompt("The cat sleeps.", chat, config)
    assert prompt.startswith("<|im_start|>system\n") and "into French" in prompt.split("\n")[1]
    assert prompt.count("<|im_start|>user\n") == 4 and prompt.count("<|im_start|>assistant\n") == 4
    assert "<|im_start|>assistant\nIl fait beau aujourd'hui.<|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>user\nThe cat sleeps.<|im_end|>\n<|im_start|>assistant\n")
    sentences = split_document(DOCUMENT).sentences
    for tok in (chat, base):
        want = [sentence_prompt(s, tok, config) for s in sentences]
        assert sentence_prompts(sentences, tok, config) == want
    few = sentence_prompt("The cat sleeps.", base, config)
    assert few.endswith("English: The cat sleeps.\nFrench:")
    assert few.count("English:") == 4 and "<start_of_turn>" not in few


def test_batched_equals_one_at_a_time(llm):
    config = TranslationConfig("fr", max_tokens=24)
    sentences = split_document(DOCUMENT).sentences
    together = translate_sentences(llm, sentences, config)
    alone = [translate_sentences(llm, [s], config)[0] for s in sentences]
    assert together == alone
    assert all(together), together
    assert together != sentences


def test_a_loop_ends_after_its_first_copy():
    babble = "Je m'aime, m'adore, m'adore, m'adore, m'adore, m'adore, m'adore,"
    assert clean_output(babble) == "Je m'aime, m'adore"
    # The cut is the same for every prefix that already holds the loop: a request stopped as
    # soon as it loops gives the text one that ran on to max_tokens gives (the server's path).
    first = next(n for n in range(len(babble)) if loop_cut(babble[:n]) is not None)
    assert {clean_output(babble[:n]) for n in range(first, len(babble) + 1)} == {
        "Je m'aime, m'adore"
    }
    for fine in (
        "Il est bien bien.",
        "Je vais vrai, je vais vrai, je vais vrai.",
        "Non, non, non et non !",
        "Il a dit « très, très, très bien ».",
        "Le 1 000 000 000 de francs.",
    ):
        assert loop_cut(fine) is None and clean_output(fine) == fine
    assert clean_output('  "Bonjour."\nEnglish: x') == "Bonjour."


def test_a_looping_translation_stops_early_with_the_text_it_would_have(llm):
    """SmolLM2-135M falls into "m'adore, m'adore, ..." on this sentence: the batch stops it there,
    and its translation is the one a request that ran to max_tokens gives after the cut."""
    config = TranslationConfig("fr", max_tokens=96)
    sentence = (
        "You and the girls may go, or you may send them by themselves, which perhaps will be "
        "still better, for as you are as handsome as any of them, Mr. Bingley may like you the "
        "best of the party."
    )
    tok = llm.tokenizer
    params = sampling_params(sentence, tok, config)
    [full] = llm.generate([tok.encode(sentence_prompt(sentence, tok, config))], params)
    assert loop_cut(full.text) is not None, full.text
    before = llm.engine.num_generation_tokens
    [stopped] = translate_sentences(llm, [sentence, "Yes."], config)[:1]
    assert stopped == clean_output(full.text)
    assert llm.engine.num_generation_tokens - before < len(full.token_ids) - 20


def test_shared_prefix():
    assert shared_prefix([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == [1, 2]
    assert shared_prefix([[7, 1], [8, 1]]) == []


def test_endpoint_equals_the_in_process_path(app_server, llm):
    body = {"text": DOCUMENT, "target_language": "fr", "max_tokens": 24}
    auth = {"Authorization": f"Bearer {APP_API_KEY}"}
    r = httpx.post(app_server + "/v1/translate", json=body, headers=auth, timeout=120)
    assert r.status_code == 200, r.text
    want = translate_with_llm(llm, DOCUMENT, TranslationConfig("fr", max_tokens=24))
    assert r.json()["text"] == want.text
    assert r.json()["sentences"] == want.sentences == 6
    assert len(r.json()["text"].split("\n\n")) == 2

    for bad, param in [({"text": " "}, "text"), ({"target_language": "xx"}, "target_language")]:
        r = httpx.post(app_server + "/v1/translate", json={**body, **bad}, headers=auth)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    r = httpx.post(app_server + "/v1/translate", json=body)
    assert r.status_code == 401


def test_streamed_translation_sends_every_sentence_then_the_whole(app_server):
    body = {"text": DOCUMENT, "target_language": "fr", "max_tokens": 24}
    auth = {"Authorization": f"Bearer {APP_API_KEY}"}
    whole = httpx.post(app_server + "/v1/translate", json=body, headers=auth, timeout=120)
    events = []
    with httpx.stream(
        "POST", app_server + "/v1/translate", json={**body, "stream": True}, headers=auth
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line.removeprefix("data: ")))
    assert events[0] == {"object": "translation.start", "paragraphs": [4, 2]}
    sentences = {e["index"]: e["text"] for e in events[1:-1]}
    assert len(events) == 8 and sorted(sentences) == list(range(6))
    assert events[-1]["text"] == whole.json()["text"]
    doc = split_document(DOCUMENT)
    assert doc.assemble([sentences[i] for i in range(6)]) == events[-1]["text"]


def test_cli_keeps_paragraphs(tmp_path, capsys):
    source = tmp_path / "doc.txt"
    source.write_text(DOCUMENT)
    cmd = [sys.executable, "-m", "miaotui.cli", "translate", "--to", "fr", str(source)]
    cmd += ["--threads", "1", "--max-tokens", "24"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    paragraphs = out.stdout.strip().split("\n\n")
    assert len(paragraphs) == 2 and all(p.strip() for p in paragraphs), out.stdout
    assert "6 sentences" in out.stderr

    with pytest.raises(SystemExit) as exit_:
        cli.main(["translate", "--to", "xx", "hello"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "--to" in err and len(err.splitlines()) == 1, err
