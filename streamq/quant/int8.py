"""INT8 (symmetric) primitives for W8A8: pure tensor functions with explicit dtypes.

Weights: one scale per output channel, scale = absmax / 127 in float32, codes
round-half-to-even(w / scale) clamped to [-127, 127] (the symmetric range vLLM's and
compressed-tensors' INT8 kernels assume; -128 is never produced). Activations are
quantized per token at inference time by the same rule, so nothing about them is stored.
"""

from __future__ import annotations

import torch

INT8_MAX = 127.0
# An all-zero row still needs a usable scale: 0 would give NaN on dequantization.
MIN_SCALE = 1e-12


def channel_scale(weight: torch.Tensor) -> torch.Tensor:
    """Per-output-channel scale of a 2D weight: float32 [out, 1] = absmax / 127, never 0."""
    assert weight.ndim == 2, f"expected a 2D Linear weight, got shape {tuple(weight.shape)}"
    absmax = weight.abs().amax(dim=1, keepdim=True).to(torch.float32)
    # A tensor divisor, as in quant.fp8: CUDA rewrites `x / scalar` as a multiplication.
    return (absmax / torch.full_like(absmax, INT8_MAX)).clamp(min=MIN_SCALE)


def quantize_int8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """round(x / scale) (half to even), clamped to [-127, 127], as int8. scale: float32 [] or [rows, 1]."""
    assert scale.dtype == torch.float32, scale.dtype
    assert scale.ndim == 0 or scale.shape == (x.shape[0], 1), (tuple(scale.shape), tuple(x.shape))
    return torch.round(x.to(torch.float32) / scale).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q * scale in `dtype`: the value a loader reconstructs."""
    assert q.dtype == torch.int8, q.dtype
    return (q.to(torch.float32) * scale.to(torch.float32)).to(dtype)


def token_scale(x: torch.Tensor) -> torch.Tensor:
    """Dynamic per-token scale of a 2D activation: float32 [rows, 1] = row absmax / 127, never 0."""
    absmax = x.abs().amax(dim=-1, keepdim=True).to(torch.float32)
    return (absmax / torch.full_like(absmax, INT8_MAX)).clamp(min=MIN_SCALE)
