"""Peer: Hugging Face transformers on the same GGUF (dequantized to fp32). Runs in the peer venv.

    python _peer_transformers.py bench  --gguf M.gguf [--n-prompt 512 --n-gen 128 --batch 16 ...]
    python _peer_transformers.py nll    --gguf M.gguf --text-file F [--n-tokens 960 --ctx 512 --chunks 20]
    python _peer_transformers.py export --gguf M.gguf --out DIR   (save_pretrained, for CTranslate2)

Prints one JSON object on the last stdout line. Timings (2 threads unless told):
- prefill: one forward of an `n_prompt`-token prompt with `logits_to_keep=1` (as llama-bench's pp),
  after one warm-up forward of the same shape.
- decode: greedy `generate` of `n_gen` tokens (`min_new_tokens` = `n_gen`) after a 16-token prompt;
  the rate counts tokens 2..n_gen over the time between the first and the last new token, so the
  prefill is excluded (as llama-bench's tg).
- batch: `batch` different prompts of `n_prompt_batch` tokens, `n_gen` new tokens each;
  `batch_tok_s` = batch*n_gen / wall time including prefill, `batch_decode_tok_s` excludes it.
"""

from __future__ import annotations

import argparse
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


def load(gguf: Path, threads: int):
    """(model, tokenizer, load_seconds) for a GGUF file; the weights are dequantized to fp32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    with Clock() as c:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        model.eval()
    return model, tok, c.seconds


def text_ids(tok, text_file: str | None, max_chars: int = 200_000) -> list[int]:
    """Token ids of the prompt source text, without special tokens."""
    return tok(read_text(text_file)[:max_chars], add_special_tokens=False)["input_ids"]


class _StepTimes:
    """A generate() streamer that only records when each step's tokens arrive."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:  # first call: the prompt; then one call per generated step
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _generate(model, input_ids, n_gen: int, pad_id: int) -> tuple[float, list[float], int]:
    """Greedy generation of exactly n_gen tokens; returns (wall seconds, step times, new tokens)."""
    import torch

    timer = _StepTimes()
    with torch.inference_mode(), Clock() as c:
        out = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=n_gen,
            min_new_tokens=n_gen,
            do_sample=False,
            pad_token_id=pad_id,
            streamer=timer,
        )
    return c.seconds, timer.times, out.shape[1] - input_ids.shape[1]


def bench(args: argparse.Namespace) -> dict:
    import torch

    model, tok, load_s = load(Path(args.gguf), args.threads)
    rss_loaded = rss_mb()
    ids = text_ids(tok, args.text_file)
    pad_id = tok.eos_token_id if tok.eos_token_id is not None else 0
    res: dict = {
        "peer": "transformers",
        "transformers": __import__("transformers").__version__,
        "torch": torch.__version__,
        "dtype": "float32",
        "threads": torch.get_num_threads(),
        "load_s": round(load_s, 3),
        "rss_after_load_mb": round(rss_loaded, 1),
    }

    # Prefill: one forward, last logits only.
    prompt = torch.tensor([token_windows(ids, args.n_prompt, 1)[0]])
    with torch.inference_mode():
        model(prompt, logits_to_keep=1)  # warm-up
        with Clock() as c:
            model(prompt, logits_to_keep=1)
    res.update(n_prompt=args.n_prompt, prefill_s=round(c.seconds, 4))
    res["prefill_tok_s"] = round(args.n_prompt / c.seconds, 2)

    # Single-stream greedy decode after a short prompt.
    short = torch.tensor([ids[:DECODE_PROMPT_TOKENS]])
    _generate(model, short, 8, pad_id)  # warm-up of the generate path
    wall, times, n_new = _generate(model, short, args.n_gen, pad_id)
    assert n_new == args.n_gen, (n_new, args.n_gen)
    res.update(n_gen=n_new, decode_prompt_tokens=DECODE_PROMPT_TOKENS)
    res["decode_tok_s"] = round((n_new - 1) / (times[-1] - times[1]), 2)
    res["decode_wall_tok_s"] = round(n_new / wall, 2)

    # Batched generation: `batch` different prompts of equal length (no padding needed).
    if args.batch > 0:
        prompts = torch.tensor(token_windows(ids, args.n_prompt_batch, args.batch))
        wall, times, n_new = _generate(model, prompts, args.n_gen, pad_id)
        assert n_new == args.n_gen, (n_new, args.n_gen)
        res.update(batch=args.batch, n_prompt_batch=args.n_prompt_batch, batch_s=round(wall, 3))
        res["batch_tok_s"] = round(args.batch * n_new / wall, 2)
        res["batch_decode_tok_s"] = round(args.batch * (n_new - 1) / (times[-1] - times[1]), 2)
    res["peak_rss_mb"] = round(peak_rss_mb(), 1)
    return res


def nll(args: argparse.Namespace) -> dict:
    """Mean NLL of tokens 2..n of the first `n_tokens` tokens of the text, in one window; plus,
    when `chunks` > 0, the llama-perplexity protocol (see `_peer_common.ppl_chunks`)."""
    import torch

    model, tok, _ = load(Path(args.gguf), args.threads)
    ids = text_ids(tok, args.text_file)

    def token_nll(window: list[int]) -> torch.Tensor:  # (T-1,) NLL of tokens 2..T
        x = torch.tensor([window])
        with torch.inference_mode():
            logits = model(x).logits.float()
        return torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:], reduction="none")

    window = ids[: args.n_tokens]
    first = args.ctx // 2
    chunk_nlls = [
        token_nll(c)[first:].mean().item() for c in ppl_chunks(ids, args.ctx, args.chunks)
    ]
    res = summarize_nll(token_nll(window).mean().item(), len(window), chunk_nlls, args.ctx)
    return {"peer": "transformers", "dtype": "float32", **res}


def export(args: argparse.Namespace) -> dict:
    """save_pretrained() of the dequantized model + tokenizer (input of the CTranslate2 converter)."""
    model, tok, load_s = load(Path(args.gguf), args.threads)
    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    # transformers 5 tags GGUF-loaded models as "quantized" and refuses to save them, although the
    # weights are plain dequantized fp32 tensors: drop the tag.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return {"peer": "transformers", "export_dir": str(out), "load_s": round(load_s, 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("mode", choices=["bench", "nll", "export"])
    p.add_argument("--gguf", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--text-file", default=None)
    p.add_argument("--n-prompt", type=int, default=512)
    p.add_argument("--n-gen", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--n-prompt-batch", type=int, default=128)
    p.add_argument("--n-tokens", type=int, default=960)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--chunks", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    set_threads_env(args.threads)
    emit({"bench": bench, "nll": nll, "export": export}[args.mode](args))


if __name__ == "__main__":
    main()
