"""Process groups for model parallelism: which rank is where, how ranks meet, and `Comm`, the one
object through which a rank talks to the others (timed, counted, failing with DistributedError).

Ranks meet over TCP (`init_method=tcp://master_addr:master_port`), gloo on CPU and NCCL on GPU.
Every collective carries a timeout, so a rank that never comes or dies gives a DistributedError
instead of a hang: a dead peer closes its sockets (gloo reports it at once), a hung one is caught
by the timeout.
"""

from __future__ import annotations

import datetime
import logging
import pickle
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from miaotui.config import ParallelConfig
from miaotui.errors import DistributedError, InvalidRequestError

log = logging.getLogger(__name__)


@dataclass
class CommStats:
    """Time and payload of one kind of communication on this rank."""

    seconds: float = 0.0
    bytes: int = 0
    calls: int = 0


@dataclass
class CommCounters:
    """Per-operation communication totals of one rank (read by the benchmark)."""

    ops: dict[str, CommStats] = field(default_factory=dict)

    def add(self, op: str, seconds: float, nbytes: int) -> None:
        s = self.ops.setdefault(op, CommStats())
        s.seconds += seconds
        s.bytes += nbytes
        s.calls += 1

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.ops.values())

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.ops.values())

    def reset(self) -> None:
        self.ops.clear()


@dataclass
class PendingSend:
    """An isend in flight; the tensor is kept alive until it completes."""

    work: Any
    tensor: torch.Tensor


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for tests and local launches)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pick_backend(cfg: ParallelConfig, device: torch.device) -> str:
    if cfg.backend != "auto":
        return cfg.backend
    return "nccl" if device.type == "cuda" else "gloo"


