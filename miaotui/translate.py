"""Document translation on the engine: the text is split into paragraphs of sentences, every
sentence becomes one request and all of them are submitted at once, so continuous batching
translates them together; the answers are put back in their paragraphs.

Chat models (a chat template in the tokenizer) get an instruction; base models (Gemma 3 270M)
a few-shot prompt of example pairs that ends where the translation starts.

`miaotui translate --to fr FILE|TEXT` is registered here too (cli.py calls `register`)."""

from __future__ import annotations

import argparse
import re
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from miaotui.errors import InvalidRequestError
from miaotui.sampling_params import SamplingParams

LANGUAGES = {"fr": "French", "de": "German", "es": "Spanish", "it": "Italian", "pt": "Portuguese"}
STYLES = ("auto", "chat", "few-shot")
MAX_SENTENCES = 200
"""One document's bound: each sentence is a request in the engine's queue, which holds 256 by
default (SchedulerConfig.max_waiting); longer documents go in several calls."""
MIN_TOKENS = 16
"""Tokens a translation may take beyond twice its source's."""
MAX_NUM_SEQS, MAX_NUM_BATCHED_TOKENS, BLOCK_SIZE = 64, 256, 1
"""`miaotui translate`'s engine (bench_translate's too): a document's sentences run together;
256-token steps ran 5-10 % faster than 128 here; the instruction every sentence shares (119
tokens for SmolLM2 into French) is a prefix-cache hit in whole blocks only, so with 16-token
blocks each sentence recomputes 7 of its tokens (a fifth of the batch's prompt work), with 4
blocks 3 (batched 4 % slower than with 1-token blocks, which recompute none). The native step
gives the same tokens whatever the block size."""
LOOP_COPIES, LOOP_SPAN, LOOP_UNIT = 3, 24, 24
"""A translation that repeats a piece of text of u <= LOOP_UNIT characters, in a row, at least
max(LOOP_COPIES, LOOP_SPAN / u) times is babbling (small models fall into such loops): it ends
after the piece's first copy. A sentence rarely repeats 8 characters three times in a row."""

# Example pairs of the few-shot prompt, one list per target language.
_EXAMPLE_SOURCES = (
    "The weather is nice today.",
    "Where is the train station?",
    "I have read this book twice, and I liked it.",
)
FEW_SHOT = {
    "fr": ("Il fait beau aujourd'hui.", "Où est la gare ?", "J'ai lu ce livre deux fois, et je l'ai aimé."),
    "de": ("Das Wetter ist heute schön.", "Wo ist der Bahnhof?", "Ich habe dieses Buch zweimal gelesen, und es hat mir gefallen."),
    "es": ("Hace buen tiempo hoy.", "¿Dónde está la estación de tren?", "He leído este libro dos veces y me gustó."),
    "it": ("Oggi il tempo è bello.", "Dov'è la stazione ferroviaria?", "Ho letto questo libro due volte e mi è piaciuto."),
    "pt": ("O tempo está bom hoje.", "Onde fica a estação de trem?", "Eu li este livro duas vezes e gostei."),
}  # fmt: skip

# A sentence ends at . ! ? (and closing quotes) before whitespace and a capital, a quote or a
# digit, unless the word before is a title such as "Mr.".
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"'”’)\]]*\s+(?=[\"'“‘(\[]?[A-Z0-9])")
_TITLES = re.compile(r"\b(Mr|Mrs|Ms|Dr|St|Prof|Sr|Jr|vs|etc|e\.g|i\.e)\.$")


@dataclass(frozen=True)
class TranslationConfig:
    target: str
    """Target language code (a key of LANGUAGES)."""
    style: str = "auto"
    """Prompt: chat (instruction), few-shot (base models) or auto (chat if there is a template)."""
    max_tokens: int = 160
    """Tokens at most per translated sentence."""

    def __post_init__(self) -> None:
        if self.target not in LANGUAGES:
            known = ", ".join(f"{k} ({v})" for k, v in LANGUAGES.items())
            raise InvalidRequestError(
                f"unknown target language {self.target!r}; known: {known}", "target_language"
            )
        if self.style not in STYLES:
            raise InvalidRequestError(
                f"unknown prompt style {self.style!r}; use one of {', '.join(STYLES)}", "style"
            )
        if self.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be >= 1, got {self.max_tokens}")


@dataclass(frozen=True)
class Document:
    paragraphs: tuple[tuple[str, ...], ...]
    """Paragraphs (split at blank lines), each a tuple of sentences."""

    @property
    def sentences(self) -> list[str]:
        return [s for p in self.paragraphs for s in p]

    def assemble(self, translations: list[str]) -> str:
        """The translated sentences (in `sentences` order) back in their paragraphs."""
        assert len(translations) == len(self.sentences)
        it = iter(translations)
        return "\n\n".join(" ".join(next(it) for _ in p) for p in self.paragraphs)


@dataclass(frozen=True)
class Translation:
    text: str
    sentences: int
    seconds: float


