"""INT4 pack/unpack for the two on-disk layouts: compressed-tensors and GPTQ.

Codes are streamq's signed int8 in [-8, 7] (see `streamq.quant.int4`); on disk each
code is stored as the unsigned nibble code + 8, eight nibbles to an int32 word, element
i of the packed dimension in word i // 8 at bits 4 * (i % 8); a word whose top nibble is
>= 8 is negative as an int32 (the same bits compressed-tensors' `pack_to_int32` writes).

- compressed-tensors `pack-quantized` (checked against compressed-tensors 0.20
  `compressors/pack_quantized`): `weight_packed` int32 [out, ceil(in / 8)] (packed along
  the input; a last partial word is padded with nibble 0); `weight_scale` [out, in / g]
  in the model dtype; `weight_shape` int64 [2]; asymmetric adds `weight_zero_point`
  int32 [ceil(out / 8), in / g], the signed zero points + 8 packed along dim 0.
- GPTQ (`quant_method: gptq`, AutoGPTQ v1 layout), symmetric only: `qweight` int32
  [in / 8, out] (packed along the input), `qzeros` int32 [in / g, out / 8] holding zero
  - 1 = 7 in every nibble (the unsigned zero point of a symmetric 4-bit code is 8),
  `scales` [in / g, out], `g_idx` int32 [in] = i // g.
"""

from __future__ import annotations

import sys

import torch

from streamq.quant import int4

NIBBLES = 8  # 4-bit values per int32 word
OFFSET = 8  # signed code -> unsigned nibble
GPTQ_SYMMETRIC_ZERO = 8  # unsigned zero point of a symmetric 4-bit code; v1 stores zero - 1


