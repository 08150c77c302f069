"""Frozen configuration dataclasses: the only place where CLI/env values become config.

One tree, built and validated once at the edge (CLI, server, `LLM(...)`) and passed down:

    EngineConfig   model, weights, transforms, progress
      device     DeviceConfig     device, dtype, threads
      cache      CacheConfig      block_size, num_blocks, memory_gib, kv_dtype, prefix caching
      scheduler  SchedulerConfig  max_model_len, max_num_seqs, token budget, chunk, queue bound
      parallel   ParallelConfig   tensor / pipeline / data parallel sizes, rendezvous, timeouts
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from miaotui.errors import InvalidRequestError, UnsupportedModelError

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "gemma3")
DTYPE_NAMES = ("fp32", "float32", "bf16", "bfloat16", "fp16", "float16")
"""Float types by name (device.DTYPES maps them to torch dtypes)."""
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency-dependent RoPE scaling ("llama3"), or plain "linear" scaling."""

    kind: str = "none"
    """"none", "linear" or "llama3"."""
    factor: float = 1.0
    """Context extension factor."""
    low_freq_factor: float = 1.0
    """llama3: wavelengths longer than original_max_len / low_freq_factor are scaled fully."""
    high_freq_factor: float = 4.0
    """llama3: wavelengths shorter than original_max_len / high_freq_factor are not scaled."""
    original_max_len: int = 8192
    """llama3: the context length the model was pre-trained with."""


@dataclass(frozen=True)
class ModelConfig:
    """Everything the forward pass needs to know about an architecture instance."""

    arch: str
    """"llama", "qwen2" or "gemma3"."""
    vocab_size: int
    """Rows of the embedding table (V)."""
    dim: int
    """Model (residual stream) width C."""
    n_layers: int
    """Number of decoder blocks."""
    n_heads: int
    """Query heads H."""
    n_kv_heads: int
    """Key/value heads KVH (grouped-query attention when < n_heads)."""
    head_dim: int
    """Per-head width D."""
    intermediate_size: int
    """MLP hidden width F."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    rope_theta: float = 10000.0
    """RoPE base of (global) attention layers."""
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    """RoPE scaling of (global) attention layers."""
    max_seq_len: int = 2048
    """Trained context length; prompt + generation may not exceed it."""
    tie_embeddings: bool = False
    """Output head shares the embedding matrix."""
    qkv_bias: bool = False
    """qwen2: q/k/v projections carry biases."""
    activation: str = "silu"
    """Gate activation of the gated MLP: "silu" (SwiGLU) or "gelu_tanh" (GeGLU, gemma)."""
    embed_scale: float = 1.0
    """Embeddings are multiplied by this (gemma: sqrt(dim))."""
    qk_norm: bool = False
    """gemma3: RMSNorm over each query and key head before RoPE."""
    sandwich_norm: bool = False
    """gemma3: extra RMSNorm after attention and after the MLP, before the residual add."""
    query_scale: float | None = None
    """Attention scale; None means 1/sqrt(head_dim)."""
    sliding_window: int | None = None
    """gemma3: local layers attend to at most this many previous tokens."""
    sliding_window_pattern: int = 0
    """gemma3: every n-th layer is global, the others local (0: all global)."""
    rope_local_theta: float = 10000.0
    """gemma3: RoPE base of the local (sliding-window) layers."""
    final_logit_softcap: float | None = None
    """Logits are soft-capped to +-this value via tanh (gemma2 style), if set."""

    def __post_init__(self) -> None:
        if self.arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"unknown architecture {self.arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if self.n_heads % self.n_kv_heads != 0:
            raise UnsupportedModelError(
                f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}"
            )
        if self.activation not in ("silu", "gelu_tanh"):
            raise UnsupportedModelError(f"unknown activation {self.activation!r}")

    def is_sliding(self, layer: int) -> bool:
        """Whether `layer` uses local (sliding-window) attention."""
        if self.sliding_window is None or self.sliding_window_pattern <= 0:
            return False
        return (layer + 1) % self.sliding_window_pattern != 0


@dataclass(frozen=True)
class DeviceConfig:
    """Where the model runs and in which floating-point type."""

    device: str = "auto"
    """"auto" (cuda if present, else cpu), "cpu" or "cuda[:n]"."""
    dtype: str = "fp32"
    """Activation/weight float type: "fp32", "bf16" or "fp16"."""
    threads: int | None = None
    """CPU threads. None: torch's setting is left alone, and the native step (one native call
    per step, which has its own pool) uses the CPUs no other process keeps busy. With the native
    step, torch's own ops (sampling) run on one thread so they do not compete with its pool."""

    def __post_init__(self) -> None:
        if not isinstance(self.device, str) or not _DEVICE.fullmatch(self.device):
            raise InvalidRequestError(
                f"device must be 'auto', 'cpu' or 'cuda[:n]', got {self.device!r}", "device"
            )
        if self.dtype not in DTYPE_NAMES:
            raise InvalidRequestError(
                f"dtype must be one of {sorted(DTYPE_NAMES)}, got {self.dtype!r}", "dtype"
            )
        if self.threads is not None and self.threads < 1:
            raise InvalidRequestError(f"threads must be >= 1, got {self.threads}", "threads")


