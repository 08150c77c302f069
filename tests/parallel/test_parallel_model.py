"""Tensor and pipeline parallelism on two ranks over gloo on 127.0.0.1, against the
single-process engine: greedy tokens and logits equal, each rank holding only its slice, and
clear DistributedErrors (never hangs) when ranks cannot meet or one dies."""

from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path
from types import SimpleNamespace

import gguf
import numpy as np
import pytest
import torch

from miaotui.config import CacheConfig, EngineConfig
from miaotui.errors import DistributedError, InvalidRequestError
from miaotui.load.open import open_checkpoint
from miaotui.loader import build_engine
from miaotui.parallel.dist import ParallelConfig, free_port, init_distributed
from tests.helpers import _add_tensor, _gguf_name, _permute, _rope_theta, hf_model

pytestmark = pytest.mark.slow


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


def write_tiny_gguf(path: Path, arch: str = "llama", qtype: str = "F32", **overrides) -> Path:
    """A tiny random model as GGUF, with a byte-level tokenizer (one token per ASCII byte, the
    last id is EOS) so that engines and the HTTP server can run on it."""
    model = hf_model(arch, **overrides)
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
    w.add_tokenizer_model("gpt2")
    w.add_token_list(_byte_chars()[: cfg.vocab_size])
    w.add_token_types([1] * cfg.vocab_size)
    w.add_token_merges([])
    w.add_eos_token_id(cfg.vocab_size - 1)
    for name, t in model.state_dict().items():
        arr = t.detach().float().numpy()
        gname = _gguf_name(name, arch)
        if gname is None:
            continue
        if arch == "llama" and gname.endswith(("attn_q.weight", "attn_k.weight")):
            heads = cfg.num_attention_heads if "attn_q" in gname else cfg.num_key_value_heads
            arr = _permute(arr, heads)
        _add_tensor(w, gname, np.ascontiguousarray(arr), qtype if arr.ndim == 2 else "F32")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ---- running ranks -----------------------------------------------------------------------------

PROMPT_IDS = [[5, 17, 33, 2, 9, 60, 61, 62, 7], [11, 12, 13], [40, 41, 42, 43, 44, 45, 46]]
TIMEOUT = 150.0


def _job_result(engine, prompts) -> dict:
    """Rank 0: logits of a prefill of every prompt, then greedy tokens of all of them."""
    from miaotui.engine.scheduler import ScheduledRequest
    from miaotui.llm import LLM
    from miaotui.sampling_params import SamplingParams

    ids = [engine.tokenizer.encode(p) if isinstance(p, str) else p for p in prompts]
    return {
        "logits": prefill_logits(engine.runner, ids, ScheduledRequest),
        "tokens": [
            r.token_ids
            for r in LLM.from_engine(engine).generate(
                ids, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
            )
        ],
    }