def _to_int32_bits(words: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2^32) -> int32 with the same 32 bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_nibbles(values: torch.Tensor) -> torch.Tensor:
    """Pack unsigned 4-bit values [..., n] (any int dtype, in [0, 15]) along the last dim.

    Returns int32 [..., ceil(n / 8)]; value i in word i // 8 at bits 4 * (i % 8); a last
    partial word is padded with zeros.

    Byte-wise: values 2j and 2j + 1 make byte j (low nibble first), and four bytes read as
    one little-endian int32 are word j // 4 with value i at bits 4 * (i % 8), so the work is
    a few passes over one-byte data (the int64 shift-and-sum, `_pack_nibbles_int64`, moved
    eight bytes a value through as many passes: 90 ms a Qwen3-235B-A22B layer on an H200).
    Big-endian hosts take the int64 path.
    """
    assert not values.is_floating_point(), values.dtype
    if sys.byteorder != "little":
        return _pack_nibbles_int64(values)
    v = values.to(torch.uint8)
    n = v.shape[-1]
    words = -(-n // NIBBLES)
    if words * NIBBLES != n:
        v = torch.nn.functional.pad(v, (0, words * NIBBLES - n))
    pairs = v.reshape(*v.shape[:-1], words * NIBBLES // 2, 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).contiguous().view(torch.int32)


def _pack_nibbles_int64(values: torch.Tensor) -> torch.Tensor:
    """`pack_nibbles` by arithmetic: each word as the sum of its values shifted into place."""
    v = values.to(torch.int64)
    n = v.shape[-1]
    words = -(-n // NIBBLES)
    if words * NIBBLES != n:
        v = torch.nn.functional.pad(v, (0, words * NIBBLES - n))
    v = v.reshape(*v.shape[:-1], words, NIBBLES)
    shifts = 4 * torch.arange(NIBBLES, dtype=torch.int64, device=v.device)
    return _to_int32_bits((v << shifts).sum(dim=-1))


def unpack_nibbles(words: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of `pack_nibbles`: int32 [..., ceil(n / 8)] -> unsigned int8 [..., n] in [0, 15]."""
    assert words.dtype == torch.int32, words.dtype
    assert words.shape[-1] == -(-n // NIBBLES), (tuple(words.shape), n)
    w = words.to(torch.int64) & 0xFFFFFFFF
    shifts = 4 * torch.arange(NIBBLES, dtype=torch.int64, device=w.device)
    v = (w.unsqueeze(-1) >> shifts) & 0xF
    return v.reshape(*words.shape[:-1], -1)[..., :n].to(torch.int8)


def _check_codes(codes: torch.Tensor) -> None:
    assert codes.dtype == int4.CODE_DTYPE, codes.dtype
    assert codes.ndim >= 2, tuple(codes.shape)


# --- compressed-tensors pack-quantized ---------------------------------------------------


def pack_weight_ct(codes: torch.Tensor) -> torch.Tensor:
    """codes int8 [..., out, in] in [-8, 7] -> `weight_packed` int32 [..., out, ceil(in / 8)]."""
    _check_codes(codes)
    return pack_nibbles(codes + OFFSET)  # int8: [-8, 7] + 8 stays in range


def unpack_weight_ct(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """`weight_packed` int32 [..., out, ceil(in / 8)] -> codes int8 [..., out, in]."""
    return unpack_nibbles(packed, in_features) - OFFSET


def pack_zero_point_ct(zero_point: torch.Tensor) -> torch.Tensor:
    """Signed zero points [..., out, G] in [-8, 7] -> int32 [..., ceil(out / 8), G] (packed along out)."""
    assert not zero_point.is_floating_point() and zero_point.ndim >= 2, (zero_point.dtype, zero_point.ndim)
    return pack_nibbles(zero_point.to(torch.int64).transpose(-1, -2) + OFFSET).transpose(-1, -2).contiguous()


def unpack_zero_point_ct(packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """int32 [..., ceil(out / 8), G] -> signed zero points int32 [..., out, G]."""
    codes = unpack_nibbles(packed.transpose(-1, -2).contiguous(), out_features) - OFFSET
    return codes.transpose(-1, -2).to(int4.ZP_DTYPE).contiguous()


def to_compressed_tensors(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    scale_dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """The tensors of one Linear in `pack-quantized` form (names without the module prefix).

    codes int8 [out, in]; scale float32 [out, in / g] (stored as `scale_dtype`, the model
    dtype); zero_point int [out, in / g] or None (symmetric: no `weight_zero_point`).
    """
    assert codes.ndim == 2, f"one Linear at a time, got {tuple(codes.shape)}"
    assert scale.ndim == 2 and scale.shape[0] == codes.shape[0], (tuple(scale.shape), tuple(codes.shape))
    out = {
        "weight_packed": pack_weight_ct(codes),
        "weight_scale": scale.to(scale_dtype),
        "weight_shape": torch.tensor(list(codes.shape), dtype=torch.int64),
    }
    if zero_point is not None:
        assert zero_point.shape == scale.shape, (tuple(zero_point.shape), tuple(scale.shape))
        out["weight_zero_point"] = pack_zero_point_ct(zero_point)
    return out


def from_compressed_tensors(
    tensors: dict[str, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Inverse of `to_compressed_tensors`: (codes int8 [out, in], scale float32, zero_point int32 or None)."""
    out_f, in_f = (int(v) for v in tensors["weight_shape"].tolist())
    codes = unpack_weight_ct(tensors["weight_packed"], in_f)
    assert codes.shape == (out_f, in_f), (tuple(codes.shape), (out_f, in_f))
    scale = tensors["weight_scale"].to(torch.float32)
    zp = tensors.get("weight_zero_point")
    return codes, scale, None if zp is None else unpack_zero_point_ct(zp, out_f)


# --- GPTQ (AutoGPTQ v1) ------------------------------------------------------------------


def to_gptq(
    codes: torch.Tensor, scale: torch.Tensor, group_size: int, scale_dtype: torch.dtype = torch.float16
) -> dict[str, torch.Tensor]:
    """Symmetric codes int8 [out, in] and scale float32 [out, in / g] -> GPTQ v1 tensors.

    Returns `qweight` int32 [in / 8, out], `qzeros` int32 [in / g, out / 8] (all nibbles
    7), `scales` [in / g, out] as `scale_dtype`, `g_idx` int32 [in].
    """
    _check_codes(codes)
    assert codes.ndim == 2, tuple(codes.shape)
    out_f, in_f = codes.shape
    groups = int4.num_groups(in_f, group_size)
    assert in_f % NIBBLES == 0 and out_f % NIBBLES == 0, f"GPTQ needs in and out multiples of 8, got {(out_f, in_f)}"
    assert tuple(scale.shape) == (out_f, groups), (tuple(scale.shape), (out_f, groups))
    qweight = pack_nibbles(codes + OFFSET).T.contiguous()  # [out, in/8] -> [in/8, out]
    zeros = torch.full((groups, out_f), GPTQ_SYMMETRIC_ZERO - 1, dtype=torch.int64, device=codes.device)
    return {
        "qweight": qweight,
        "qzeros": pack_nibbles(zeros),
        "scales": scale.T.contiguous().to(scale_dtype),
        "g_idx": (torch.arange(in_f, device=codes.device) // group_size).to(torch.int32),
    }


def from_gptq(tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `to_gptq`: (codes int8 [out, in], scale float32 [out, in / g]).

    Accepts only what `to_gptq` writes: zero - 1 = 7 everywhere and g_idx = i // g.
    """
    qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
    in_f = qweight.shape[0] * NIBBLES
    out_f = qweight.shape[1]
    codes = (unpack_nibbles(qweight.T.contiguous(), in_f) - OFFSET).contiguous()
    zeros = unpack_nibbles(qzeros, out_f)
    assert bool((zeros == GPTQ_SYMMETRIC_ZERO - 1).all()), "only symmetric GPTQ (v1 zero 7) is supported"
    groups = scales.shape[0]
    expected_g_idx = torch.arange(in_f, device=qweight.device) // (in_f // groups)
    assert torch.equal(tensors["g_idx"].to(torch.int64), expected_g_idx), "g_idx other than i // g"
    return codes, scales.T.to(torch.float32).contiguous()
