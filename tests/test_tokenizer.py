"""Our tokenizer, built from the default model's GGUF metadata, against transformers' tokenizer of
the same file: same ids for a few hundred varied strings, same decoded text, lossless round trips,
and the same rendered chat template.

transformers' GGUF converter ignores llama.cpp's `tokenizer.ggml.pre = "smollm"` and pre-tokenizes
with plain ByteLevel, which merges digit runs. The official SmolLM2 tokenizer.json (and llama.cpp's
"smollm" pre-tokenizer, llama-vocab.cpp) split digits one by one:
    "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": true},
        {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}]}
so the reference gets that pre-tokenizer back before comparing.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import pre_tokenizers

from miaotui.errors import InvalidRequestError
from miaotui.load.gguf_file import read_gguf
from miaotui.tokenizer import TextTokenizer, render_chat_template
from tests.helpers import SHARED, default_model_path

HANDPICKED = [
    "Hello world",
    " leading space",
    "   three leading spaces",
    "trailing spaces   ",
    "",
    " ",
    "\n",
    "\n\n\nthree newlines",
    "\r\nwindows\r\nlines\r\n",
    "\t\ttabs\tinside\t",
    " \t \n mixed \n\t ",
    "12345 678 9",
    "3.14159265358979",
    "1,000,000.00$ and 42%",
    "x=1;y=22;z=333",
    "２０２４年１２月 full-width digits",
    "Ⅻ roman numerals, ² ³ ½ superscripts",
    "٣٤٥ Arabic-Indic digits",
    "你好，世界！",
    "日本語のテキストとカタカナ",
    "한국어 문장입니다",
    "😀👍🏽🇫🇷👨‍👩‍👧 emoji with modifiers and ZWJ",
    "🤖🤖🤖",
    "def f(x):\n    return x ** 2  # square\n",
    "if (a && b) { return c[0]; }",
    '<html><body class="x">Hi</body></html>',
    "https://example.com/path?query=1&b=2#frag",
    "don't I'll we've they're she's it'd I'm",
    "DON'T SHOUT",
    "e\u0301 café naïve façade",
    "ﬁ ligature and \u200b zero width space",
    "a\u00a0non-breaking\u3000ideographic space",
    "السلام عليكم",
    "Привет, мир!",
    "Ελληνικά γράμματα",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math letters",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "text<|im_end|>glued",
    "x  <|im_start|>  y",
    "<|endoftext|>",
    "<|im_start|",  # not a special token: a broken one is ordinary text
    "<repo_name>miaotui<file_sep>main.py",
]
POOLS = [
    "abcdefghij XYZ",
    "0123456789",
    " \t\n\r",
    "你好世界日本語한국",
    "😀👍🏽🇫🇷🤖",
    "'.,;:!?()[]{}<>\"-_=+*/\\",
    "éüßøñçàÅ",
    "\u00a0\u2003\u3000",
    "١٢٣",
]
SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "'s", "'ll", "    ", "\n\n"]


def _random_strings(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 25)):
            r = rng.random()
            if r < 0.1:
                parts.append(rng.choice(SPECIALS))
            elif r < 0.3:
                parts.append(rng.choice(POOLS))  # a whole run (digit runs, whitespace runs)
            else:
                parts.append(rng.choice(rng.choice(POOLS)))
        out.append("".join(parts))
    return out


def _corpus_lines(n: int) -> list[str]:
    """The first n non-empty lines (newline kept) of each shared text, read in place."""
    lines = []
    for name in ("wiki_dev.txt", "austen_pride_and_prejudice.txt"):
        with open(SHARED / "data" / "text" / name, encoding="utf-8") as f:
            lines += [line for line, _ in zip((x for x in f if x.strip()), range(n))]
    return lines


CORPUS = HANDPICKED + _random_strings(250) + _corpus_lines(50)


@pytest.fixture(scope="module")
def ours() -> TextTokenizer:
    return TextTokenizer.from_gguf_metadata(read_gguf(default_model_path()).tokenizer_source)


@pytest.fixture(scope="module")
def reference():
    from transformers import AutoTokenizer

    path = default_model_path()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    return tok


def test_corpus_is_varied():
    assert len(CORPUS) >= 300
    assert len(set(CORPUS)) > 290


def test_same_ids_as_transformers(ours, reference):
    mismatches = []
    for text in CORPUS:
        got, want = ours.encode(text), reference.encode(text, add_special_tokens=False)
        if got != want:
            mismatches.append((text, got, want))
    assert not mismatches, f"{len(mismatches)} of {len(CORPUS)} differ, first: {mismatches[0]}"


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=40))
def test_same_ids_as_transformers_on_any_unicode(ours, reference, text):
    assert ours.encode(text) == reference.encode(text, add_special_tokens=False)


def test_special_tokens_are_matched_whole(ours):
    ids = ours.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2  # ids of <|im_start|> and <|im_end|> in SmolLM2's vocab
    assert 1 not in ours.encode("<|im_start|")


def test_digits_are_split_one_by_one(ours):
    """llama.cpp's "smollm" pre-tokenizer: every digit is its own pre-token."""
    ids = ours.encode("12345")
    assert [ours.decode([i]) for i in ids] == list("12345")


