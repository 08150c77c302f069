"""Tensor and pipeline parallelism on two ranks over gloo on 127.0.0.1, against the
single-process engine: greedy tokens and logits equal (bit for bit on the native step), each
rank holding only its slice, and clear DistributedErrors (never hangs) when ranks cannot meet
or one dies."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from miaotui.config import CacheConfig, EngineConfig
from miaotui.errors import DistributedError, InvalidRequestError
from miaotui.load.open import open_checkpoint
from miaotui.loader import build_engine, engine_for_model
from miaotui.model.native_step import NativeStepModel
from miaotui.parallel.dist import ParallelConfig, free_port, init_distributed
from tests.helpers import SHARED, hf_model, write_gguf

pytestmark = pytest.mark.slow


def write_tiny_gguf(path: Path, arch: str = "llama", qtype: str = "F32", **overrides) -> Path:
    """A tiny random model as GGUF with a byte-level tokenizer, so that engines can run on it."""
    return write_gguf(hf_model(arch, **overrides), arch, path, qtype, tokenizer="bytes")


# ---- running ranks -----------------------------------------------------------------------------

PROMPT_IDS = [[5, 17, 33, 2, 9, 60, 61, 62, 7], [11, 12, 13], [40, 41, 42, 43, 44, 45, 46]]
TIMEOUT = 150.0


def _job_result(engine, prompts, max_tokens: int = 8) -> dict:
    """Rank 0: logits of a prefill of every prompt, then greedy tokens of all of them."""
    from miaotui.llm import LLM
    from miaotui.sampling_params import SamplingParams

    ids = [engine.tokenizer.encode(p) if isinstance(p, str) else p for p in prompts]
    return {
        "logits": prefill_logits(engine.runner, ids),
        "tokens": [
            r.token_ids
            for r in LLM.from_engine(engine).generate(
                ids, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
            )
        ],
        "native": isinstance(engine.runner.model, NativeStepModel),
    }


def prefill_logits(runner, ids: list[list[int]]) -> torch.Tensor:
    """(B, V) logits of the last position of each prompt, all prefilled in one step."""
    from miaotui.engine.scheduler import NewRequest, SchedulerOutput

    bs, new, next_block = runner.block_size, [], 1
    for i, p in enumerate(ids):
        n = -(-len(p) // bs)
        new.append(NewRequest(f"p{i}", p, 0, True, list(range(next_block, next_block + n))))
        next_block += n
    return runner.execute(runner.prepare(SchedulerOutput([], new, [])))


def _rank_main(rank: int, jobs: list, q) -> None:
    """One process of a two-rank test: runs each (cfg, par) job in turn."""
    from miaotui.parallel.workers import build_driver_engine, run_worker

    for cfg, par, prompts, max_tokens in jobs:
        try:
            if rank != 0:
                run_worker(cfg, par, rank)
                continue
            engine = build_driver_engine(cfg, par)
            try:
                q.put(_job_result(engine, prompts, max_tokens))
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
    return EngineConfig.from_kwargs(model=model, threads=1, max_model_len=256, cache=cache, **kw)


def _reference(cfg: EngineConfig, par: ParallelConfig, prompts, max_tokens: int = 8) -> dict:
    """One process running what the ranks run: under tensor parallelism that is the one-call
    native step where the file allows (as one process takes it); pipeline stages run native
    weights as per-module packed kernels."""
    if cfg.weights == "native" and par.pipeline_parallel_size > 1:
        cfg = dataclasses.replace(cfg, weights="packed")
    return _job_result(build_engine(cfg), prompts, max_tokens)


def _check_same(got: dict, want: dict, what: str) -> None:
    assert got["native"] == want["native"], what
    if want["native"]:  # the same arithmetic however the rows are split: the same bits
        assert torch.equal(got["logits"], want["logits"]), f"{what}: logits differ"
        assert got["tokens"] == want["tokens"], f"{what}: {got['tokens']} != {want['tokens']}"
        return
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


DEFAULT_PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, there"]


def dev_questions(n: int = 8) -> list[str]:
    """The first n SQuAD dev questions of ../shared/data, as plain prompts."""
    with open(SHARED / "data" / "tasks" / "squad_dev.jsonl", encoding="utf-8") as f:
        return [
            f"Question: {json.loads(line)['question']}\nAnswer:" for line, _ in zip(f, range(n))
        ]


def _jobs(tiny_paths) -> dict[str, list]:
    # The default model in fp32 weights on the per-module path: the int4 kernels quantize
    # activations to int8, so the all-reduce's different summation order can flip a rounding.
    # On native weights the ranks run the native step, split so that no sum is cut.
    default = _cfg(None, weights="float")
    return {
        "tiny": [
            (_cfg(str(tiny_paths["llama"])), _par("tp"), PROMPT_IDS, 8),
            (_cfg(str(tiny_paths["llama_q8"])), _par("tp"), PROMPT_IDS, 8),  # native step
            (_cfg(str(tiny_paths["qwen2"])), _par("tp"), PROMPT_IDS, 8),  # q/k/v biases split too
            (_cfg(str(tiny_paths["llama"])), _par("pp"), PROMPT_IDS, 8),
            (_cfg(str(tiny_paths["llama_q8"])), _par("pp", num_micro_batches=3), PROMPT_IDS, 8),
        ],
        "default": [
            (default, _par("tp"), DEFAULT_PROMPTS, 8),
            (default, _par("pp"), DEFAULT_PROMPTS, 8),
        ],
        "native": [(_cfg(None), _par("tp"), dev_questions(), 48)],
    }


@pytest.fixture(scope="module")
def two_rank_runs(tiny_paths) -> dict[str, list[tuple[tuple, dict]]]:
    """Every two-rank job of this module in one launch of two ranks (each rank pays Python,
    torch and model start-up once): {group: [(job, rank 0's result)]}."""
    jobs = _jobs(tiny_paths)
    flat = [job for group in jobs.values() for job in group]
    results = iter(run_two_ranks(flat))
    return {name: [(job, next(results)) for job in group] for name, group in jobs.items()}


@pytest.mark.timeout(400)
def test_tiny_models_tp_and_pp_match_single_process(two_rank_runs):
    for (cfg, par, prompts, n), got in two_rank_runs["tiny"]:
        _check_same(got, _reference(cfg, par, prompts, n), f"{cfg.model} {par}")


@pytest.mark.timeout(400)
def test_default_model_tp_and_pp_match_single_process(two_rank_runs, smollm_float):
    (cfg, _, prompts, n), _ = two_rank_runs["default"][0]
    model, tok = smollm_float.engine.runner.model, smollm_float.tokenizer
    want = _job_result(engine_for_model(model, tok, cfg), prompts, n)  # the session's float model
    for (_, par, _, _), got in two_rank_runs["default"]:
        _check_same(got, want, f"default model {par}")


@pytest.mark.timeout(400)
def test_default_model_native_tp_same_answer_as_one_process(two_rank_runs):
    """`serve -tp 2` on the file's own Q4_1/Q8_0 blocks: every rank runs the native step on its
    heads, MLP channels, rows and vocabulary, and its outputs are gathered, never summed, so the
    8 dev questions' 48 greedy tokens and the prefill logits are bit-identical to one process."""
    (cfg, par, prompts, n), got = two_rank_runs["native"][0]
    want = _reference(cfg, par, prompts, n)
    assert want["native"] and got["native"]
    _check_same(got, want, "default model, native weights, -tp 2")


def test_each_rank_holds_only_its_slice(tiny_paths):
    from miaotui.parallel.pp import build_stage_model
    from miaotui.parallel.tp import build_tp_model, weight_bytes

    for name in ("llama", None):  # tiny float model; the default model packed natively
        model = None if name is None else str(tiny_paths[name])
        ckpt, cfg = open_checkpoint(model), _cfg(model)
        whole = build_engine(dataclasses.replace(cfg, weights="packed")).runner.model
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
