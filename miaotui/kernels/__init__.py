"""Fast CPU kernels for quantized linear layers (int8 / int4 weights, AVX2), with a plain-PyTorch
reference. Compiled on first use, see build.py; numerics in reference.py."""

from miaotui.kernels.build import kernels_available, load_kernels
from miaotui.kernels.ops import choose_path, linear_int4, linear_int8
from miaotui.kernels.packed import PackedInt4, PackedInt8, pack_int4, pack_int8
from miaotui.kernels.reference import dequantize_packed, linear_reference

__all__ = [
    "PackedInt4",
    "PackedInt8",
    "choose_path",
    "dequantize_packed",
    "kernels_available",
    "linear_int4",
    "linear_int8",
    "linear_reference",
    "load_kernels",
    "pack_int4",
    "pack_int8",
]