def test_no_bos_added_for_this_model(ours):
    """tokenizer.ggml.add_bos_token is false in the SmolLM2 GGUF."""
    assert ours.encode("Hello") == ours.encode("Hello", add_special=False)


@pytest.fixture(scope="module")
def byte_tokens(ours) -> frozenset[int]:
    """Bytes that have a token (SmolLM2's vocab lacks a few, e.g. 0xF1, that never occur in its
    training data; both tokenizers drop those)."""
    vocab = ours.tok.get_vocab()
    return frozenset(b for b, c in _bytes_to_unicode().items() if c in vocab)


def _coverable(byte_tokens: frozenset[int], text: str) -> bool:
    return all(b in byte_tokens for b in text.encode())


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (openai/gpt-2 encoder.py)."""
    bs = list(range(ord("!"), ord("~") + 1))
    bs += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def test_decode_matches_transformers_and_round_trips(ours, reference, byte_tokens):
    for text in CORPUS:
        ids = ours.encode(text)
        got = ours.decode(ids, skip_special=False)
        assert got == reference.decode(ids, skip_special_tokens=False), text
        if _coverable(byte_tokens, text):
            assert got == text
        assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True), text


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=40))
def test_round_trip_any_unicode(ours, byte_tokens, text):
    if _coverable(byte_tokens, text):
        assert ours.decode(ours.encode(text), skip_special=False) == text


def test_uncoverable_bytes_match_transformers(ours, reference, byte_tokens):
    """U+40000 is F1 80 80 80 in UTF-8; 0xF1 has no token: both drop it the same way."""
    assert not _coverable(byte_tokens, "\U00040000")
    assert ours.encode("\U00040000") == reference.encode("\U00040000", add_special_tokens=False)


CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are a pirate."},
        {"role": "user", "content": "Hi!"},
    ],
    [
        {"role": "user", "content": "Write a haiku."},
        {"role": "assistant", "content": "Leaves fall\nsoftly on\nthe pond."},
        {"role": "user", "content": "Another one, about 猫 and 🐟."},
    ],
    [
        {"role": "system", "content": "Be brief.\n\nReally."},
        {"role": "user", "content": "  spaces  "},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "<|im_start|> inside text"},
    ],
]


@pytest.mark.parametrize("conv", CONVERSATIONS, ids=lambda c: f"{len(c)}msgs")
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(ours, reference, conv, add_generation_prompt):
    want = reference.apply_chat_template(
        conv, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert ours.apply_chat_template(conv, add_generation_prompt) == want


# Templates using the jinja features real chat templates rely on (trim/lstrip blocks, loop
# controls, tojson, bos_token, raise_exception), rendered by transformers as the reference.
FEATURE_TEMPLATES = [
    "{{ bos_token }}{% for m in messages %}\n  {% if m['role'] == 'system' %}{% continue %}"
    "{% endif %}\n  [{{ m['role'] | upper }}] {{ m['content'] | trim }}\n{% endfor %}"
    "{% if add_generation_prompt %}[ASSISTANT]{% endif %}",
    "{% for m in messages %}{{ m | tojson }}{% if loop.index == 2 %}{% break %}{% endif %}"
    "{% endfor %}{{ eos_token }}",
    "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + m['content']"
    " | length %}{% endfor %}total={{ ns.n }}",
]


@pytest.mark.parametrize("template", FEATURE_TEMPLATES, ids=["loopctl", "tojson", "namespace"])
def test_template_features_match_transformers(ours, reference, template):
    for conv in CONVERSATIONS:
        want = reference.apply_chat_template(
            conv, chat_template=template, tokenize=False, add_generation_prompt=True
        )
        assert ours.apply_chat_template(conv, template=template) == want


def test_template_raise_exception_is_a_request_error():
    tpl = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}"
    with pytest.raises(InvalidRequestError, match="user first"):
        render_chat_template(tpl, [{"role": "assistant", "content": "x"}])


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],  # OpenAI content parts
        [{"role": "user", "content": 5}],
        [{"content": "no role"}],
    ],
    ids=["content-parts", "number", "no-role"],
)
def test_malformed_messages_are_request_errors(ours, messages):
    with pytest.raises(InvalidRequestError, match="chat template rejected the messages"):
        ours.apply_chat_template(messages)
