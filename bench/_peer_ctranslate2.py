"""Peer: CTranslate2 (int8 by default) on the transformers export of the same GGUF. Peer venv only.

    python _peer_ctranslate2.py convert --gguf M.gguf --models-dir D   (cached; no-op when present)
    python _peer_ctranslate2.py bench   --gguf M.gguf --models-dir D [--n-prompt 512 ...]
    python _peer_ctranslate2.py nll     --gguf M.gguf --models-dir D --text-file F [--n-tokens 960 --ctx 512 --chunks 20]

The model is converted once, GGUF -> transformers fp32 export (`D/<stem>-hf`) -> CTranslate2
(`D/<stem>-ct2-<quantization>`); later runs reuse it. Timings mirror _peer_transformers.py:
- prefill: `generate_batch` of one `n_prompt`-token prompt with max_length=1, after a warm-up.
- decode: `generate_tokens` of `n_gen` greedy tokens (min_length = n_gen) after a 16-token prompt,
  counting tokens 2..n_gen between the first and last step (prefill excluded).
- batch: `batch` different `n_prompt_batch`-token prompts, `n_gen` new tokens each;
  `batch_tok_s` includes prefill, `batch_decode_tok_s` excludes it (timed from the step callback).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from _peer_common import (
    Clock,
    emit,
    peak_rss_mb,
    ppl_chunks,
    read_text,
    rss_mb,
    set_threads_env,
    summarize_nll,
    token_windows,
)

DECODE_PROMPT_TOKENS = 16


def model_dirs(gguf: Path, models_dir: Path, quantization: str) -> tuple[Path, Path]:
    """(transformers export dir, CTranslate2 dir) for this GGUF, keyed by name and size."""
    key = f"{gguf.stem}-{gguf.stat().st_size}"
    return models_dir / f"{key}-hf", models_dir / f"{key}-ct2-{quantization}"


def convert(args: argparse.Namespace) -> dict:
    gguf, models = Path(args.gguf), Path(args.models_dir)
    hf_dir, ct2_dir = model_dirs(gguf, models, args.quantization)
    res: dict = {"peer": "ctranslate2", "ct2_dir": str(ct2_dir), "converted": False}
    if (ct2_dir / "model.bin").is_file():
        return res
    models.mkdir(parents=True, exist_ok=True)
    if not (hf_dir / "config.json").is_file():
        # A separate process, so the fp32 transformers model's memory is gone before converting.
        here = Path(__file__).resolve().parent
        cmd = [sys.executable, str(here / "_peer_transformers.py"), "export", "--gguf", str(gguf)]
        subprocess.run(cmd + ["--out", str(hf_dir), "--threads", str(args.threads)], check=True)
    import ctranslate2

    tmp = ct2_dir.with_name(ct2_dir.name + ".tmp")
    with Clock() as c:
        conv = ctranslate2.converters.TransformersConverter(str(hf_dir), low_cpu_mem_usage=True)
        conv.convert(str(tmp), quantization=args.quantization, force=True)
    tmp.rename(ct2_dir)
    res.update(converted=True, convert_s=round(c.seconds, 2))
    return res


def load(args: argparse.Namespace):
    """(generator, HF tokenizer, load seconds, conversion info)."""
    conv = convert(args)
    import ctranslate2
    from transformers import AutoTokenizer

    hf_dir, ct2_dir = model_dirs(Path(args.gguf), Path(args.models_dir), args.quantization)
    with Clock() as c:
        gen = ctranslate2.Generator(
            str(ct2_dir),
            device="cpu",
            compute_type=args.quantization,
            inter_threads=1,
            intra_threads=args.threads,
        )
    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    return gen, tok, c.seconds, conv


def _pieces(tok, ids: list[int]) -> list[str]:
    return tok.convert_ids_to_tokens(ids)


def bench(args: argparse.Namespace) -> dict:
    import ctranslate2

    gen, tok, load_s, conv = load(args)
    res: dict = {
        "peer": "ctranslate2",
        "ctranslate2": ctranslate2.__version__,
        "compute_type": args.quantization,
        "threads": args.threads,
        "load_s": round(load_s, 3),
        "rss_after_load_mb": round(rss_mb(), 1),
        **{k: v for k, v in conv.items() if k != "peer"},
    }
    ids = tok(read_text(args.text_file)[:200_000], add_special_tokens=False)["input_ids"]

    # Prefill: one prompt, one generated token.
    prompt = _pieces(tok, token_windows(ids, args.n_prompt, 1)[0])
    kw = dict(include_prompt_in_result=False, sampling_topk=1)
    gen.generate_batch([prompt], max_length=1, **kw)  # warm-up
    with Clock() as c:
        gen.generate_batch([prompt], max_length=1, **kw)
    res.update(n_prompt=args.n_prompt, prefill_s=round(c.seconds, 4))
    res["prefill_tok_s"] = round(args.n_prompt / c.seconds, 2)

    # Single-stream decode.
    short = _pieces(tok, ids[:DECODE_PROMPT_TOKENS])
    for _ in gen.generate_tokens(short, max_length=8, min_length=8, sampling_topk=1):
        pass  # warm-up
    times = []
    t0 = time.perf_counter()
    for _ in gen.generate_tokens(
        short, max_length=args.n_gen, min_length=args.n_gen, sampling_topk=1
    ):
        times.append(time.perf_counter())
    assert len(times) == args.n_gen, (len(times), args.n_gen)
    res.update(n_gen=len(times), decode_prompt_tokens=DECODE_PROMPT_TOKENS)
    res["decode_tok_s"] = round((len(times) - 1) / (times[-1] - times[0]), 2)
    res["decode_wall_tok_s"] = round(len(times) / (times[-1] - t0), 2)

    # Batch: different prompts of equal length, exactly n_gen new tokens each.
    if args.batch > 0:
        prompts = [_pieces(tok, w) for w in token_windows(ids, args.n_prompt_batch, args.batch)]
        steps: list[tuple[int, float]] = []

        def on_step(step) -> bool:
            steps.append((step.step, time.perf_counter()))
            return False

        with Clock() as c:
            out = gen.generate_batch(
                prompts, max_length=args.n_gen, min_length=args.n_gen, callback=on_step, **kw
            )
        n_new = [len(r.sequences_ids[0]) for r in out]
        assert all(n == args.n_gen for n in n_new), n_new
        t_first = max(t for s, t in steps if s == 0)
        t_last = max(t for _, t in steps)
        res.update(
            batch=args.batch, n_prompt_batch=args.n_prompt_batch, batch_s=round(c.seconds, 3)
        )
        res["batch_tok_s"] = round(args.batch * args.n_gen / c.seconds, 2)
        res["batch_decode_tok_s"] = round(args.batch * (args.n_gen - 1) / (t_last - t_first), 2)
    res["peak_rss_mb"] = round(peak_rss_mb(), 1)
    return res


def nll(args: argparse.Namespace) -> dict:
    """Mean NLL of tokens 2..n of the first `n_tokens` tokens of the text, in one window; plus,
    when `chunks` > 0, the llama-perplexity protocol (see `_peer_common.ppl_chunks`)."""
    gen, tok, _, _ = load(args)
    ids = tok(read_text(args.text_file)[:200_000], add_special_tokens=False)["input_ids"]

    def token_nll(window: list[int]) -> list[float]:  # NLL of tokens 2..T
        (r,) = gen.score_batch([_pieces(tok, window)], max_input_length=0)
        return [-lp for lp in r.log_probs]

    window = ids[: args.n_tokens]
    first = args.ctx // 2
    chunk_nlls = []
    for c in ppl_chunks(ids, args.ctx, args.chunks):
        scored = token_nll(c)[first:]
        chunk_nlls.append(sum(scored) / len(scored))
    w = token_nll(window)
    res = summarize_nll(sum(w) / len(w), len(window), chunk_nlls, args.ctx)
    return {"peer": "ctranslate2", "compute_type": args.quantization, **res}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("mode", choices=["convert", "bench", "nll"])
    p.add_argument("--gguf", required=True)
    p.add_argument("--models-dir", required=True)
    p.add_argument("--quantization", default="int8")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--text-file", default=None)
    p.add_argument("--n-prompt", type=int, default=512)
    p.add_argument("--n-gen", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--n-prompt-batch", type=int, default=128)
    p.add_argument("--n-tokens", type=int, default=960)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--chunks", type=int, default=0)
    args = p.parse_args()
    set_threads_env(args.threads)
    emit({"convert": convert, "bench": bench, "nll": nll}[args.mode](args))


if __name__ == "__main__":
    main()