def prefill_logits(runner, ids: list[list[int]], ScheduledRequest) -> torch.Tensor:
    """(B, V) logits of the last position of each prompt, all prefilled in one step."""
    bs, scheduled, next_block = runner.block_size, [], 1
    for i, p in enumerate(ids):
        n = -(-len(p) // bs)
        blocks = list(range(next_block, next_block + n))
        next_block += n
        scheduled.append(ScheduledRequest(f"p{i}", p, 0, blocks, True, None, []))
    return runner.execute(runner.prepare(scheduled))


def _rank_main(rank: int, jobs: list, q) -> None:
    """One process of a two-rank test: runs each (cfg, par) job in turn."""
    from miaotui.parallel.workers import build_driver_engine, run_worker

    for cfg, par, prompts in jobs:
        try:
            if rank != 0:
                run_worker(cfg, par, rank)
                continue
            engine = build_driver_engine(cfg, par)
            try:
                q.put(_job_result(engine, prompts))
            finally:
                engine.runner.shutdown()
        except BaseException as e:
            q.put(e)
            raise


def run_two_ranks(jobs: list) -> list[dict]:
    """Run `jobs` on two spawned ranks; every wait is bounded."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, jobs, q), daemon=True) for r in (0, 1)]
    for p in procs:
        p.start()
    try:
        results = []
        for _ in jobs:
            out = q.get(timeout=TIMEOUT)
            if isinstance(out, BaseException):
                raise out
            results.append(out)
        for p in procs:
            p.join(30)
        return results
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()


def _par(kind: str, **kw) -> ParallelConfig:
    sizes = {"tp": dict(tensor_parallel_size=2), "pp": dict(pipeline_parallel_size=2)}[kind]
    kw = dict(dict(init_timeout_s=60, timeout_s=60), **kw)
    return ParallelConfig(**sizes, master_port=free_port(), **kw)


def _cfg(model: str | None, **kw) -> EngineConfig:
    cache = CacheConfig(num_blocks=96, block_size=4)
    return EngineConfig(model=model, threads=1, max_model_len=256, cache=cache, **kw)


def _reference(cfg: EngineConfig, prompts) -> dict:
    return _job_result(build_engine(cfg), prompts)


def _check_same(got: dict, want: dict, what: str) -> None:
    diff = (got["logits"] - want["logits"]).abs().max().item()
    assert diff < 1e-3 * want["logits"].abs().max().item(), f"{what}: logits differ by {diff}"
    assert got["tokens"] == want["tokens"], f"{what}: {got['tokens']} != {want['tokens']}"


# ---- tests ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_paths(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("model_parallel")
    return {
        "llama": write_tiny_gguf(d / "llama.gguf", "llama", num_hidden_layers=4),
        "llama_q8": write_tiny_gguf(d / "llama_q8.gguf", "llama", "Q8_0", num_hidden_layers=4),
        "qwen2": write_tiny_gguf(d / "qwen2.gguf", "qwen2", num_hidden_layers=4),
    }


@pytest.mark.timeout(240)
def test_tiny_models_tp_and_pp_match_single_process(tiny_paths):
    jobs = [
        (_cfg(str(tiny_paths["llama"])), _par("tp"), PROMPT_IDS),
        (_cfg(str(tiny_paths["llama_q8"])), _par("tp"), PROMPT_IDS),  # int8 codes cut along K
        (_cfg(str(tiny_paths["qwen2"])), _par("tp"), PROMPT_IDS),  # q/k/v biases split too
        (_cfg(str(tiny_paths["llama"])), _par("pp"), PROMPT_IDS),
        (_cfg(str(tiny_paths["llama_q8"])), _par("pp", num_micro_batches=3), PROMPT_IDS),
    ]
    for (cfg, par, prompts), got in zip(jobs, run_two_ranks(jobs)):
        _check_same(got, _reference(cfg, prompts), f"{cfg.model} {par}")


@pytest.mark.timeout(300)
def test_default_model_tp_and_pp_match_single_process():
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, there"]
    # fp32 weights: the int4 kernels quantize activations to int8, so the all-reduce's different
    # summation order can flip a rounding and the native path is not fp32-comparable.
    cfg = _cfg(None, weights="float")
    jobs = [(cfg, _par("tp"), prompts), (cfg, _par("pp"), prompts)]
    results = run_two_ranks(jobs)
    want = _reference(cfg, prompts)
    for (_, par, _), got in zip(jobs, results):
        _check_same(got, want, f"default model {par}")


def test_each_rank_holds_only_its_slice(tiny_paths):
    from miaotui.parallel.pp import build_stage_model
    from miaotui.parallel.tp import build_tp_model, weight_bytes

    for name in ("llama", None):  # tiny float model; the default model packed natively
        model = None if name is None else str(tiny_paths[name])
        ckpt, cfg = open_checkpoint(model), _cfg(model)
        whole = build_engine(cfg).runner.model
        full = weight_bytes(whole)
        norms = sum(4 * t.numel for n, t in ckpt.tensors.items() if n.endswith("norm.weight"))
        tp = [
            weight_bytes(build_tp_model(ckpt, cfg, SimpleNamespace(rank=r, world_size=2)))
            for r in (0, 1)
        ]
        # Everything but the (replicated) norms is split; SmolLM2's 3 KV heads split 2 + 1.
        assert sum(tp) == pytest.approx(full + norms, rel=1e-3)
        assert max(tp) < (0.5 if name else 0.56) * full + norms
        if name is None:
            continue  # pipeline stages of the tiny model suffice
        pp = [weight_bytes(build_stage_model(ckpt, cfg, s, 2)) for s in (0, 1)]
        tied = ckpt.config.tie_embeddings  # a tied head is the embedding: both ends hold it
        emb = full - sum(weight_bytes(b) for b in whole.layers) - norms
        assert sum(pp) == pytest.approx(full + (emb if tied else 0), rel=1e-2)
        assert max(pp) < 0.6 * full + (emb if tied else 0)


def test_splits_that_cannot_work_are_refused(tiny_paths):
    from miaotui.parallel.workers import check_fits

    ckpt = open_checkpoint(str(tiny_paths["llama"]))  # 2 KV heads, 4 layers
    with pytest.raises(InvalidRequestError, match="n_kv_heads=2"):
        check_fits(ckpt, ParallelConfig(tensor_parallel_size=4))
    with pytest.raises(InvalidRequestError, match="exceeds the model's 4 layers"):
        check_fits(ckpt, ParallelConfig(pipeline_parallel_size=8))
    with pytest.raises(InvalidRequestError, match="not supported yet"):
        ParallelConfig(tensor_parallel_size=2, pipeline_parallel_size=2)


@pytest.mark.timeout(60)
def test_ranks_that_cannot_meet_fail_within_the_timeout():
    for rank in (0, 1):  # the driver alone; a worker whose driver never comes
        par = ParallelConfig(tensor_parallel_size=2, master_port=free_port(), init_timeout_s=3)
        t0 = time.monotonic()
        with pytest.raises(DistributedError, match="could not meet"):
            init_distributed(par, rank, torch.device("cpu"))
        assert time.monotonic() - t0 < 20


def _driver_whose_worker_dies(cfg: EngineConfig, par: ParallelConfig, q) -> None:
    from miaotui.llm import LLM
    from miaotui.parallel.workers import RankMonitor, build_driver_engine, spawn_workers
    from miaotui.sampling_params import SamplingParams

    procs = spawn_workers(cfg, par, [1])  # the launcher `miaotui serve -tp 2` uses
    engine = build_driver_engine(cfg, par)
    deaths: list[str] = []
    RankMonitor(procs, deaths.append, interval=0.1)
    llm = LLM.from_engine(engine)
    params = SamplingParams(max_tokens=4, temperature=0)
    llm.generate([[1, 2, 3]], params)
    procs[0].kill()
    procs[0].join(10)
    t0 = time.monotonic()
    try:
        llm.generate([[1, 2, 3]], params)
        q.put(("no error", 0.0, deaths))
    except DistributedError as e:
        time.sleep(0.3)
        q.put((str(e), time.monotonic() - t0, deaths))


@pytest.mark.timeout(120)
def test_a_rank_that_dies_gives_a_clear_error(tiny_paths):
    cfg = _cfg(str(tiny_paths["llama"]))
    par = _par("tp", timeout_s=10)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_driver_whose_worker_dies, args=(cfg, par, q))
    p.start()
    try:
        msg, elapsed, deaths = q.get(timeout=100)
    finally:
        p.join(10)
        if p.is_alive():
            p.kill()
    assert "a peer rank died" in msg and elapsed < 15
    assert deaths and "exit code" in deaths[0]
