"""Compressed storage of pruned weights and the sparse matmul kernel.

Storage:

* :class:`BitmaskSparse` -- the kept values in row-major order plus a packed bitmask (one bit
  per weight, little-endian bit order within each byte: element ``8*j + b`` is bit ``b`` of
  byte ``j``). ``numel * (1 - s) * itemsize + numel / 8`` bytes, vs ``numel * itemsize``
  dense: for fp32 it pays from ~3 % sparsity, for fp16/bf16 from ~6 %. Round trip is
  bit-exact.
* :func:`to_csr` -- a ``torch.sparse_csr_tensor`` (row pointers, column indices, values) for
  the kernel: ``nnz * (itemsize + index bytes) + (M + 1) * index bytes``, bigger than the
  bitmask format (int32 indices double the fp32 size of a kept weight).

Kernel: :func:`sparse_linear` computes ``x @ W^T`` as ``(W_csr @ x^T)^T`` with
``torch.sparse.mm`` (MKL sparse BLAS on CPU). On CPU it supports fp32/fp64 only (no bf16/fp16
kernel: ``addmm_out_sparse_csr_impl_mkl`` is not implemented for them), so other dtypes
are computed in fp32 and cast back. COO tensors are accepted too but are roughly 10x slower
than CSR on CPU. ``bench/bench_sparse.py`` measures where it beats dense ``torch.mm``.

Semi-structured 2:4 (``torch.sparse.to_sparse_semi_structured``) needs CUDA (cuSPARSELt or
CUTLASS kernels); on CPU it raises "Only CUDA tensors are currently supported".
:func:`semi_structured_available` probes it, and :func:`sparse_linear` accepts such a tensor
where it exists.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "BitmaskSparse",
    "compress",
    "csr_nbytes",
    "decompress",
    "pack_bits",
    "semi_structured_available",
    "sparse_linear",
    "to_csr",
    "to_semi_structured",
    "unpack_bits",
]

_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a bool tensor (flattened row-major) into ``ceil(numel / 8)`` uint8 bytes."""
    flat = mask.detach().reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    bits = flat.reshape(-1, 8) * _BIT_WEIGHTS.to(flat.device)
    return bits.sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``numel`` bits as a 1-D bool tensor."""
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError("packed must be a 1-D uint8 tensor")
    if packed.numel() * 8 < numel:
        raise ValueError(f"{packed.numel()} bytes hold fewer than {numel} bits")
    bits = packed.unsqueeze(1) & _BIT_WEIGHTS.to(packed.device)
    return (bits != 0).reshape(-1)[:numel]


@dataclass(frozen=True)
class BitmaskSparse:
    """A sparse tensor as kept ``values`` (1-D, row-major order) and a packed ``bitmask``."""

    shape: tuple[int, ...]
    values: torch.Tensor
    bitmask: torch.Tensor

    @classmethod
    def compress(cls, w: torch.Tensor, mask: torch.Tensor | None = None) -> BitmaskSparse:
        """Store ``w``'s entries where ``mask`` (default ``w != 0``) is True."""
        w = w.detach()
        if mask is None:
            mask = w != 0
        elif mask.shape != w.shape or mask.dtype != torch.bool:
            raise ValueError(
                f"mask must be bool of shape {tuple(w.shape)}, got {mask.dtype} {tuple(mask.shape)}"
            )
        mask = mask.to(w.device)
        return cls(shape=tuple(w.shape), values=w[mask].clone(), bitmask=pack_bits(mask))

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def nbytes(self) -> int:
        """Bytes of the stored payload (values + bitmask)."""
        return self.values.numel() * self.values.element_size() + self.bitmask.numel()

    @property
    def dense_nbytes(self) -> int:
        return self.numel * self.values.element_size()

    def mask(self) -> torch.Tensor:
        """The keep-mask, shaped like the dense tensor."""
        return unpack_bits(self.bitmask, self.numel).reshape(self.shape)

    def decompress(self) -> torch.Tensor:
        """The dense tensor (zeros where the mask is False)."""
        m = unpack_bits(self.bitmask, self.numel)
        if int(m.sum()) != self.values.numel():
            raise ValueError(f"bitmask has {int(m.sum())} set bits for {self.nnz} values")
        out = torch.zeros(self.numel, dtype=self.values.dtype, device=self.values.device)
        out[m] = self.values
        return out.reshape(self.shape)

    def to_csr(self, index_dtype: torch.dtype = torch.int32) -> torch.Tensor:
        """CSR tensor of the stored entries (2-D only)."""
        if len(self.shape) != 2:
            raise ValueError(f"CSR needs a 2-D tensor, got shape {self.shape}")
        return _csr_from_mask(self.decompress(), self.mask(), index_dtype)


def compress(w: torch.Tensor, mask: torch.Tensor | None = None) -> BitmaskSparse:
    """:meth:`BitmaskSparse.compress`."""
    return BitmaskSparse.compress(w, mask)


def decompress(b: BitmaskSparse) -> torch.Tensor:
    """:meth:`BitmaskSparse.decompress`."""
    return b.decompress()


