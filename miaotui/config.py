"""Frozen configuration dataclasses: the only place where CLI/env values become config."""

from __future__ import annotations

from dataclasses import dataclass, field

from miaotui.errors import InvalidRequestError, UnsupportedModelError

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "gemma3")


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
            raise InvalidRequestError(f"block_size must be positive, got {self.block_size}")
        if self.kv_dtype not in ("auto", "int8"):
            raise InvalidRequestError(f"kv_dtype must be 'auto' or 'int8', got {self.kv_dtype!r}")
        if self.memory_gib <= 0:
            raise InvalidRequestError(f"memory_gib must be positive, got {self.memory_gib}")
        if self.num_blocks is not None and self.num_blocks < 2:
            raise InvalidRequestError(f"num_blocks must be >= 2, got {self.num_blocks}")


@dataclass(frozen=True)
class EngineConfig:
    """Everything needed to stand up an engine on one model."""

    model: str | None = None
    """GGUF path, HF directory or short name; None: the embedded default model."""
    weights: str = "native"
    """"native": quantized GGUF tensors stay quantized and run on integer kernels;
    "float": every tensor is decoded to `dtype` at load."""
    device: str = "auto"
    """"auto", "cpu" or "cuda[:n]"."""
    dtype: str = "fp32"
    """Float type of activations (and of weights with weights="float")."""
    threads: int | None = None
    """CPU threads (None: torch default)."""
    max_model_len: int | None = 4096
    """Longest prompt + output; None: the model's trained context."""
    max_num_seqs: int = 16
    """Most requests in one batch."""
    max_num_batched_tokens: int = 512
    """Token budget of one step (chunked prefill splits longer prompts)."""
    max_waiting: int = 256
    """Queue bound; more waiting requests are refused (HTTP 429)."""
    cache: CacheConfig = field(default_factory=CacheConfig)
    """KV cache layout and size."""
    transforms: str = ""
    """Quantize/prune specs applied at load, joined by "+" (see transforms/pipeline.py)."""
    progress: bool = False
    """Show progress bars while loading."""

    def __post_init__(self) -> None:
        if self.weights not in ("native", "float"):
            raise InvalidRequestError(
                f"weights must be 'native' or 'float', got {self.weights!r}", "weights"
            )
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise InvalidRequestError("max_num_seqs and max_num_batched_tokens must be >= 1")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise InvalidRequestError(
                f"max_model_len must be >= 2 (or None for the model's context), "
                f"got {self.max_model_len}",
                "max_model_len",
            )
        if self.threads is not None and self.threads < 1:
            raise InvalidRequestError(f"threads must be >= 1, got {self.threads}", "threads")
        from miaotui.device import DTYPES

        if self.dtype not in DTYPES:
            raise InvalidRequestError(
                f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}", "dtype"
            )
