"""AutoAWQ GEMM layout (`quant_method: awq`, `version: gemm`): pure pack / unpack functions.

Layout of one 4-bit Linear with weight [out, in] and quantization groups of `g` input columns:

- `qweight` int32 [in, out/8]: row i holds input column i; word j holds outputs 8j..8j+7, with
  output 8j + AWQ_ORDER[k] in bits 4k..4k+3, AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7).
- `qzeros` int32 [in/g, out/8]: the zero points, packed along the output the same way.
- `scales` float16 [in/g, out].
- dequant: W[o, i] = (q[i, o] - z[i // g, o]) * s[i // g, o], with q, z in 0..15.

The nibble order was checked against AutoAWQ's `WQLinear_GEMM.from_linear`
(awq/modules/linear/gemm.py), where packed column `col` ORs in output `col*8 + order_map[i]`
shifted by `4*i` with order_map [0, 2, 4, 6, 1, 3, 5, 7]. AutoAWQ GEMM always stores a zero point;
a symmetric quantization is written with z = 8.

Codes are taken and returned in the [out, in] orientation the quantizer uses (codes [out, in],
zeros and scales [out, in/g]); these functions do the transposes.
"""

from __future__ import annotations

import torch

AWQ_BITS = 4
AWQ_PACK = 32 // AWQ_BITS  # 8 nibbles per int32 word
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
FP16_MAX = 65504.0


def _check_nibbles(name: str, t: torch.Tensor) -> None:
    assert not t.is_floating_point(), f"{name}: expected integer codes, got {t.dtype}"
    if t.numel() and (int(t.min()) < 0 or int(t.max()) > 15):
        raise ValueError(f"{name}: values must be in 0..15, got [{int(t.min())}, {int(t.max())}]")


def pack_rows(values: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit values [rows, cols] (0..15, any int dtype) along the last dim: int32 [rows, cols/8].

    Word j of a row holds columns 8j..8j+7, column 8j + AWQ_ORDER[k] in bits 4k. Bit 31 is the
    sign bit of the int32 (a value >= 8 in the last nibble makes the word negative).
    """
    assert values.ndim == 2 and values.shape[1] % AWQ_PACK == 0, (
        f"expected [rows, cols] with cols a multiple of {AWQ_PACK}, got {tuple(values.shape)}")
    _check_nibbles("values", values)
    v = values.to(torch.int64).reshape(values.shape[0], -1, AWQ_PACK)[:, :, list(AWQ_ORDER)]
    shifts = torch.arange(0, 32, AWQ_BITS, dtype=torch.int64, device=values.device)
    words = (v << shifts).sum(dim=2)  # disjoint bits: sum == bitwise or, < 2**32
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def unpack_rows(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_rows`: int32 [rows, cols/8] -> int32 [rows, cols] in 0..15."""
    assert packed.ndim == 2 and packed.dtype == torch.int32, (tuple(packed.shape), packed.dtype)
    shifts = torch.arange(0, 32, AWQ_BITS, dtype=torch.int64, device=packed.device)
    nib = (packed.to(torch.int64).unsqueeze(-1) >> shifts) & 0xF  # [rows, words, k]: nibble k
    out = torch.empty_like(nib)
    out[:, :, list(AWQ_ORDER)] = nib  # nibble k is column AWQ_ORDER[k] of its word
    return out.reshape(packed.shape[0], -1).to(torch.int32)


def pack_awq(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor) -> dict[str, torch.Tensor]:
    """The three tensors of one AWQ GEMM Linear.

    codes: [out, in] integer 0..15; zeros: [out, in/g] integer 0..15; scales: [out, in/g] float,
    finite, within float16 range. out must be a multiple of 8, in a multiple of in/g.
    Returns {"qweight": int32 [in, out/8], "qzeros": int32 [in/g, out/8], "scales": float16 [in/g, out]}.
    """
    assert codes.ndim == 2 and zeros.ndim == 2 and scales.ndim == 2, (codes.shape, zeros.shape, scales.shape)
    out_f, n_in = codes.shape
    n_groups = zeros.shape[1]
    assert zeros.shape == (out_f, n_groups) and scales.shape == (out_f, n_groups), (
        tuple(codes.shape), tuple(zeros.shape), tuple(scales.shape))
    assert n_groups > 0 and n_in % n_groups == 0, f"in={n_in} is not divisible into {n_groups} groups"
    if out_f % AWQ_PACK:
        raise ValueError(f"AWQ GEMM packs along the output: out={out_f} is not a multiple of {AWQ_PACK}")
    assert scales.is_floating_point(), scales.dtype
    if not bool(torch.isfinite(scales).all()) or float(scales.abs().max()) > FP16_MAX:
        raise ValueError("AWQ scales must be finite and fit float16")
    _check_nibbles("zeros", zeros)
    return {
        "qweight": pack_rows(codes.t()),
        "qzeros": pack_rows(zeros.t()),
        "scales": scales.t().to(torch.float16).contiguous(),
    }


def unpack_awq(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `pack_awq`: (codes int32 [out, in], zeros int32 [out, in/g], scales float16 [out, in/g])."""
    n_in, words = qweight.shape
    n_groups = qzeros.shape[0]
    assert qzeros.shape == (n_groups, words) and scales.shape == (n_groups, words * AWQ_PACK), (
        tuple(qweight.shape), tuple(qzeros.shape), tuple(scales.shape))
    assert n_in % n_groups == 0, (n_in, n_groups)
    return unpack_rows(qweight).t().contiguous(), unpack_rows(qzeros).t().contiguous(), scales.t().contiguous()


def dequantize_awq(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """W[o, i] = (q - z) * s from the packed tensors: [out, in] in `dtype` (computed in float32)."""
    codes, zeros, s = unpack_awq(qweight, qzeros, scales)
    g = codes.shape[1] // zeros.shape[1]
    z = zeros.repeat_interleave(g, dim=1)
    sc = s.to(torch.float32).repeat_interleave(g, dim=1)
    return ((codes - z).to(torch.float32) * sc).to(dtype)