@dataclass(frozen=True)
class CacheConfig:
    """Size and layout of the paged KV cache."""

    block_size: int = 16
    """Tokens per KV block."""
    num_blocks: int | None = None
    """Blocks in the pool; None derives it from `memory_gib`."""
    memory_gib: float = 0.5
    """KV memory budget when `num_blocks` is None."""
    kv_dtype: str = "auto"
    """"auto" (the model dtype) or "int8" (per token and head scales; halves memory vs bf16)."""
    enable_prefix_caching: bool = True
    """Reuse cached blocks of shared prompt prefixes."""

    def __post_init__(self) -> None:
        if self.block_size <= 0:
            raise InvalidRequestError(
                f"block_size must be positive, got {self.block_size}", "block_size"
            )
        if self.kv_dtype not in ("auto", "int8"):
            raise InvalidRequestError(
                f"kv_dtype must be 'auto' or 'int8', got {self.kv_dtype!r}", "kv_dtype"
            )
        if self.memory_gib <= 0:
            raise InvalidRequestError(
                f"memory_gib must be positive, got {self.memory_gib}", "memory_gib"
            )
        if self.num_blocks is not None and self.num_blocks < 2:
            raise InvalidRequestError(
                f"num_blocks must be >= 2, got {self.num_blocks}", "num_blocks"
            )


@dataclass(frozen=True)
class SchedulerConfig:
    """Batching limits of the continuous-batching scheduler."""

    max_model_len: int | None = 4096
    """Most tokens (prompt + output) in one request; None: the model's trained context. The
    engine caps it at the model's context (see `for_model`)."""
    max_num_seqs: int = 16
    """Most requests running (holding KV blocks) at once."""
    max_num_batched_tokens: int = 512
    """Token budget of one step, summed over all scheduled requests."""
    long_prefill_token_threshold: int | None = None
    """Chunk size: most tokens one request computes in one step (None: the whole budget)."""
    max_waiting: int = 256
    """Bound on queued requests; more are refused with CapacityError (HTTP 429)."""
    speculative_method: str | None = None
    """Decode steps also score proposed tokens: "ngram" (prompt lookup, engine/speculative.py),
    "draft:MODEL" (a smaller model with the same tokenizer), "layerskip:N" (the served model's
    first N layers) or "layerskip" (N chosen by measured acceptance at load, off if none pays;
    engine/draft.py); None: one token per decode step."""
    num_speculative_tokens: int = 4
    """Most tokens proposed per request and step; each request starts at 2 and proposes one
    more than it had accepted the time before. On 2 CPU cores a decode step of 1 + k tokens
    costs about 1.3-1.4x (k = 1), 1.5x (2) and 2x (4) one of 1 token (bench/bench_native_step.py
    `step_tokens`): only long accepted runs pay for many."""
    ngram_max: int = 3
    """Longest suffix the ngram proposer matches (it tries ngram_max .. ngram_min)."""
    ngram_min: int = 2
    """Shortest: a single-token match proposes mostly wrong tokens, and each costs."""
    speculative_max_running: int = 4
    """No proposals while more requests than this run: a batch's step is compute-bound on a
    CPU, and scored proposals then cost what they save (bench/bench_speculative.py)."""

    def __post_init__(self) -> None:
        if not _valid_speculative_method(self.speculative_method):
            raise InvalidRequestError(
                f"speculative_method must be 'ngram', 'draft:MODEL', 'layerskip', "
                f"'layerskip:N' (N >= 1 layers) or None, got {self.speculative_method!r}",
                "speculative_method",
            )
        for name in ("num_speculative_tokens", "ngram_max", "ngram_min", "speculative_max_running"):
            if getattr(self, name) < 1:
                raise InvalidRequestError(f"{name} must be >= 1, got {getattr(self, name)}", name)
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_waiting"):
            if getattr(self, name) < 1:
                raise InvalidRequestError(f"{name} must be >= 1, got {getattr(self, name)}", name)
        if self.long_prefill_token_threshold is not None and self.long_prefill_token_threshold < 1:
            raise InvalidRequestError(
                f"long_prefill_token_threshold must be >= 1 (or None for the whole budget), "
                f"got {self.long_prefill_token_threshold}",
                "long_prefill_token_threshold",
            )
        if self.max_model_len is not None and self.max_model_len < 2:
            raise InvalidRequestError(
                f"max_model_len must be >= 2 (a prompt token and an output token; or None for "
                f"the model's context), got {self.max_model_len}",
                "max_model_len",
            )

    @property
    def chunk_size(self) -> int:
        """Most tokens one request computes in one step."""
        return self.long_prefill_token_threshold or self.max_num_batched_tokens

    def for_model(self, max_seq_len: int) -> SchedulerConfig:
        """This config with max_model_len capped at a model's trained context `max_seq_len`."""
        limit = min(self.max_model_len or max_seq_len, max_seq_len)
        return dataclasses.replace(self, max_model_len=limit)


