"""Building blocks shared by every architecture: RMSNorm, RoPE, gated MLP."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from miaotui.config import ModelConfig, RopeScaling


class RMSNorm(nn.Module):
    """y = x / rms(x) * w, computed in fp32 (Zhang & Sennrich 2019)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)  # one fused op
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling) -> torch.Tensor:
    """Inverse frequencies (D/2,), with llama3 frequency-dependent scaling when configured."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if scaling.kind == "linear":
        inv = inv / scaling.factor
    elif scaling.kind == "llama3":
        # Llama 3.1: long wavelengths scaled by `factor`, short ones kept, smooth in between.
        low_wl = scaling.original_max_len / scaling.low_freq_factor
        high_wl = scaling.original_max_len / scaling.high_freq_factor
        wl = 2 * math.pi / inv
        smooth = (scaling.original_max_len / wl - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor
        )
        scaled = torch.where(wl > low_wl, inv / scaling.factor, inv)
        mid = (wl <= low_wl) & (wl >= high_wl)
        inv = torch.where(mid, (1 - smooth) * inv / scaling.factor + smooth * inv, scaled)
    return inv.float()


class Rotary(nn.Module):
    """cos/sin tables for rotate-half (NeoX/HF) RoPE, looked up by position."""

    def __init__(self, head_dim: int, max_len: int, theta: float, scaling: RopeScaling):
        super().__init__()
        inv = rope_inv_freq(head_dim, theta, scaling)
        freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv)  # (L, D/2)
        emb = torch.cat([freqs, freqs], dim=-1)  # (L, D)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[positions], self.sin[positions]  # (N, D) each


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (N, heads, D); cos/sin: (N, D)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = torch.cat([-x2, x1], dim=-1)
    if cos.dtype != x.dtype:
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.addcmul(x * cos.unsqueeze(1), rotated, sin.unsqueeze(1))


class GatedMLP(nn.Module):
    """w_down(act(w_gate x) * w_up x): SwiGLU (llama, qwen2) or GeGLU-tanh (gemma)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.w_gate = nn.Linear(config.dim, config.intermediate_size, bias=False)
        self.w_up = nn.Linear(config.dim, config.intermediate_size, bias=False)
        self.w_down = nn.Linear(config.intermediate_size, config.dim, bias=False)
        self.activation = config.activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.w_gate(x)
        gate = F.silu(gate) if self.activation == "silu" else F.gelu(gate, approximate="tanh")
        return self.w_down(gate * self.w_up(x))
