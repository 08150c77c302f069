"""Calibration: run the model over calibration text and record, for every linear layer, what
the calibrated transforms need (GPTQ/SparseGPT Hessians, AWQ input samples, SmoothQuant and
Wanda per-channel statistics) and, per decoder block, hidden states in and out (layer pruning).

The calibration text is given by the caller (the CLI defaults it to a novel,
austen_pride_and_prejudice.txt, so that evaluation on wiki_dev.txt never sees its own data)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from miaotui.errors import InvalidRequestError
from miaotui.model.standalone import forward_sequences
from miaotui.model.transformer import Transformer


@dataclass(frozen=True)
class CalibrationConfig:
    """What to run and what to keep."""

    text_path: Path | None = None
    """Plain text file read in place; None: none given (calibrated transforms refuse to run)."""
    start_char: int = 0
    """Characters of the text skipped before the first window: one file can then calibrate
    (its tail) and evaluate (its head) without overlap, e.g. 400_000 into wiki_dev.txt."""
    num_windows: int = 16
    """Number of token windows."""
    window: int = 256
    """Tokens per window."""
    gram: bool = False
    """Accumulate X^T X per linear (GPTQ, SparseGPT): K^2 floats each."""
    sample_rows: int = 0
    """Keep this many input rows per linear (AWQ scale search, least squares)."""
    hidden_states: bool = False
    """Keep each block's input and output hidden states (layer pruning)."""

    def __post_init__(self) -> None:
        if self.start_char < 0:
            raise InvalidRequestError(
                f"calibration start_char={self.start_char} must be >= 0 (characters skipped)",
                "start_char",
            )


@dataclass
class LinearStats:
    """Input statistics of one linear layer over the calibration tokens."""

    n: int = 0
    absmax: torch.Tensor | None = None
    """(K,) max |x_k| (SmoothQuant)."""
    sq_norm: torch.Tensor | None = None
    """(K,) sum x_k^2 (Wanda uses its square root)."""
    gram: torch.Tensor | None = None
    """(K, K) sum x x^T (float64 accumulation, stored float32)."""
    sample: list[torch.Tensor] = field(default_factory=list)
    """Kept input rows, concatenated by `inputs()`."""

    def inputs(self) -> torch.Tensor:
        return torch.cat(self.sample) if self.sample else torch.empty(0)

    def hessian(self) -> torch.Tensor:
        """2 X^T X / n, the layer-wise reconstruction Hessian of GPTQ / SparseGPT."""
        assert self.gram is not None, "calibrate with gram=True"
        return (2.0 / max(self.n, 1)) * self.gram.float()

    def input_norm(self) -> torch.Tensor:
        return self.sq_norm.sqrt()


@dataclass
class Calibration:
    linears: dict[str, LinearStats]
    block_inputs: list[torch.Tensor]
    """Per block, (n, C) hidden states entering it (hidden_states=True)."""
    block_outputs: list[torch.Tensor]


def calibration_windows(tokenizer, cfg: CalibrationConfig) -> list[list[int]]:
    """`num_windows` consecutive windows of `window` tokens from the calibration text, starting
    `start_char` characters in."""
    if cfg.text_path is None:
        raise InvalidRequestError(
            "calibrated transforms (gptq, awq, smoothquant, wanda, sparsegpt, structured) need "
            "calibration text: pass --calibration-text PATH, or CalibrationConfig(text_path=...)",
            "calibration_text",
        )
    text = Path(cfg.text_path).read_text(encoding="utf-8", errors="replace")[cfg.start_char :]
    need = cfg.num_windows * cfg.window
    ids = tokenizer.encode(text[: need * 8], add_special=False)
    if len(ids) < need:
        ids = tokenizer.encode(text, add_special=False)
    ids = ids[:need]
    return [ids[i : i + cfg.window] for i in range(0, len(ids) - cfg.window + 1, cfg.window)]


def linear_names(model: Transformer) -> list[str]:
    """Names of the decoder blocks' projection layers (the transformable linears)."""
    return [
        n for n, m in model.named_modules() if n.startswith("layers.") and isinstance(m, nn.Linear)
    ]


def calibrate(
    model: Transformer,
    windows: list[list[int]],
    cfg: CalibrationConfig,
    names: list[str] | None = None,
    progress: bool = False,
) -> Calibration:
    names = names if names is not None else linear_names(model)
    stats = {n: LinearStats() for n in names}
    handles = [
        model.get_submodule(n).register_forward_hook(_linear_hook(stats[n], cfg)) for n in names
    ]
    ins: list[list[torch.Tensor]] = [[] for _ in model.layers]
    outs: list[list[torch.Tensor]] = [[] for _ in model.layers]
    if cfg.hidden_states:
        for i, block in enumerate(model.layers):
            handles.append(block.register_forward_hook(_block_hook(ins[i], outs[i])))
    try:
        for w in _progress(windows, progress):
            forward_sequences(model, [w])
    finally:
        for h in handles:
            h.remove()
    return Calibration(stats, [torch.cat(x) for x in ins if x], [torch.cat(x) for x in outs if x])


def _linear_hook(s: LinearStats, cfg: CalibrationConfig):
    def hook(_module, inputs, _output):
        x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()  # (N, K)
        s.n += x.shape[0]
        amax = x.abs().amax(0)
        s.absmax = amax if s.absmax is None else torch.maximum(s.absmax, amax)
        sq = x.pow(2).sum(0)
        s.sq_norm = sq if s.sq_norm is None else s.sq_norm + sq
        if cfg.gram:
            g = x.double().T @ x.double()
            s.gram = g if s.gram is None else s.gram + g
        kept = sum(t.shape[0] for t in s.sample)
        if kept < cfg.sample_rows:
            s.sample.append(x[: cfg.sample_rows - kept].clone())

    return hook


def _block_hook(ins: list, outs: list):
    def hook(_module, inputs, output):
        ins.append(inputs[0].detach().float().clone())
        outs.append(output.detach().float().clone())

    return hook


def _progress(items, enabled: bool):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc="calibrating", unit="window", leave=False)