def _csr_from_mask(w: torch.Tensor, mask: torch.Tensor, index_dtype: torch.dtype) -> torch.Tensor:
    if index_dtype not in (torch.int32, torch.int64):
        raise ValueError(f"index_dtype must be torch.int32 or torch.int64, got {index_dtype}")
    m_rows, k_cols = w.shape
    crow = torch.zeros(m_rows + 1, dtype=torch.int64, device=w.device)
    crow[1:] = torch.cumsum(mask.sum(dim=1), dim=0)
    col = mask.nonzero(as_tuple=True)[1]  # row-major order, matches w[mask]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(
            crow.to(index_dtype),
            col.to(index_dtype),
            w[mask].contiguous(),
            size=(m_rows, k_cols),
            dtype=w.dtype,
            device=w.device,
            check_invariants=False,  # built correctly here; checks cost a pass over the data
        )


def to_csr(
    w: torch.Tensor, mask: torch.Tensor | None = None, index_dtype: torch.dtype = torch.int32
) -> torch.Tensor:
    """``torch.sparse_csr_tensor`` of ``w (M, K)`` keeping ``mask`` (default ``w != 0``)."""
    if w.dim() != 2:
        raise ValueError(f"w must be 2-D (M, K), got shape {tuple(w.shape)}")
    w = w.detach()
    if mask is None:
        mask = w != 0
    elif mask.shape != w.shape or mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool of shape {tuple(w.shape)}")
    return _csr_from_mask(w, mask.to(w.device), index_dtype)


def csr_nbytes(t: torch.Tensor) -> int:
    """Bytes of a CSR tensor's row pointers, column indices and values."""
    if t.layout != torch.sparse_csr:
        raise ValueError(f"expected a sparse CSR tensor, got layout {t.layout}")
    parts = (t.crow_indices(), t.col_indices(), t.values())
    return sum(p.numel() * p.element_size() for p in parts)


_KERNEL_DTYPES = (torch.float32, torch.float64)
_SPARSE_LAYOUTS = (torch.sparse_csr, torch.sparse_coo)

try:
    from torch.sparse import SparseSemiStructuredTensor as _SemiStructured
except ImportError:  # pragma: no cover - old torch
    _SemiStructured = ()


def sparse_linear(
    x: torch.Tensor, w_sparse: torch.Tensor | BitmaskSparse, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x (..., K) @ W^T (+ bias) -> (..., M)`` for a sparse ``W (M, K)``.

    ``w_sparse``: a CSR tensor (fast path, from :func:`to_csr`), a COO tensor (slow on CPU),
    a semi-structured 2:4 tensor (CUDA only), or a :class:`BitmaskSparse` (converted to CSR on
    every call -- convert once with :func:`to_csr` instead in a hot loop). Computed as
    ``torch.sparse.mm(W, x^T)^T``: MKL wants ``x^T`` row-major, so for ``N > 1`` a transposed
    copy of ``x`` is made (a real part of the cost at large ``N``, see the benchmark's
    ``kernel_us``), and the result for ``N > 1`` is a transposed (non-contiguous) view.
    Dtypes other than fp32/fp64 go through fp32; the result has ``x``'s dtype.
    """
    if isinstance(w_sparse, BitmaskSparse):
        w_sparse = w_sparse.to_csr()
    elif isinstance(w_sparse, _SemiStructured):
        return F.linear(x, w_sparse, bias)
    if w_sparse.layout not in _SPARSE_LAYOUTS:
        raise TypeError(
            f"w_sparse must be a CSR/COO/semi-structured tensor or BitmaskSparse, got layout "
            f"{w_sparse.layout}"
        )
    k = x.shape[-1]
    if w_sparse.dim() != 2 or w_sparse.shape[1] != k:
        raise ValueError(f"w_sparse shape {tuple(w_sparse.shape)} does not take inputs of {k}")
    x2 = x if x.dim() == 2 else x.reshape(-1, k)
    wdt = w_sparse.dtype
    if wdt not in _KERNEL_DTYPES:
        w_sparse = w_sparse.to(torch.float32)
        wdt = torch.float32
    if x2.dtype != wdt:
        x2 = x2.to(wdt)
    y = torch.sparse.mm(w_sparse, x2.T).T  # (N, M)
    if bias is not None:
        y = y + bias.to(wdt)
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], y.shape[-1])


def to_semi_structured(w: torch.Tensor) -> torch.Tensor:
    """``torch.sparse.to_sparse_semi_structured(w)`` for a 2:4-sparse ``w``; CUDA only.

    Raises ``RuntimeError`` on CPU (torch: "Only CUDA tensors are currently supported").
    """
    from torch.sparse import to_sparse_semi_structured

    return to_sparse_semi_structured(w)


def semi_structured_available(device: str | torch.device = "cpu") -> tuple[bool, str]:
    """Whether a 2:4 semi-structured matmul works on ``device``: ``(ok, reason)``."""
    try:
        dt = torch.float16 if torch.device(device).type == "cuda" else torch.float32
        w = torch.tensor([1.0, 0.0, 2.0, 0.0], dtype=dt, device=device).repeat(64, 16)
        ws = to_semi_structured(w)
        x = torch.ones(64, 64, dtype=dt, device=device)
        y = F.linear(x, ws)
        ok = torch.allclose(y.float(), F.linear(x, w).float())
        return ok, "ok" if ok else "wrong result"
    except Exception as e:  # noqa: BLE001 - any failure means "not available"
        return False, f"{type(e).__name__}: {e}".strip()
