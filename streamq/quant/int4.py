"""INT4 per-group weight primitives: pure tensor functions with explicit dtypes.

Conventions follow compressed-tensors 0.20 (`quantization/utils/helpers.py`
`calculate_qparams` and `quantization/lifecycle/forward_helpers.py` `_quantize` /
`_dequantize`), so a loader that reads our codes, scales and zero points reconstructs
exactly the values `dequantize` returns here:

- codes are signed int8 in [-8, 7] for both symmetric and asymmetric weights;
- symmetric: scale = absmax / 7.5 (compressed-tensors divides by bit_range / 2 =
  15 / 2), zero point 0 (not stored), code = clamp(round(w / scale), -8, 7);
- asymmetric: the range is widened to include 0 (min <= 0 <= max), scale =
  (max - min) / 15, zero point = clamp(round(-8 - min / scale), -8, 7), a signed
  int in [-8, 7]; code = clamp(round(w / scale + zp), -8, 7);
- value = (code - zp) * scale.

Differences from compressed-tensors, none of which changes what a loader reconstructs
from the stored tensors: we always compute in float32 (its `compress` divides a bfloat16
weight by a bfloat16 scale in bfloat16, which rounds about 0.7% of codes differently);
the scale can be rounded to its storage dtype before the codes are computed
(`scale_dtype`; llm-compressor's GPTQ quantizes against the float32 scale and then
stores it rounded to the model dtype); the asymmetric zero point is computed from that
stored scale; an all-zero asymmetric group gets zero point -8 (compressed-tensors
computes 0/0 there).

Rounding is torch.round (half to even). A group whose values are all 0 gets the
machine epsilon of the scale dtype as its scale (compressed-tensors does the same),
never 0. All functions take weights of shape [..., out, in]: any leading batch
dimensions (experts) pass through; scales are [..., out, in / group_size].
"""

from __future__ import annotations

import torch

INT4_MIN = -8
INT4_MAX = 7
CODE_DTYPE = torch.int8
ZP_DTYPE = torch.int32
# compressed-tensors' bit_range / 2 for 4 bits: the symmetric scale is absmax / 7.5.
SYMMETRIC_DIVISOR = (INT4_MAX - INT4_MIN) / 2
ASYMMETRIC_DIVISOR = float(INT4_MAX - INT4_MIN)


def num_groups(in_features: int, group_size: int) -> int:
    """in / group_size; the input dimension must split into whole groups."""
    assert group_size > 0, group_size
    assert in_features % group_size == 0, f"in_features {in_features} is not a multiple of group size {group_size}"
    return in_features // group_size


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[..., out, in] -> [..., out, in / g, g] view in float32."""
    assert w.ndim >= 2, tuple(w.shape)
    g = num_groups(w.shape[-1], group_size)
    return w.to(torch.float32).reshape(*w.shape[:-1], g, group_size)


def _zero_scale_eps(scale_dtype: torch.dtype) -> float:
    """The positive stand-in for a 0 scale: compressed-tensors' `_get_dtype_eps`."""
    return float(torch.finfo(scale_dtype).eps)


def group_params(
    w: torch.Tensor,
    group_size: int,
    symmetric: bool,
    scale_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero point of each group of `group_size` consecutive input columns.

    w: [..., out, in], any float dtype. Returns scale float32 [..., out, in / g] and,
    when asymmetric, zero_point int32 [..., out, in / g] in [-8, 7] (None when
    symmetric). `scale_dtype` is the dtype the scale will be stored in (e.g. bfloat16):
    the scale is rounded through it first, so codes are computed against exactly the
    value a loader reads. The zero point is computed in float32 from that stored scale.
    """
    x = _grouped(w, group_size)
    zero = torch.zeros((), dtype=torch.float32, device=x.device)
    lo = torch.minimum(x.amin(dim=-1), zero)
    hi = torch.maximum(x.amax(dim=-1), zero)
    # Tensor divisors, not Python scalars: CUDA turns `x / scalar` into `x * (1 / scalar)`.
    if symmetric:
        scale = torch.maximum(lo.abs(), hi) / torch.full_like(hi, SYMMETRIC_DIVISOR)
    else:
        scale = (hi - lo) / torch.full_like(hi, ASYMMETRIC_DIVISOR)
    scale = scale.to(scale_dtype).to(torch.float32)
    scale = torch.where(scale == 0, torch.full_like(scale, _zero_scale_eps(scale_dtype)), scale)
    if symmetric:
        return scale, None
    zp = torch.full_like(lo, float(INT4_MIN)) - lo / scale
    zp = torch.round(zp.clamp(INT4_MIN, INT4_MAX)).to(ZP_DTYPE)
    return scale, zp


def quantize_elementwise(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None) -> torch.Tensor:
    """The one rounding formula: clamp(round(x / scale + zp), -8, 7) as int8.

    x float32; scale float32 and zero_point (int) broadcastable to x. Same operation
    order as compressed-tensors' `_quantize` (divide, add the zero point, round).
    """
    assert x.dtype == torch.float32 and scale.dtype == torch.float32, (x.dtype, scale.dtype)
    scaled = x / scale
    if zero_point is not None:
        scaled = scaled + zero_point.to(torch.float32)
    return torch.round(scaled).clamp(INT4_MIN, INT4_MAX).to(CODE_DTYPE)


def dequantize_elementwise(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None) -> torch.Tensor:
    """(code - zp) * scale in float32; scale and zero_point broadcastable to codes."""
    assert codes.dtype == CODE_DTYPE, codes.dtype
    q = codes.to(torch.float32)
    if zero_point is not None:
        q = q - zero_point.to(torch.float32)
    return q * scale.to(torch.float32)


def _check_params(w_shape: torch.Size, scale: torch.Tensor, zero_point: torch.Tensor | None, group_size: int) -> None:
    expected = (*w_shape[:-1], num_groups(w_shape[-1], group_size))
    assert tuple(scale.shape) == expected, (tuple(scale.shape), expected)
    assert scale.dtype == torch.float32, scale.dtype
    if zero_point is not None:
        assert tuple(zero_point.shape) == expected, (tuple(zero_point.shape), expected)
        assert not zero_point.is_floating_point(), zero_point.dtype


def quantize(w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, group_size: int) -> torch.Tensor:
    """Codes int8 [..., out, in] in [-8, 7] of w [..., out, in] (any float dtype)."""
    _check_params(w.shape, scale, zero_point, group_size)
    x = _grouped(w, group_size)
    zp = None if zero_point is None else zero_point.unsqueeze(-1)
    return quantize_elementwise(x, scale.unsqueeze(-1), zp).reshape(w.shape)


def dequantize(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    group_size: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The value a loader reconstructs, (code - zp) * scale, as `dtype` [..., out, in]."""
    _check_params(codes.shape, scale, zero_point, group_size)
    g = num_groups(codes.shape[-1], group_size)
    q = codes.reshape(*codes.shape[:-1], g, group_size)
    zp = None if zero_point is None else zero_point.unsqueeze(-1)
    return dequantize_elementwise(q, scale.unsqueeze(-1), zp).reshape(codes.shape).to(dtype)


def fake_quantize(
    w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, group_size: int
) -> torch.Tensor:
    """Round trip through INT4 in w's dtype: what the quantized model's matmul sees."""
    return dequantize(quantize(w, scale, zero_point, group_size), scale, zero_point, group_size, w.dtype)


def quantize_rtn(
    w: torch.Tensor, group_size: int, symmetric: bool, scale_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest baseline: (codes int8, scale float32, zero_point int32 or None)."""
    scale, zp = group_params(w, group_size, symmetric, scale_dtype)
    return quantize(w, scale, zp, group_size), scale, zp
