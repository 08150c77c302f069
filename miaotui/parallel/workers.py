"""Model-parallel ranks: building one (join the group, load its shard), the driver's runner that
sends every step to the workers, the workers' loop, and starting the ranks of one machine.

    driver (rank 0): Scheduler -> DriverRunner.prepare -> broadcast StepMessage -> forward -> sample
    worker (rank r): receive StepMessage -> forward (all-reduce / send / gather) -> receive ...
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from miaotui.config import EngineConfig
from miaotui.device import free_cpus, resolve_device, resolve_dtype, setup_threads
from miaotui.engine.engine import LLMEngine
from miaotui.engine.runner import ModelInput, ModelRunner, num_cache_blocks
from miaotui.engine.scheduler import SchedulerOutput
from miaotui.errors import DistributedError, InvalidRequestError, MiaotuiError
from miaotui.load.checkpoint import Checkpoint
from miaotui.load.open import load_tokenizer, open_checkpoint
from miaotui.loader import native_step_applies
from miaotui.parallel.dist import Comm, ParallelConfig, init_distributed
from miaotui.parallel.pp import PipelineInput, PipelineRunner, build_stage_model, stage_layers
from miaotui.parallel.tp import build_native_tp_step, build_tp_model, make_shard_plan

log = logging.getLogger(__name__)


@dataclass
class StepMessage:
    """Driver -> workers: run this step's forward pass."""

    input: ModelInput | PipelineInput


@dataclass
class ShutdownMessage:
    """Driver -> workers: leave the loop and the process group."""

    reason: str = "shutdown"


@dataclass
class Rank:
    """What one rank built: its group handle, its runner, the checkpoint it read from."""

    comm: Comm
    runner: ModelRunner
    ckpt: Checkpoint
    num_blocks: int


def check_fits(ckpt: Checkpoint, par: ParallelConfig, cfg: EngineConfig | None = None) -> None:
    """User errors (heads or layers that cannot be split) before any rank waits for another."""
    if (
        cfg is not None and getattr(cfg, "transforms", None)
    ) or "miaotui.manifest" in ckpt.metadata:
        raise InvalidRequestError(
            "load-time transforms and transformed checkpoints are not supported with tensor or "
            "pipeline parallelism yet; serve the GGUF/HF model, or use --data-parallel-size"
        )
    if par.tensor_parallel_size > 1:
        make_shard_plan(ckpt, 0, par.tensor_parallel_size)
    if par.pipeline_parallel_size > 1:
        stage_layers(ckpt.config.n_layers, par.pipeline_parallel_size, 0)


def build_rank(cfg: EngineConfig, par: ParallelConfig, rank: int) -> Rank:
    """Join the group as `rank` and load this rank's part of the model (only its slice of the
    file); returns once every rank has loaded."""
    setup_threads(cfg.device.threads)
    device, dtype = resolve_device(cfg.device), resolve_dtype(cfg.device)
    ckpt = open_checkpoint(cfg.model)
    check_fits(ckpt, par, cfg)
    comm = init_distributed(par, rank, device)
    try:
        if par.tensor_parallel_size > 1:
            model = build_tp_rank_model(ckpt, cfg, comm, device, dtype)
            # full config and one KV dtype on every rank: the same block count everywhere
            num_blocks = num_cache_blocks(model, cfg.cache, model.kv_spec()[1])
            runner = ModelRunner(model, cfg.cache, num_blocks, device, dtype)
        else:
            pp = par.pipeline_parallel_size
            model = build_stage_model(ckpt, cfg, rank, pp)
            num_blocks = num_cache_blocks(model, cfg.cache, dtype)
            runner = PipelineRunner(
                model, rank, pp, cfg.cache, num_blocks, device, dtype, comm, par.num_micro_batches
            )
        comm.barrier("loaded")  # a rank that failed to load fails everyone here, clearly
    except BaseException:
        comm.close()
        raise
    return Rank(comm, runner, ckpt, num_blocks)


def build_tp_rank_model(
    ckpt: Checkpoint, cfg: EngineConfig, comm: Comm, device: torch.device, dtype: torch.dtype
):
    """This rank's tensor-parallel slice: the native step's (GGUF blocks on the CPU, as one
    process would run them: the same answers bit for bit) or the per-module model's."""
    if not cfg.transforms and native_step_applies(cfg, device, dtype):
        threads = cfg.device.threads or max(1, free_cpus() // comm.world_size)
        model = build_native_tp_step(ckpt, threads, comm)
        if model is not None:
            torch.set_num_threads(1)  # as in one process: the native pool has the cores
            return model
    return build_tp_model(ckpt, cfg, comm)


class DriverRunner:
    """The driver's runner: sends each step to the workers, then runs its own part of it.
    Keeps the time split between compute and communication for the benchmark."""

    def __init__(self, inner: ModelRunner, comm: Comm):
        self.inner, self.comm = inner, comm
        self.model, self.block_size, self.device = inner.model, inner.block_size, inner.device
        self.steps = 0
        self.step_seconds = 0.0
        self.closed = False

    def prepare(self, out: SchedulerOutput) -> ModelInput | PipelineInput:
        return self.inner.prepare(out)

    def execute(self, inp: ModelInput | PipelineInput) -> torch.Tensor:
        if self.closed:
            raise DistributedError("the model-parallel workers were shut down")
        t0 = time.perf_counter()
        self.comm.broadcast_message(StepMessage(inp))
        logits = self.inner.execute(inp)
        self.step_seconds += time.perf_counter() - t0
        self.steps += 1
        return logits

    def greedy_tokens(self, rows: int) -> list[int] | None:
        return self.inner.greedy_tokens(rows)

    def shutdown(self) -> None:
        """Tell the workers to exit (best effort: some may be gone) and leave the group."""
        if self.closed:
            return
        self.closed = True
        try:
            self.comm.broadcast_message(ShutdownMessage())
        except DistributedError as e:
            log.warning("could not reach every worker at shutdown: %s", e)
        self.comm.close()


def build_driver_engine(cfg: EngineConfig, par: ParallelConfig) -> LLMEngine:
    """Rank 0: an LLMEngine whose forward passes run on all model-parallel ranks."""
    r = build_rank(cfg, par, 0)
    runner = DriverRunner(r.runner, r.comm)
    sched = cfg.scheduler.for_model(r.ckpt.config.max_seq_len)
    return LLMEngine(runner, load_tokenizer(r.ckpt), r.num_blocks, cfg.cache, sched)


def run_worker(cfg: EngineConfig, par: ParallelConfig, rank: int) -> None:
    """Rank > 0: run the driver's steps until it says stop (or dies: DistributedError)."""
    r = build_rank(cfg, par, rank)
    try:
        while True:
            msg = r.comm.receive_message()
            if isinstance(msg, ShutdownMessage):
                log.info("rank %d: %s", rank, msg.reason)
                return
            r.runner.execute(_to_device(msg.input, r.runner.device))
    finally:
        r.comm.close()


def _to_device(inp, device: torch.device):
    """Messages are pickled on the driver's device; move them to this rank's."""
    if device.type == "cpu":
        return inp
    if isinstance(inp, PipelineInput):
        return PipelineInput([_to_device(m, device) for m in inp.micro])

    def moved(obj):
        return dataclasses.replace(
            obj,
            **{
                f.name: getattr(obj, f.name).to(device)
                for f in dataclasses.fields(obj)
                if isinstance(getattr(obj, f.name), torch.Tensor)
            },
        )

    return dataclasses.replace(moved(inp), meta=moved(inp.meta))


# ---- one process per rank on this machine ------------------------------------------------------


def spawn_workers(cfg: EngineConfig, par: ParallelConfig, ranks: list[int]) -> list:
    """Start `ranks` as child processes of this one (spawned: a fresh interpreter each)."""
    ctx = mp.get_context("spawn")
    procs = []
    for rank in ranks:
        p = ctx.Process(
            target=worker_main,
            args=(cfg, par, rank, os.getpid(), logging.getLogger("miaotui").getEffectiveLevel()),
            name=f"miaotui-rank{rank}",
            daemon=True,
        )
        p.start()
        procs.append(p)
    return procs


def worker_main(
    cfg: EngineConfig, par: ParallelConfig, rank: int, parent_pid: int, level: int
) -> None:
    """Entry point of a spawned worker: exits with 2 and one line on stderr on a MiaotuiError,
    and by itself when its parent (the launcher) disappears."""
    logging.basicConfig(level=level, format=f"%(levelname)s rank{rank} %(name)s: %(message)s")
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    try:
        run_worker(cfg, par, rank)
    except MiaotuiError as e:
        print(f"miaotui: rank {rank}: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except Exception:
        log.exception("rank %d failed", rank)
        sys.exit(1)


def _watch_parent(pid: int) -> None:
    while True:
        time.sleep(1.0)
        if os.getppid() != pid:
            os._exit(3)


class RankMonitor:
    """Watches this machine's worker processes; calls `on_death` once if one exits while the
    driver still needs it (so the server reports it at once, not at the next collective)."""

    def __init__(self, procs: list, on_death: Callable[[str], None], interval: float = 0.5):
        self.procs, self.on_death, self.interval = procs, on_death, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="miaotui-rank-monitor", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            dead = [p for p in self.procs if not p.is_alive()]
            if dead:
                names = ", ".join(f"{p.name} (exit code {p.exitcode})" for p in dead)
                self.on_death(f"model-parallel worker process died: {names}")
                return

    def stop(self) -> None:
        self._stop.set()


def stop_workers(procs: list, timeout: float = 10.0) -> None:
    """Wait for workers to exit after a shutdown message; terminate stragglers."""
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.terminate()
            p.join(2.0)
