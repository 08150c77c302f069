"""The decoder-only transformer shared by llama, qwen2 and gemma3: the config switches the few
places where they differ (q/k/v bias, q/k norms, sandwich norms, GeGLU, sliding windows)."""

from __future__ import annotations

import torch
from torch import nn

from miaotui.config import ModelConfig
from miaotui.model.attention import Attention, AttentionMetadata
from miaotui.model.kv_cache import KVCache
from miaotui.model.layers import GatedMLP, RMSNorm, Rotary


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config, layer)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = GatedMLP(config)
        sandwich = config.sandwich_norm
        self.post_attention_norm = RMSNorm(config.dim, config.norm_eps) if sandwich else None
        self.post_ffn_norm = RMSNorm(config.dim, config.norm_eps) if sandwich else None
        self.sliding = config.is_sliding(layer)

    def forward(
        self,
        x: torch.Tensor,
        rope: dict[bool, tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
        cache: KVCache,
    ) -> torch.Tensor:
        h = self.attention(self.attention_norm(x), rope[self.sliding], meta, cache)
        if self.post_attention_norm is not None:
            h = self.post_attention_norm(h)
        x = x + h
        h = self.feed_forward(self.ffn_norm(x))
        if self.post_ffn_norm is not None:
            h = self.post_ffn_norm(h)
        return x + h


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.rotary = Rotary(
            config.head_dim, config.max_seq_len, config.rope_theta, config.rope_scaling
        )
        self.rotary_local = None
        if config.sliding_window is not None:
            self.rotary_local = Rotary(
                config.head_dim,
                config.max_seq_len,
                config.rope_local_theta,
                type(config.rope_scaling)(),
            )

    def kv_spec(self) -> tuple[int, torch.dtype, torch.device]:
        """(KV heads held here, dtype, device) of the KV cache this model reads: fewer heads than
        the config's under tensor parallelism."""
        return self.layers[0].attention.n_kv_heads, self.norm.weight.dtype, self.rotary.cos.device

    def forward(
        self,
        input_ids: torch.Tensor,
        meta: AttentionMetadata,
        cache: KVCache,
        logits_index: torch.Tensor | None = None,
        num_layers: int | None = None,
    ) -> torch.Tensor:
        """input_ids: (N,) packed new tokens -> logits (S, V) for the rows in `logits_index`
        (all N rows when None). `num_layers`: only the first num_layers blocks, then the final
        norm and the head (a layer-skip draft, engine/draft.py; its K/V writes are those layers')."""
        x = self.hidden_states(input_ids, meta, cache, num_layers)
        if logits_index is not None:
            x = x[logits_index]
        return self.logits(x)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        meta: AttentionMetadata,
        cache: KVCache,
        num_layers: int | None = None,
    ) -> torch.Tensor:
        x = self.tok_embeddings(input_ids)  # (N, C)
        if self.config.embed_scale != 1.0:
            x = x * torch.tensor(self.config.embed_scale, dtype=x.dtype)
        rope = {False: self.rotary(meta.positions)}
        rope[True] = self.rotary_local(meta.positions) if self.rotary_local else rope[False]
        for block in self.layers[:num_layers]:
            x = block(x, rope, meta, cache)
        return self.norm(x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.output(x).float()  # (S, V)
        cap = self.config.final_logit_softcap
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits
