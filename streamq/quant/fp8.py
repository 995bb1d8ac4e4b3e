"""FP8 (e4m3fn) primitives: pure tensor functions with explicit dtypes.

Everything that decides a byte of the output goes through these few functions, so the
streaming engine, the whole-model reference in the tests and `eval` agree bit for bit.
"""

from __future__ import annotations

import torch

from streamq.quant.granularity import Granularity, PerBlock, PerChannel, PerTensor

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
    if isinstance(granularity, PerBlock):
        return block_absmax(weight, granularity)
    raise ValueError(f"weights cannot be quantized with granularity {granularity}")


def block_absmax(weight: torch.Tensor, block: PerBlock) -> torch.Tensor:
    """Absmax of every `block.rows` x `block.cols` tile in float32: [ceil(out/r), ceil(in/c)].

    Edge tiles are padded with zeros, which never raise an absmax (DeepSeek-V3's layout).
    """
    assert weight.ndim == 2, f"expected a 2D Linear weight, got shape {tuple(weight.shape)}"
    out_f, in_f = weight.shape
    rb, cb = -(-out_f // block.rows), -(-in_f // block.cols)
    w = weight.abs()
    if (rb * block.rows, cb * block.cols) != (out_f, in_f):
        w = torch.nn.functional.pad(w, (0, cb * block.cols - in_f, 0, rb * block.rows - out_f))
    return w.reshape(rb, block.rows, cb, block.cols).amax(dim=(1, 3)).to(torch.float32)


def expand_blocks(scale: torch.Tensor, shape: tuple[int, int], block: PerBlock) -> torch.Tensor:
    """A per-block scale [ceil(out/r), ceil(in/c)] repeated to one value per element [out, in]."""
    assert scale.ndim == 2, tuple(scale.shape)
    full = scale.repeat_interleave(block.rows, dim=0).repeat_interleave(block.cols, dim=1)
    return full[: shape[0], : shape[1]]


def scale_from_absmax(absmax: torch.Tensor) -> torch.Tensor:
    """FP8 scale so that absmax maps to the largest finite e4m3 value; never 0."""
    assert absmax.dtype == torch.float32, absmax.dtype
    # A tensor divisor, not a Python scalar: CUDA turns `x / scalar` into `x * (1 / scalar)`,
    # which rounds differently from CPU's true division and would make scales device-dependent.
    return (absmax / torch.full_like(absmax, FP8_MAX)).clamp(min=MIN_SCALE)


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale, saturated to +-448 (the CUDA cast does not saturate everywhere), as e4m3."""
    assert scale.dtype == torch.float32, scale.dtype
    assert scale.ndim == 0 or scale.shape == (x.shape[0], 1) or scale.shape == x.shape, \
        (tuple(scale.shape), tuple(x.shape))
    return (x.to(torch.float32) / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quantize_fp8_blocks(w: torch.Tensor, scale: torch.Tensor, block: PerBlock) -> torch.Tensor:
    """w / scale of its block, saturated, as e4m3: w [out, in], scale [ceil(out/r), ceil(in/c)] float32."""
    return quantize_fp8(w, expand_blocks(scale, tuple(w.shape), block))


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The value a loader reconstructs: q * scale, in `dtype`."""
    assert q.dtype == FP8_DTYPE, q.dtype
    return (q.to(torch.float32) * scale.to(torch.float32)).to(dtype)


def fake_quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Round trip through FP8 in x's dtype: what a static-activation matmul sees."""
    return dequantize_fp8(quantize_fp8(x, scale), scale, x.dtype)
