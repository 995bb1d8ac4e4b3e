"""FP8 (e4m3fn) primitives: pure tensor functions with explicit dtypes.

Everything that decides a byte of the output goes through these few functions, so the
streaming engine, the whole-model reference in the tests and `eval` agree bit for bit.
"""

from __future__ import annotations

import torch

from streamq.quant.granularity import Granularity, PerChannel, PerTensor

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
# A tensor whose absmax is 0 still needs a usable scale: 0 would give NaN on dequant.
MIN_SCALE = 1e-12


def weight_absmax(weight: torch.Tensor, granularity: Granularity) -> torch.Tensor:
    """Absmax of a 2D weight in float32: shape [] per tensor, [out, 1] per channel."""
    assert weight.ndim == 2, f"expected a 2D Linear weight, got shape {tuple(weight.shape)}"
    w = weight.abs()
    if isinstance(granularity, PerTensor):
        return w.amax().to(torch.float32)
    if isinstance(granularity, PerChannel):
        return w.amax(dim=1, keepdim=True).to(torch.float32)
    raise ValueError(f"weights cannot be quantized with granularity {granularity}")


def scale_from_absmax(absmax: torch.Tensor) -> torch.Tensor:
    """FP8 scale so that absmax maps to the largest finite e4m3 value; never 0."""
    assert absmax.dtype == torch.float32, absmax.dtype
    # A tensor divisor, not a Python scalar: CUDA turns `x / scalar` into `x * (1 / scalar)`,
    # which rounds differently from CPU's true division and would make scales device-dependent.
    return (absmax / torch.full_like(absmax, FP8_MAX)).clamp(min=MIN_SCALE)


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale, saturated to +-448 (the CUDA cast does not saturate everywhere), as e4m3."""
    assert scale.dtype == torch.float32, scale.dtype
    assert scale.ndim == 0 or scale.shape == (x.shape[0], 1), (tuple(scale.shape), tuple(x.shape))
    return (x.to(torch.float32) / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The value a loader reconstructs: q * scale, in `dtype`."""
    assert q.dtype == FP8_DTYPE, q.dtype
    return (q.to(torch.float32) * scale.to(torch.float32)).to(dtype)


def fake_quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Round trip through FP8 in x's dtype: what a static-activation matmul sees."""
    return dequantize_fp8(quantize_fp8(x, scale), scale, x.dtype)
