"""Text <-> token ids: a real BPE tokenizer (the `tokenizers` library) built from GGUF metadata
or a HF tokenizer.json, the chat template rendered with jinja2 as transformers does, an
incremental detokenizer that never emits broken UTF-8, and stop-string matching."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from miaotui.errors import ModelFormatError, UnsupportedModelError

# llama.cpp's pre-tokenizer regexes by `tokenizer.ggml.pre` (llama-vocab.cpp).
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_SPLITS: dict[str, list[str]] = {
    "default": [GPT2_SPLIT],
    "gpt2": [GPT2_SPLIT],
    "smollm": [r"\p{N}", GPT2_SPLIT],  # digits one by one, then GPT-2
    "llama3": [LLAMA3_SPLIT],
    "llama-bpe": [LLAMA3_SPLIT],
    "qwen2": [QWEN2_SPLIT],
    "deepseek-r1-qwen": [QWEN2_SPLIT],
}
# Control tokens that end a turn in common chat formats (llama.cpp treats them as end-of-generation).
END_OF_TURN = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "</s>")
TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED = 3, 4


@dataclass
class TokenizerInfo:
    bos_id: int | None
    eos_id: int | None
    add_bos: bool
    chat_template: str | None
    stop_ids: frozenset[int] = field(default_factory=frozenset)


class TextTokenizer:
    """Encode/decode plus chat template; built by `from_gguf_metadata` or `from_hf_dir`."""

    def __init__(self, tok: Tokenizer, info: TokenizerInfo):
        self.tok = tok
        self.info = info
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)

    @property
    def eos_id(self) -> int | None:
        return self.info.eos_id

    @property
    def stop_ids(self) -> frozenset[int]:
        """Ids that end generation: EOS and the end-of-turn control tokens of the vocabulary."""
        return self.info.stop_ids

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        """Special tokens written in `text` (e.g. <|im_start|>) are matched whole."""
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if add_special and self.info.add_bos and self.info.bos_id is not None:
            if not ids or ids[0] != self.info.bos_id:
                ids = [self.info.bos_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special)

    def id_to_token(self, i: int) -> str | None:
        return self.tok.id_to_token(i)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        template: str | None = None,
    ) -> str:
        tpl = template or self.info.chat_template
        if tpl is None:
            raise UnsupportedModelError("this model has no chat template; use generate() instead")
        special = {
            "bos_token": self._token_text(self.info.bos_id),
            "eos_token": self._token_text(self.info.eos_id),
        }
        return render_chat_template(tpl, messages, add_generation_prompt, **special)

    def _token_text(self, i: int | None) -> str:
        return "" if i is None else (self.tok.id_to_token(i) or "")

    # --- construction -------------------------------------------------------------------------

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any]) -> TextTokenizer:
        kind = meta.get("tokenizer.ggml.model")
        tokens = meta.get("tokenizer.ggml.tokens")
        if not tokens:
            raise ModelFormatError("GGUF file has no tokenizer.ggml.tokens")
        types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        if kind == "gpt2":
            tok = _byte_level_bpe(
                tokens,
                meta.get("tokenizer.ggml.merges") or [],
                meta.get("tokenizer.ggml.pre") or "default",
            )
        elif kind == "llama":
            tok = _sentencepiece_bpe(
                tokens,
                meta.get("tokenizer.ggml.scores"),
                bool(meta.get("tokenizer.ggml.add_space_prefix", True)),
                meta.get("general.architecture", ""),
            )
        else:
            raise UnsupportedModelError(
                f"tokenizer model {kind!r} is not supported; supported: gpt2 (BPE), llama (SPM)"
            )
        _add_special_tokens(tok, tokens, types)
        bos, eos = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
        add_bos = meta.get("tokenizer.ggml.add_bos_token")
        info = TokenizerInfo(
            bos_id=bos,
            eos_id=eos,
            add_bos=bool(add_bos) if add_bos is not None else kind == "llama",
            chat_template=meta.get("tokenizer.chat_template"),
            stop_ids=_stop_ids(tokens, types, eos),
        )
        return cls(tok, info)

    @classmethod
    def from_hf_dir(cls, path: Path) -> TextTokenizer:
        file = path / "tokenizer.json"
        if not file.is_file():
            raise ModelFormatError(f"{path} has no tokenizer.json")
        tok = Tokenizer.from_file(str(file))
        cfg_file = path / "tokenizer_config.json"
        cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}

        def tid(key: str) -> int | None:
            t = cfg.get(key)
            t = t.get("content") if isinstance(t, dict) else t
            return tok.token_to_id(t) if t else None

        eos = tid("eos_token")
        specials = [tok.token_to_id(c) for c in END_OF_TURN if tok.token_to_id(c) is not None]
        info = TokenizerInfo(
            bos_id=tid("bos_token"),
            eos_id=eos,
            add_bos=bool(cfg.get("add_bos_token", False)),
            chat_template=cfg.get("chat_template"),
            stop_ids=frozenset(([eos] if eos is not None else []) + specials),
        )
        # tokenizer.json may add BOS itself through its post-processor; we add it explicitly.
        tok.post_processor = None
        return cls(tok, info)


def _byte_level_bpe(tokens: list[str], merges: list[str], pre: str) -> Tokenizer:
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = Tokenizer(models.BPE(vocab, pairs, ignore_merges=pre in ("llama3", "llama-bpe")))
    splits = PRE_SPLITS.get(pre, PRE_SPLITS["default"])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(s), behavior="isolated") for s in splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece_bpe(
    tokens: list[str], scores: list[float] | None, add_space_prefix: bool, arch: str
) -> Tokenizer:
    """SentencePiece BPE vocabularies (llama 2, gemma) as a `tokenizers` BPE with byte fallback.
    GGUF stores no merges for these: rebuild them from the vocabulary, best merged token first
    (by score; gemma's scores do not follow its merge order, its file order does)."""
    if arch.startswith("gemma") or scores is None:
        rank = {t: i for i, t in enumerate(tokens)}
    else:
        rank = {t: -s for t, s in zip(tokens, scores)}
    # Gemma stores runs of spaces as real spaces; the model sees them as "▁" runs.
    tokens = ["\u2581" * len(t) if t and not t.strip(" ") else t for t in tokens]
    rank = {("\u2581" * len(t) if t and not t.strip(" ") else t): r for t, r in rank.items()}
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for t in tokens:
        if len(t) < 2:
            continue
        for cut in range(1, len(t)):
            left, right = t[:cut], t[cut:]
            if left in vocab and right in vocab:
                merges.append((rank[t], vocab[left], vocab[right], left, right))
    merges.sort()
    tok = Tokenizer(
        models.BPE(
            vocab,
            [(m[3], m[4]) for m in merges],
            unk_token="<unk>" if "<unk>" in vocab else None,
            byte_fallback=True,
            fuse_unk=True,
        )
    )
    norms = [normalizers.Replace(" ", "\u2581")]
    if add_space_prefix:
        norms.insert(0, normalizers.Prepend("\u2581"))
    tok.normalizer = normalizers.Sequence(norms)
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("\u2581", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
        ]
        + ([decoders.Strip(" ", 1, 0)] if add_space_prefix else [])
    )
    return tok