@dataclass(frozen=True)
class ParallelConfig:
    """How one engine is spread over processes (model parallel) and replicas (data parallel)."""

    tensor_parallel_size: int = 1
    """Ranks sharing every layer (heads, MLP channels, vocabulary split across them)."""
    pipeline_parallel_size: int = 1
    """Ranks holding contiguous layer ranges (stages)."""
    data_parallel_size: int = 1
    """Independent engine replicas (Ray actors) behind one endpoint."""
    nnodes: int = 1
    """Machines taking part; the model-parallel ranks are divided evenly among them."""
    node_rank: int = 0
    """This machine's index in 0..nnodes-1 (node 0 runs the driver and the HTTP server)."""
    master_addr: str = "127.0.0.1"
    """Address of rank 0, where all ranks meet."""
    master_port: int = 29500
    """TCP port of the rendezvous store on rank 0."""
    init_timeout_s: float = 60.0
    """How long ranks wait for each other at start-up before a DistributedError."""
    timeout_s: float = 120.0
    """Longest a collective of a forward pass may take before a DistributedError."""
    idle_timeout_s: float = 7 * 24 * 3600.0
    """Longest a worker waits for the driver's next step (the server may idle for long)."""
    num_micro_batches: int = 0
    """Pipeline micro-batches per step (0: one per stage)."""
    backend: str = "auto"
    """"auto" (nccl on CUDA, else gloo), "gloo" or "nccl"."""
    init_method: str = "tcp"
    """"tcp": meet at tcp://master_addr:master_port; "env": torchrun's environment (env://)."""

    def __post_init__(self) -> None:
        for name in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size"):
            if getattr(self, name) < 1:
                raise InvalidRequestError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.tensor_parallel_size > 1 and self.pipeline_parallel_size > 1:
            raise InvalidRequestError(
                f"tensor_parallel_size={self.tensor_parallel_size} with "
                f"pipeline_parallel_size={self.pipeline_parallel_size}: combining both is not "
                "supported yet; use one of them (the other = 1)"
            )
        if self.nnodes < 1 or not 0 <= self.node_rank < self.nnodes:
            raise InvalidRequestError(
                f"node_rank must be in 0..nnodes-1, got node_rank={self.node_rank} "
                f"nnodes={self.nnodes}"
            )
        if self.world_size % self.nnodes:
            raise InvalidRequestError(
                f"world size {self.world_size} (tensor x pipeline parallel) does not divide "
                f"evenly over nnodes={self.nnodes}"
            )
        if self.init_method not in ("tcp", "env"):
            raise InvalidRequestError(f"init_method must be tcp or env, got {self.init_method!r}")
        if self.backend not in ("auto", "gloo", "nccl"):
            raise InvalidRequestError(f"backend must be auto, gloo or nccl, got {self.backend!r}")
        if min(self.init_timeout_s, self.timeout_s, self.idle_timeout_s) <= 0:
            raise InvalidRequestError("distributed timeouts must be positive")

    @property
    def world_size(self) -> int:
        """Model-parallel ranks of one engine."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def nproc_per_node(self) -> int:
        return self.world_size // self.nnodes

    def node_ranks(self) -> list[int]:
        """Global ranks that run on this node."""
        n = self.nproc_per_node
        return list(range(self.node_rank * n, (self.node_rank + 1) * n))


@dataclass(frozen=True)
class EngineConfig:
    """Everything needed to stand up an engine on one model."""

    model: str | None = None
    """GGUF path, HF directory or short name; None: the embedded default model."""
    weights: str = "native"
    """"native": quantized GGUF tensors stay quantized; on the CPU in fp32 the whole step runs
    as one native call over the file's blocks (model/native_step.py) where the file allows,
    otherwise as "packed". "packed": per-module integer kernels over repacked blocks (what
    tensor/pipeline-parallel ranks run). "float": every tensor decoded to `device.dtype`."""
    transforms: str = ""
    """Quantize/prune specs applied at load, joined by "+" (see transforms/spec.py)."""
    calibration_start: int = 0
    """Characters of the calibration text skipped before its first window."""
    calibration_text: str | None = None
    """Plain-text file the calibrated load-time transforms read (GPTQ, AWQ, SmoothQuant, Wanda,
    SparseGPT); None: they refuse to run. The CLI gives a default, the library does not."""
    progress: bool = False
    """Show progress bars while loading."""
    device: DeviceConfig = field(default_factory=DeviceConfig)
    """Device, float type and CPU threads."""
    cache: CacheConfig = field(default_factory=CacheConfig)
    """KV cache layout and size."""
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    """Context length and batching limits."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """How the engine is spread over processes and replicas."""

    def __post_init__(self) -> None:
        if self.weights not in ("native", "packed", "float"):
            raise InvalidRequestError(
                f"weights must be 'native', 'packed' or 'float', got {self.weights!r}", "weights"
            )
        for name, cls in (
            ("device", DeviceConfig),
            ("cache", CacheConfig),
            ("scheduler", SchedulerConfig),
            ("parallel", ParallelConfig),
        ):
            if not isinstance(getattr(self, name), cls):
                raise InvalidRequestError(
                    f"{name} must be a {cls.__name__}, got {getattr(self, name)!r}; flat keyword "
                    f"arguments go through EngineConfig.from_kwargs",
                    name,
                )

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineConfig:
        """The tree from flat keyword arguments (LLM's convenience): `device="cpu",
        max_model_len=256, num_blocks=64` each go to the sub-config that owns the name; a
        sub-config may also be given whole (`cache=CacheConfig(...)`)."""
        subs = {}
        for name, sub in _SUBCONFIGS.items():
            base = kwargs.pop(name) if isinstance(kwargs.get(name), sub) else sub()
            flat = {f.name: kwargs.pop(f.name) for f in dataclasses.fields(sub) if f.name in kwargs}
            subs[name] = dataclasses.replace(base, **flat) if flat else base
        unknown = set(kwargs) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            known = {f.name for c in (cls, *_SUBCONFIGS.values()) for f in dataclasses.fields(c)}
            raise InvalidRequestError(
                f"unknown engine option(s) {sorted(unknown)}; known: {sorted(known)}"
            )
        return cls(**kwargs, **subs)


def _valid_speculative_method(method: str | None) -> bool:
    if method in (None, "ngram", "layerskip"):
        return True
    if method.startswith("draft:"):
        return bool(method.removeprefix("draft:"))
    n = method.removeprefix("layerskip:")
    return method.startswith("layerskip:") and n.isdigit() and int(n) >= 1


_SUBCONFIGS = {
    "device": DeviceConfig,
    "cache": CacheConfig,
    "scheduler": SchedulerConfig,
    "parallel": ParallelConfig,
}
