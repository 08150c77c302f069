"""The server's own forward passes beside the engine's: final hidden states (embeddings) and
prompt log-probabilities (`echo` with `logprobs` on completions, what lm-eval's log-likelihood
tasks read). They need a `Transformer` with all hidden states (the native step returns only
sampled logits): a float build of the served checkpoint, loaded on first use, with a KV cache of
its own. Passes run one at a time in a worker thread (callers use asyncio.to_thread), so the
event loop and the engine's step loop go on."""

from __future__ import annotations

import threading

import torch

from miaotui.engine.sampler import SampledToken
from miaotui.server.errors import APIError

BLOCK = 16


class ServerForward:
    def __init__(self, model_path: str | None):
        self.model_path = model_path
        self._model = None
        self._lock = threading.Lock()

    def model(self):
        """A float build of the served checkpoint, loaded on first use: a module of its own,
        never the one the step thread runs (which may be the native step, or a tensor-parallel
        shard)."""
        if self._model is None:
            if self.model_path is None:
                raise APIError(
                    400,
                    "embeddings and prompt logprobs need the served checkpoint's path, which this "
                    "server was not given (ServerConfig.model_path)",
                )
            from miaotui.load.open import open_checkpoint
            from miaotui.model.build import build_model

            ckpt = open_checkpoint(self.model_path)
            self._model = build_model(ckpt, torch.device("cpu"), torch.float32, "float")
        return self._model

    @torch.inference_mode()
    def hidden_states(self, sequences: list[list[int]]) -> list[torch.Tensor]:
        """One packed pass; each sequence attends only to itself. -> a (T_i, C) float32 tensor
        per sequence: the final hidden states, after the last norm."""
        from miaotui.model.attention import build_attention_metadata
        from miaotui.model.kv_cache import KVCache

        with self._lock:
            model = self.model()
            c = model.config
            tables, next_block = [], 1  # block 0 stays unused, like the pool's null block
            for ids in sequences:
                n = -(-len(ids) // BLOCK)
                tables.append(list(range(next_block, next_block + n)))
                next_block += n
            n_kv_heads, dtype, device = model.kv_spec()
            cache = KVCache(c.n_layers, next_block * BLOCK, n_kv_heads, c.head_dim, dtype, device)
            lens = [len(ids) for ids in sequences]
            meta = build_attention_metadata([0] * len(lens), lens, tables, BLOCK, c.sliding_window)
            packed = torch.tensor([t for ids in sequences for t in ids], device=device)
            hidden = model.hidden_states(packed, meta, cache).float()  # (N, C)
            return list(hidden.split(lens))

    @torch.inference_mode()
    def prompt_logprobs(self, ids: list[int], top: int) -> list[SampledToken]:
        """Per prompt token, its log-probability given the tokens before it and the `top` most
        likely tokens there; the first token has none (nothing predicts it)."""
        hidden = self.hidden_states([ids])[0]
        with self._lock:
            logits = self.model().logits(hidden[:-1])  # (T-1, V)
        logp = torch.log_softmax(logits.float(), dim=-1)
        chosen = logp.gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1).tolist()
        out = [SampledToken(ids[0])]
        vals, idx = torch.topk(logp, top, dim=-1) if top else (None, None)
        for i, token in enumerate(ids[1:]):
            tops = tuple(zip(idx[i].tolist(), vals[i].tolist())) if top else ()
            out.append(SampledToken(token, chosen[i], tops))
        return out
