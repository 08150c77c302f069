"""Coverage-guided fuzzing (atheris, libFuzzer) of the GGUF reader and loader.

Every input is written to a file and opened the way `miaotui serve` opens a model: the header
(load/gguf_parse.py), the checkpoint (config, tensor table, completeness and shape checks), the
tokenizer, and every tensor decoded to float. The one accepted failure is a MiaotuiError;
any other exception, a hang (-timeout) or an RSS beyond -rss_limit_mb is a crash, and libFuzzer
writes the input that caused it to --out. Seeds: a tiny valid llama GGUF written by
gguf.GGUFWriter (random weights, a 16-token byte-level tokenizer) and, once run, the corpus
grown in --out.

    .venv/bin/python bench/fuzz_gguf.py                   # 10 minutes
    .venv/bin/python bench/fuzz_gguf.py --seconds 30 --out /tmp/fuzz

Prints JSON: seconds, inputs executed, corpus size, crashes (and their files). Not a test (the
tests run it for a few seconds: tests/load/test_gguf_fuzz.py).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
TINY_VOCAB = 16
TINY_DIM = 8
MAX_INPUT_BYTES = 8192  # the seed is ~2.5 kB; mutations may double it, no more


def write_seed_model(path: Path, seed: int = 0) -> Path:
    """A tiny valid llama GGUF (F32 and Q8_0 tensors, byte-level tokenizer) written with the
    `gguf` package's writer, the independent producer of the seed."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(seed)
    dim, ffn, vocab = TINY_DIM, 32, TINY_VOCAB
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(dim)
    w.add_feed_forward_length(ffn)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    letters = [chr(ord("a") + i) for i in range(vocab - 2)]
    w.add_token_list([*letters, "ab", "<|endoftext|>"])
    w.add_token_types([1] * (vocab - 1) + [3])
    w.add_token_merges(["a b"])
    w.add_eos_token_id(vocab - 1)

    def tensor(name: str, *shape: int) -> None:
        w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))

    tensor("token_embd.weight", vocab, dim)
    tensor("output_norm.weight", dim)
    tensor("blk.0.attn_norm.weight", dim)
    tensor("blk.0.attn_q.weight", dim, dim)
    tensor("blk.0.attn_k.weight", dim // 2, dim)
    tensor("blk.0.attn_v.weight", dim // 2, dim)
    tensor("blk.0.attn_output.weight", dim, dim)
    tensor("blk.0.ffn_norm.weight", dim)
    tensor("blk.0.ffn_gate.weight", ffn, dim)
    tensor("blk.0.ffn_up.weight", ffn, dim)
    q8 = gguf.GGMLQuantizationType.Q8_0
    down = gguf.quants.quantize(rng.standard_normal((dim, ffn)).astype(np.float32), q8)
    w.add_tensor("blk.0.ffn_down.weight", down, raw_shape=down.shape, raw_dtype=q8)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def load_model_file(path: Path) -> None:
    """Open `path` as `miaotui serve` would, short of building the model: header, checkpoint,
    tokenizer, every tensor decoded. Raises MiaotuiError for a bad file, nothing else."""
    from miaotui.load.open import load_tokenizer, open_checkpoint

    ckpt = open_checkpoint(str(path))
    tokenizer = load_tokenizer(ckpt)
    tokenizer.decode(tokenizer.encode("ab<|endoftext|>"))
    for t in ckpt.tensors.values():
        t.to_float()


def fuzz_one(data: bytes, path: Path) -> None:
    from miaotui.errors import MiaotuiError

    path.write_bytes(data)
    try:
        load_model_file(path)
    except MiaotuiError as e:
        if not str(e):
            raise AssertionError(f"{type(e).__name__} without a message") from e


def run_child(corpus: Path, out: Path, libfuzzer_args: list[str]) -> None:
    """The libFuzzer process: instrumented miaotui.load, one scratch file, never returns."""
    import atheris

    with atheris.instrument_imports(include=["miaotui"]):
        import miaotui.load.gguf_file  # noqa: F401
        import miaotui.load.gguf_parse  # noqa: F401
        import miaotui.load.open  # noqa: F401
        import miaotui.load.quants  # noqa: F401
        import miaotui.tokenizer  # noqa: F401
    scratch = Path(tempfile.mkdtemp(prefix="miaotui-fuzz-")) / "input.gguf"
    argv = [sys.argv[0], *libfuzzer_args, f"-artifact_prefix={out}/", str(corpus)]
    atheris.Setup(argv, lambda data: fuzz_one(data, scratch))
    atheris.Fuzz()


def fuzz(seconds: float, out: Path, rss_limit_mb: int = 2048, seed: int | None = None) -> dict:
    """Run libFuzzer for `seconds` in a child process; its corpus and crashes go to `out`.
    `seed` fixes libFuzzer's random seed (None: a new one each run)."""
    corpus = out / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    if not any(corpus.iterdir()):
        write_seed_model(corpus / "seed-tiny-llama.gguf")
    args = [
        f"-max_total_time={max(1, int(seconds))}",
        f"-max_len={MAX_INPUT_BYTES}",
        "-timeout=10",
        f"-rss_limit_mb={rss_limit_mb}",
        "-print_final_stats=1",
    ]
    if seed is not None:
        args.append(f"-seed={seed}")
    cmd = [sys.executable, __file__, "--child", "--corpus", str(corpus), "--out", str(out)]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd + ["--", *args], capture_output=True, text=True, env=env)
    log = proc.stderr
    (out / "fuzz.log").write_text(log)
    crashes = sorted(str(p) for p in out.glob("*") if p.name.startswith(("crash-", "timeout-")))
    crashes += sorted(str(p) for p in out.glob("oom-*"))
    execs = re.search(r"stat::number_of_executed_units:\s*(\d+)", log)
    return {
        "seconds": seconds,
        "returncode": proc.returncode,
        "executions": int(execs.group(1)) if execs else None,
        "corpus_files": len(list(corpus.iterdir())),
        "crashes": len(crashes),
        "crash_files": crashes,
        "crash_errors": [_replay(Path(c)) for c in crashes if Path(c).name.startswith("crash-")],
        "log_tail": log[-3000:] if proc.returncode else "",
    }


def _replay(path: Path) -> str:
    """What loading a crash input raises (libFuzzer keeps the input, not the traceback)."""
    from miaotui.errors import MiaotuiError

    copy = Path(tempfile.mkdtemp(prefix="miaotui-replay-")) / "input.gguf"
    copy.write_bytes(path.read_bytes())
    try:
        load_model_file(copy)
    except MiaotuiError as e:
        return f"{type(e).__name__} (accepted now): {e}"[:300]
    except BaseException as e:  # what the crash was
        return f"{type(e).__name__}: {e}"[:300]
    return "no error on replay"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=600)
    p.add_argument("--out", type=Path, default=BENCH_DIR / "out" / "fuzz_gguf")
    p.add_argument("--rss-limit-mb", type=int, default=2048)
    p.add_argument("--seed", type=int, default=None, help="libFuzzer's seed (default: random)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--corpus", type=Path, help=argparse.SUPPRESS)
    a, rest = p.parse_known_args()
    if a.child:
        run_child(a.corpus, a.out, [r for r in rest if r != "--"])
        return
    a.out.mkdir(parents=True, exist_ok=True)
    print(json.dumps(fuzz(a.seconds, a.out.resolve(), a.rss_limit_mb, a.seed), indent=1))


if __name__ == "__main__":
    main()