class Comm:
    """This rank's handle on the model-parallel group. Rank 0 is the driver."""

    def __init__(self, rank: int, world_size: int, device: torch.device, cfg: ParallelConfig):
        self.rank, self.world_size, self.device, self.cfg = rank, world_size, device, cfg
        self.timeout = datetime.timedelta(seconds=cfg.timeout_s)
        # Step messages travel on their own group: a worker may wait there for as long as the
        # server idles, while forward collectives keep the short timeout.
        self.control = dist.new_group(
            list(range(world_size)),
            timeout=datetime.timedelta(seconds=cfg.idle_timeout_s),
            backend="gloo",
        )
        self.counters = CommCounters()

    # ---- messages (driver -> workers) -----------------------------------------------------

    def broadcast_message(self, msg: Any) -> None:
        """Driver: send one typed message (a dataclass, pickled) to every worker."""
        t0 = time.perf_counter()
        data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        size = torch.tensor([len(data)], dtype=torch.long)
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        self._run("broadcast", lambda: dist.broadcast(size, 0, group=self.control))
        self._run("broadcast", lambda: dist.broadcast(buf, 0, group=self.control))
        self.counters.add("broadcast", time.perf_counter() - t0, len(data))

    def receive_message(self) -> Any:
        """Worker: block until the driver's next message."""
        size = torch.zeros(1, dtype=torch.long)
        self._run("receive", lambda: dist.broadcast(size, 0, group=self.control))
        buf = torch.empty(int(size), dtype=torch.uint8)
        self._run("receive", lambda: dist.broadcast(buf, 0, group=self.control))
        return pickle.loads(buf.numpy().tobytes())

    def barrier(self, what: str) -> None:
        """Wait until every rank got here (on the control group: loading may take long, but a
        rank that died is reported at once)."""
        self._run(f"barrier ({what})", lambda: dist.barrier(group=self.control))

    # ---- collectives of the forward pass --------------------------------------------------

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over all ranks in place (returns it)."""
        t0 = time.perf_counter()
        self._run("all_reduce", lambda: dist.all_reduce(x, async_op=True).wait(self.timeout))
        self.counters.add("all_reduce", time.perf_counter() - t0, _nbytes(x))
        return x

    def all_gather(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's `x` (same shape everywhere), in rank order, on every rank."""
        t0 = time.perf_counter()
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        self._run("all_gather", lambda: dist.all_gather(parts, x, async_op=True).wait(self.timeout))
        self.counters.add("all_gather", time.perf_counter() - t0, self.world_size * _nbytes(x))
        return parts

    def gather_to_driver(self, x: torch.Tensor) -> list[torch.Tensor] | None:
        """Rank 0 gets every rank's `x` (same shape everywhere); others get None."""
        t0 = time.perf_counter()
        parts = [torch.empty_like(x) for _ in range(self.world_size)] if self.rank == 0 else None
        self._run("gather", lambda: dist.gather(x, parts, dst=0, async_op=True).wait(self.timeout))
        sent = 0 if self.rank == 0 else _nbytes(x)
        recv = (self.world_size - 1) * _nbytes(x) if self.rank == 0 else 0
        self.counters.add("gather", time.perf_counter() - t0, sent + recv)
        return parts

    def send(self, x: torch.Tensor, dst: int) -> PendingSend:
        """Start sending `x` to `dst`; the caller computes on, then calls `wait`."""
        t0 = time.perf_counter()
        x = x.contiguous()
        work = self._run("send", lambda: dist.isend(x, dst))
        self.counters.add("send", time.perf_counter() - t0, _nbytes(x))
        return PendingSend(work, x)

    def wait(self, pending: PendingSend) -> None:
        t0 = time.perf_counter()
        self._run("send", lambda: pending.work.wait(self.timeout))
        self.counters.add("send_wait", time.perf_counter() - t0, 0)

    def recv(self, shape: tuple[int, ...], dtype: torch.dtype, src: int) -> torch.Tensor:
        t0 = time.perf_counter()
        x = torch.empty(shape, dtype=dtype, device=self.device)
        self._run("recv", lambda: dist.irecv(x, src).wait(self.timeout))
        self.counters.add("recv", time.perf_counter() - t0, _nbytes(x))
        return x

    def _run(self, op: str, fn):
        try:
            return fn()
        except DistributedError:
            raise
        except Exception as e:  # gloo/nccl raise RuntimeError/DistError with transport details
            raise DistributedError(
                f"rank {self.rank}/{self.world_size}: {op} failed ({e}); a peer rank died or did "
                f"not answer within {self.cfg.timeout_s:g} s"
            ) from e

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def init_distributed(cfg: ParallelConfig, rank: int, device: torch.device) -> Comm:
    """Join the model-parallel group as `rank`; DistributedError if the ranks do not all meet
    within `cfg.init_timeout_s`."""
    world = cfg.world_size
    if not 0 <= rank < world:
        raise InvalidRequestError(f"rank must be in 0..{world - 1}, got {rank}")
    url = "env://" if cfg.init_method == "env" else f"tcp://{cfg.master_addr}:{cfg.master_port}"
    backend = pick_backend(cfg, device)
    t0 = time.monotonic()
    try:
        dist.init_process_group(
            backend,
            init_method=url,
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=cfg.init_timeout_s),
        )
        comm = Comm(rank, world, device, cfg)
        # Gloo may connect pairs lazily: one barrier per group proves every pair can talk.
        wait = datetime.timedelta(seconds=cfg.init_timeout_s)
        dist.barrier(async_op=True).wait(wait)
        dist.barrier(group=comm.control, async_op=True).wait(wait)
    except Exception as e:
        if dist.is_initialized():
            dist.destroy_process_group()
        raise DistributedError(
            f"rank {rank} could not meet the other {world - 1} rank(s) of world size {world} at "
            f"{url} ({backend}) within {cfg.init_timeout_s:g} s "
            f"(waited {time.monotonic() - t0:.1f} s): {e}. Check that every rank was started "
            "with the same --master-addr/--master-port and that the port is reachable"
        ) from e
    if device.type == "cuda":
        torch.cuda.set_device(device)
    log.info("rank %d/%d joined %s (%s)", rank, world, url, backend)
    return comm


def _nbytes(x: torch.Tensor) -> int:
    return x.numel() * x.element_size()