def _add_special_tokens(tok: Tokenizer, tokens: list[str], types: list[int]) -> None:
    control = [
        AddedToken(t, special=True, normalized=False)
        for t, ty in zip(tokens, types)
        if ty == TOKEN_TYPE_CONTROL
    ]
    user = [
        AddedToken(t, special=False, normalized=False)
        for t, ty in zip(tokens, types)
        if ty == TOKEN_TYPE_USER_DEFINED
    ]
    if control:
        tok.add_special_tokens(control)
    if user:
        tok.add_tokens(user)


def _stop_ids(tokens: list[str], types: list[int], eos: int | None) -> frozenset[int]:
    ids = {
        i
        for i, (t, ty) in enumerate(zip(tokens, types))
        if ty == TOKEN_TYPE_CONTROL and t in END_OF_TURN
    }
    if eos is not None:
        ids.add(eos)
    return frozenset(ids)


def render_chat_template(
    template: str, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **extra: Any
) -> str:
    """Render like transformers' `apply_chat_template`: sandboxed jinja2 with trim_blocks and
    lstrip_blocks, loop controls, `raise_exception`, `strftime_now` and a `tojson` filter."""
    from jinja2.exceptions import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def tojson(
        x: Any,
        ensure_ascii: bool = False,
        indent: int | None = None,
        separators: Any = None,
        sort_keys: bool = False,
    ) -> str:
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **extra
        )
    except (TemplateError, TypeError, ValueError) as e:
        # TypeError: a template doing `'...' + message['content']` on non-text content (a list
        # of OpenAI content parts, a number) is the caller's mistake, not a crash.
        from miaotui.errors import InvalidRequestError

        raise InvalidRequestError(f"chat template rejected the messages: {e}", "messages") from e


class IncrementalDetokenizer:
    """Turns a growing list of ids into text deltas; holds back bytes of an incomplete UTF-8
    character (decoded as U+FFFD) until the next token completes it (as vLLM does)."""

    def __init__(
        self,
        tokenizer: TextTokenizer,
        prompt_ids: list[int] | None = None,
        skip_special: bool = True,
    ):
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self.ids: list[int] = list(prompt_ids[-4:]) if prompt_ids else []
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""

    def add(self, token_id: int) -> str:
        """Append one id; returns the newly completed text (possibly "")."""
        self.ids.append(token_id)
        dec = self.tokenizer.decode
        prefix = dec(self.ids[self.prefix_offset : self.read_offset], self.skip_special)
        full = dec(self.ids[self.prefix_offset :], self.skip_special)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            self.text += delta
            return delta
        return ""


class StopStringMatcher:
    """Finds stop strings in streamed text; text that could still be the start of a stop string
    is held back so a client never sees part of one."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, delta: str) -> tuple[str, bool]:
        """Returns (text safe to emit, stopped)."""
        if not self.stops:
            return delta, False
        buf = self.pending + delta
        # Stop where the first stop string is complete (smallest end, then the longest one), so
        # the result does not depend on how the text was split into deltas.
        hits = [(i + len(s), i) for s in self.stops if (i := buf.find(s)) >= 0]
        if hits:
            _, start = min(hits)
            self.pending = ""
            return buf[:start], True
        hold = max((self._partial(buf, s) for s in self.stops), default=0)
        self.pending = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out

    @staticmethod
    def _partial(buf: str, stop: str) -> int:
        """Length of the longest suffix of buf that is a proper prefix of stop."""
        for n in range(min(len(stop) - 1, len(buf)), 0, -1):
            if buf.endswith(stop[:n]):
                return n
        return 0
