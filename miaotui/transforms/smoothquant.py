"""SmoothQuant (Xiao et al. 2022, "SmoothQuant: Accurate and Efficient Post-Training Quantization
for Large Language Models"), following the reference (mit-han-lab/smoothquant, smooth.py).

A few activation channels are 10-100x larger than the rest, which ruins per-token int8
activation scales. Dividing channel j of the activations by s_j and multiplying column j of the
weight by s_j leaves X W^T unchanged and moves the difficulty into the weight, which per-channel
int8 handles easily: s_j = max|X_j|^alpha / max|W_j|^(1 - alpha).

Contract with the caller: after ``w = apply_smoothing(w, s)`` the layer must see x / s, so the
caller divides the preceding RMSNorm weight by s (``norm.weight /= s``). Linears that share the
input (q, k, v; gate, up) share one s: take weight_absmax over all of them.
"""

from torch import Tensor


def smooth_scales(act_absmax: Tensor, weight_absmax: Tensor, alpha: float = 0.5) -> Tensor:
    """s (K,) = max|X_j|^alpha / max|W_j|^(1 - alpha); weight_absmax and s clamped at 1e-5 as in
    the reference (a channel never active in calibration gets s = 1e-5).

    act_absmax (K,): per-channel max |x| over calibration tokens; weight_absmax (K,): per input
    channel max |W[:, j]| over every linear fed by this input.
    """
    if act_absmax.shape != weight_absmax.shape or act_absmax.dim() != 1:
        raise ValueError(
            f"act_absmax {tuple(act_absmax.shape)} and weight_absmax "
            f"{tuple(weight_absmax.shape)} must both be (K,)"
        )
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha} must lie in [0, 1]")
    a = act_absmax.float().pow(alpha)
    b = weight_absmax.float().clamp(min=1e-5).pow(1 - alpha)
    return (a / b).clamp(min=1e-5)


def apply_smoothing(w: Tensor, s: Tensor) -> Tensor:
    """W diag(s): column j of w (M, K) times s_j. The input must then be x / s (see module doc)."""
    return w * s.to(w.dtype)
