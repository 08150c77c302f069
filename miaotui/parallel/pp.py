"""Pipeline parallelism (GPipe, Huang et al. 2019): rank s holds a contiguous range of layers.

Stage 0 (the driver) embeds the tokens, the last stage applies the final norm and the output head.
Hidden states (N, C) go point-to-point from stage to stage, logits of the sampled rows from the
last stage back to the driver. Each step's sequences are split into micro-batches so that stage
s+1 works on micro-batch m while stage s computes micro-batch m+1:

    stage 0:  F0(m0) F0(m1)  .....  sample
    stage 1:  ...... F1(m0) F1(m1)

Within a step that hides all but one micro-batch of each stage; between steps the pipeline drains
because the next step's tokens depend on sampling (a bubble of (stages-1)/(stages-1+micro) of
the step).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch

from miaotui.config import CacheConfig, EngineConfig
from miaotui.engine.runner import ModelInput, ModelRunner
from miaotui.engine.scheduler import ScheduledRequest, SchedulerOutput
from miaotui.errors import InvalidRequestError
from miaotui.load.checkpoint import Checkpoint
from miaotui.model.kv_cache import Int8KVCache, KVCache
from miaotui.model.transformer import Transformer
from miaotui.parallel.dist import Comm
from miaotui.parallel.tp import build_from_sources, source_bytes

log = logging.getLogger(__name__)


def stage_layers(n_layers: int, num_stages: int, stage: int) -> range:
    """Layers of `stage`: contiguous, as equal as possible."""
    if num_stages > n_layers:
        raise InvalidRequestError(
            f"pipeline_parallel_size={num_stages} exceeds the model's {n_layers} layers; "
            f"use at most {n_layers} stages",
            "pipeline_parallel_size",
        )
    return range(stage * n_layers // num_stages, (stage + 1) * n_layers // num_stages)


def build_stage_model(ckpt: Checkpoint, cfg: EngineConfig, stage: int, num_stages: int):
    """The layers of `stage` (renumbered from 0, so the stage's KV cache holds only them), plus
    the embedding on the first stage and the final norm and head on the last."""
    c = ckpt.config
    layers = stage_layers(c.n_layers, num_stages, stage)
    first, last = stage == 0, stage == num_stages - 1
    sources = {}
    for name, src in ckpt.tensors.items():
        if name.startswith("layers."):
            i = int(name.split(".")[1])
            if i in layers:
                sources[f"layers.{i - layers.start}.{name.split('.', 2)[2]}"] = src
        else:
            sources[name] = src
    needs_embedding = first or (last and c.tie_embeddings)  # a tied head is the embedding
    drop = set()
    if not needs_embedding:
        drop.add("tok_embeddings.weight")
    if not last:
        drop |= {"output.weight", "norm.weight"}
    sources = {n: s for n, s in sources.items() if n not in drop}
    local = dataclasses.replace(c, n_layers=len(layers))
    model = build_from_sources(ckpt, local, sources, cfg, frozenset(drop))
    for j, block in enumerate(model.layers):  # sliding-window layers follow global indices
        block.sliding = block.attention.sliding = c.is_sliding(layers.start + j)
    if not needs_embedding:
        model.tok_embeddings = None
    if not last:
        model.output = model.norm = None
    model.config = c
    log.info(
        "stage %d/%d: layers %d..%d; read %.1f MB of the file",
        stage,
        num_stages,
        layers.start,
        layers.stop - 1,
        source_bytes(sources) / 1e6,
    )
    return model


@dataclass
class PipelineInput:
    """One step split into micro-batches (contiguous runs of the scheduled sequences)."""

    micro: list[ModelInput]

    @property
    def sample_ids(self) -> list[str]:
        return [rid for m in self.micro for rid in m.sample_ids]

    @property
    def num_rows(self) -> list[int]:
        return [n for m in self.micro for n in m.num_rows]


def split_micro_batches(
    scheduled: list[ScheduledRequest], num: int
) -> list[list[ScheduledRequest]]:
    """Up to `num` contiguous, non-empty groups with about equal token counts."""
    num = max(1, min(num, len(scheduled)))
    sizes = [len(s.token_ids) for s in scheduled]
    total, groups, acc, start = sum(sizes), [], 0, 0
    for i, n in enumerate(sizes):
        acc += n
        left = len(scheduled) - i - 1  # sequences still to place
        need = num - len(groups) - 1  # groups still to open after this one
        if need > 0 and (acc * num >= total * (len(groups) + 1) or left == need):
            groups.append(scheduled[start : i + 1])
            start = i + 1
    groups.append(scheduled[start:])
    return [g for g in groups if g]


class PipelineRunner(ModelRunner):
    """One stage's runner. On the driver (stage 0) `execute` returns the step's logits; on the
    other stages it returns nothing useful (they send their results on)."""

    def __init__(
        self,
        model: Transformer,
        stage: int,
        num_stages: int,
        cache: CacheConfig,
        num_blocks: int,
        device: torch.device,
        dtype: torch.dtype,
        comm: Comm,
        num_micro_batches: int,
    ):
        # Not ModelRunner.__init__: this stage's KV cache holds only its own layers.
        self.model, self.block_size, self.device, self.dtype = (
            model,
            cache.block_size,
            device,
            dtype,
        )
        self.stage, self.num_stages, self.comm = stage, num_stages, comm
        self.block_tables: dict[str, list[int]] = {}
        self.num_micro_batches = num_micro_batches or num_stages
        c = model.config
        kv_cls = Int8KVCache if cache.kv_dtype == "int8" else KVCache
        n_kv = model.layers[0].attention.n_kv_heads
        self.kv_cache = kv_cls(
            len(model.layers), num_blocks * cache.block_size, n_kv, c.head_dim, dtype, device
        )

    def prepare(self, out: SchedulerOutput) -> PipelineInput:
        self.update_block_tables(out)
        groups = split_micro_batches(out.scheduled, self.num_micro_batches)
        return PipelineInput([self.build_input(g) for g in groups])

    def greedy_tokens(self, rows: int) -> list[int] | None:
        """None: the logits come from the last stage's head, not from this stage's model."""
        return None

    @torch.inference_mode()
    def execute(self, inp: PipelineInput) -> torch.Tensor:
        first, last = self.stage == 0, self.stage == self.num_stages - 1
        C, V = self.model.config.dim, self.model.config.vocab_size
        pending, logits = [], []
        for m in inp.micro:
            n = m.input_ids.shape[0]
            x = None if first else self.comm.recv((n, C), self.dtype, self.stage - 1)
            x = self._layers(m, x)
            if not last:
                pending.append(self.comm.send(x, self.stage + 1))  # overlaps the next micro-batch
            elif len(m.sample_ids):
                out = self._head(m, x)
                if first:
                    logits.append(out)
                else:
                    pending.append(self.comm.send(out, 0))
        for p in pending:
            self.comm.wait(p)
        if first and not last:
            for m in inp.micro:
                if len(m.sample_ids):
                    shape = (len(m.sample_ids), V)
                    logits.append(self.comm.recv(shape, torch.float32, self.num_stages - 1))
        if not logits:
            return torch.empty(0, V)
        return torch.cat(logits)

    def _layers(self, m: ModelInput, x: torch.Tensor | None) -> torch.Tensor:
        """This stage's part of Transformer.hidden_states (which it mirrors)."""
        model, meta = self.model, m.meta
        if x is None:
            x = model.tok_embeddings(m.input_ids)  # (N, C)
            if model.config.embed_scale != 1.0:
                x = x * torch.tensor(model.config.embed_scale, dtype=x.dtype)
        rope = {False: model.rotary(meta.positions)}
        rope[True] = model.rotary_local(meta.positions) if model.rotary_local else rope[False]
        for block in model.layers:
            x = block(x, rope, meta, self.kv_cache)
        return x

    def _head(self, m: ModelInput, x: torch.Tensor) -> torch.Tensor:
        return self.model.logits(self.model.norm(x[m.logits_index]))  # (S, V) float32