def split_document(text: str) -> Document:
    """Paragraphs at blank lines, sentences inside them; lines of a paragraph are joined."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", text.strip()):
        flat = " ".join(block.split())
        if flat:
            paragraphs.append(tuple(split_sentences(flat)))
    doc = Document(tuple(paragraphs))
    if not doc.sentences:
        raise InvalidRequestError("nothing to translate: the text is empty", "text")
    if len(doc.sentences) > MAX_SENTENCES:
        raise InvalidRequestError(
            f"the text has {len(doc.sentences)} sentences; at most {MAX_SENTENCES} per call",
            "text",
        )
    return doc


def split_sentences(paragraph: str) -> list[str]:
    pieces, start = [], 0
    for m in _SENTENCE_END.finditer(paragraph):
        head = paragraph[start : m.start()]
        if _TITLES.search(head):
            continue
        pieces.append(paragraph[start : m.start()].strip())
        start = m.end()
    pieces.append(paragraph[start:].strip())
    return [p for p in pieces if p]


def resolve_style(tokenizer, style: str) -> str:
    if style != "auto":
        return style
    return "chat" if tokenizer.info.chat_template else "few-shot"


def sentence_prompt(sentence: str, tokenizer, config: TranslationConfig) -> str:
    language = LANGUAGES[config.target]
    shots = list(zip(_EXAMPLE_SOURCES, FEW_SHOT[config.target]))
    if resolve_style(tokenizer, config.style) == "chat":
        # The instruction, then the example pairs as earlier turns: small chat models then
        # answer with the translation alone instead of talking about it.
        system = f"You translate English into {language}. Reply with the {language} text only."
        messages = [{"role": "system", "content": system}]
        for en, tr in shots:
            messages += [{"role": "user", "content": en}, {"role": "assistant", "content": tr}]
        messages.append({"role": "user", "content": sentence})
        return tokenizer.apply_chat_template(messages)
    lines = [f"English: {en}\n{language}: {tr}\n" for en, tr in shots]
    return "\n".join(lines) + f"\nEnglish: {sentence}\n{language}:"


def sentence_prompts(sentences: list[str], tokenizer, config: TranslationConfig) -> list[str]:
    """`sentence_prompt` of each sentence. The prompt is built once around a placeholder and
    the sentences put in its place, when that gives the first sentence's prompt exactly: a chat
    template is compiled anew on every render (40 renders took 70 ms, 4 % of a batched document)."""
    first = sentence_prompt(sentences[0], tokenizer, config)
    if len(sentences) == 1:
        return [first]
    head, found, tail = sentence_prompt(_PLACEHOLDER, tokenizer, config).partition(_PLACEHOLDER)
    if not found or _PLACEHOLDER in tail or head + sentences[0] + tail != first:
        return [first] + [sentence_prompt(s, tokenizer, config) for s in sentences[1:]]
    return [first] + [head + s + tail for s in sentences[1:]]


_PLACEHOLDER = "\ue000sentence\ue000"  # a private-use character: in no text to translate


def sampling_params(sentence: str, tokenizer, config: TranslationConfig) -> SamplingParams:
    """Greedy, one line (a few-shot prompt would go on with the next example pair), and at most
    twice the source's tokens plus a few: a translation is rarely longer, and a model that
    babbles would otherwise keep the whole batch waiting for its last request."""
    source = len(tokenizer.encode(sentence, add_special=False))
    limit = min(config.max_tokens, 2 * source + MIN_TOKENS)
    return SamplingParams(max_tokens=limit, temperature=0.0, stop=("\n",))


def clean_output(text: str) -> str:
    """The translation alone: its first line up to a loop (`loop_cut`), surrounding whitespace
    and quotes removed. The cut depends only on the text up to the loop's last copy, so a
    request stopped there (translate_sentences) and one that ran on give the same line."""
    line = text.lstrip().split("\n")[0]
    cut = loop_cut(line)
    line = line.strip() if cut is None else line[:cut].rstrip(" ,;:")
    if len(line) > 1 and line[0] == line[-1] and line[0] in "\"'":
        line = line[1:-1].strip()
    return line


def _loop_patterns() -> list[tuple[int, int]]:
    """(unit length, copies in a row that make a loop) for every unit length."""
    return [(u, max(LOOP_COPIES, -(-LOOP_SPAN // u))) for u in range(1, LOOP_UNIT + 1)]


_LOOPS = [(u, c, re.compile(f"(.{{{u}}})\\1{{{c - 1}}}", re.S)) for u, c in _loop_patterns()]
_ANY_LOOP = re.compile(  # one search for all unit lengths; group i + 1 is unit length i + 1's
    "|".join(f"(.{{{u}}})\\{i + 1}{{{c - 1}}}" for i, (u, c) in enumerate(_loop_patterns())),
    re.S,
)
_LOOP_WINDOW = max(u * c for u, c in _loop_patterns())
"""The longest loop in characters: a loop ending in new text starts at most this far back."""


def loop_cut(line: str) -> int | None:
    """Where a babbling line ends: after the first copy of the run of repeated copies that is
    complete first (then on to the next space within one more copy, so words stay whole); None
    if the line does not loop. For a fixed unit length every run has the same length, so the
    leftmost run is also the first complete one."""
    best = None  # (end of the run, cut)
    for u, copies, pattern in _LOOPS:
        m = pattern.search(line)
        if m and (best is None or m.start() + u * copies < best[0]):
            cut = m.start() + u
            space = line.find(" ", cut, cut + u)
            best = (m.start() + u * copies, cut if space < 0 else space)
    return None if best is None else best[1]


def translate_sentences(llm, sentences: list[str], config: TranslationConfig) -> list[str]:
    """Every sentence submitted to the `LLM`'s engine at once (one continuous batch), after
    their shared instruction; the translations in order. The longest sentences go first, so the
    longest translations are not the last ones left running in a small batch; a translation
    that falls into a loop (`loop_cut`) is stopped there."""
    tok, engine = llm.tokenizer, llm.engine
    prompts = [tok.encode(p) for p in sentence_prompts(sentences, tok, config)]
    shared = shared_prefix(prompts)
    if len(prompts) > 1 and shared:
        llm.generate([shared], SamplingParams(max_tokens=1))  # computed once, then cached
    params = [sampling_params(s, tok, config) for s in sentences]
    order = sorted(range(len(sentences)), key=lambda i: -len(prompts[i]))
    ids: dict[str, int] = {}
    texts = [""] * len(sentences)
    checked: dict[str, int] = {}  # characters of a request's line already searched for loops
    try:
        for i in order:
            ids[engine.add_request(prompts[i], params[i])] = i
        while engine.has_unfinished():
            for o in engine.step():
                if o.request_id not in ids:  # someone else's request on the same engine
                    continue
                texts[ids[o.request_id]] = o.text
                if not o.finished and _looping(o.text, checked, o.request_id):
                    engine.abort(o.request_id)
    except BaseException:
        for rid in ids:
            engine.abort(rid)
        raise
    return [clean_output(t) for t in texts]


def _looping(text: str, checked: dict[str, int], request_id: str) -> bool:
    """Whether the request's line now loops; only the text new since the last look (and one
    loop's length before it) is searched."""
    line = text.lstrip().split("\n")[0]
    start = checked.get(request_id, 0)
    checked[request_id] = len(line)
    return _ANY_LOOP.search(line, max(0, start - _LOOP_WINDOW)) is not None


def shared_prefix(prompts: list[list[int]]) -> list[int]:
    """The tokens every prompt starts with (the instruction and the examples). Computed once
    before the batch, they are prefix-cache hits for all of its requests; submitted together
    cold, each request would compute them again (a block is cached once it is computed)."""
    first = prompts[0]
    n = min(len(p) for p in prompts)
    for p in prompts[1:]:
        n = next((i for i in range(n) if p[i] != first[i]), n)
    return first[:n]


def translate_with_llm(llm, text: str, config: TranslationConfig) -> Translation:
    doc = split_document(text)
    start = time.perf_counter()
    translations = translate_sentences(llm, doc.sentences, config)
    seconds = time.perf_counter() - start
    return Translation(doc.assemble(translations), len(translations), seconds)


# ---- the command line --------------------------------------------------------------------------


def register(sub) -> None:
    from miaotui.cli_args import add_engine_args

    p = sub.add_parser("translate", help="translate a text file or text, sentences batched")
    add_engine_args(p)
    p.add_argument("source", nargs="*", help="a text file, or the text itself (stdin if none)")
    p.add_argument("--to", required=True, choices=sorted(LANGUAGES), help="target language")
    p.add_argument("--style", choices=STYLES, default="auto", help="prompt style")
    p.add_argument("--max-tokens", type=int, default=160, help="per sentence")
    p.add_argument("--block-size", type=int, default=BLOCK_SIZE, help="tokens per KV block")
    p.set_defaults(
        func=cmd_translate,
        max_num_seqs=MAX_NUM_SEQS,
        max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS,
    )


def read_source(source: list[str]) -> str:
    if not source:
        return sys.stdin.read()
    if len(source) == 1 and Path(source[0]).is_file():
        return Path(source[0]).read_text(encoding="utf-8", errors="replace")
    return " ".join(source)


def cmd_translate(a: argparse.Namespace) -> None:
    from miaotui.cli_args import engine_config
    from miaotui.llm import LLM

    config = TranslationConfig(a.to, a.style, a.max_tokens)  # bad values fail before the load
    text = read_source(a.source)
    split_document(text)
    cfg = engine_config(a)
    llm = LLM(replace(cfg, cache=replace(cfg.cache, block_size=a.block_size)))
    out = translate_with_llm(llm, text, config)
    print(out.text)
    rate = out.sentences / out.seconds if out.seconds > 0 else float("nan")
    print(
        f"miaotui: {out.sentences} sentences in {out.seconds:.1f} s ({rate:.1f} sentences/s)",
        file=sys.stderr,
    )
