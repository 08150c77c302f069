"""A stand-in for nn.Linear whose weight is stored compressed (CSR) and run by the sparse kernel
of `kernels/sparse.py`. Pruning (transforms/prune.py) swaps it in only where it is faster than
dense; model code never asks `if sparse`."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from miaotui.kernels.sparse import sparse_linear, to_csr


class SparseLinear(nn.Module):
    """y = x W^T (+ b) with W (M, K) held as CSR: row pointers, column indices, fp32 values.

    The three CSR parts are buffers, so `state_dict()` saves the compressed form; `weight`
    gives the dense matrix back (for quantizers, checkpoints that want dense tensors, tests).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.dtype = weight.dtype
        csr = to_csr(weight.detach().float())  # the CPU kernel is fp32/fp64 only
        self.register_buffer("crow_indices", csr.crow_indices())
        self.register_buffer("col_indices", csr.col_indices())
        self.register_buffer("values", csr.values())
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> SparseLinear:
        return cls(linear.weight, linear.bias)

    def csr(self) -> torch.Tensor:
        """The weight as a CSR tensor (a view of the buffers, no copy)."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            return torch.sparse_csr_tensor(
                self.crow_indices,
                self.col_indices,
                self.values,
                size=(self.out_features, self.in_features),
                check_invariants=False,
            )

    @property
    def weight(self) -> torch.Tensor:
        """Dense (M, K) weight in the original dtype, zeros included."""
        return self.csr().to_dense().to(self.dtype)

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    def to_linear(self) -> nn.Linear:
        """The equivalent dense nn.Linear."""
        lin = nn.Linear(self.in_features, self.out_features, self.bias is not None, device="meta")
        lin.weight = nn.Parameter(self.weight, requires_grad=False)
        if self.bias is not None:
            lin.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=False)
        return lin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = sparse_linear(x, self.csr(), self.bias)  # (..., M), x's dtype
        return y.contiguous()

    def extra_repr(self) -> str:
        density = self.nnz / max(self.in_features * self.out_features, 1)
        return f"in={self.in_features}, out={self.out_features}, density={density:.3f}, csr"
