"""Reading quantized weights back: unpacking and dequantization for eval.

Pure tensor functions, one per on-disk layout eval runs:

- INT8 (compressed-tensors `int-quantized`): `weight` int8 [out, in] times `weight_scale`
  ([out, 1] per channel, [1] or [] per tensor).
- Block FP8 (vLLM `weight_block_size`, compressed-tensors `strategy: block`): `weight`
  e4m3 [out, in] times its block's scale, [ceil(out/r), ceil(in/c)].
- INT4 (compressed-tensors `pack-quantized`): `weight_packed` int32 [out, ceil(in/8)],
  element i of a row in word i // 8 at bits 4 * (i % 8), stored as code + 8 (codes in
  [-8, 7]); `weight_scale` [out, ceil(in/g)] in the model dtype; asymmetric checkpoints add
  `weight_zero_point` int32 [ceil(out/8), ceil(in/g)], zero point + 8 packed the same way
  along dim 0. The value is (code - zero_point) * scale.
- INT4 GPTQ v1 (`quant_method: gptq`): `qweight` int32 [in/8, out] packed along the input,
  `qzeros` int32 [G, out/8] (zero - 1) packed along the output, `scales` [G, out], `g_idx`
  int32 [in]. The value is (q - zero) * scale of the column's group.
- INT4 AutoAWQ GEMM (`quant_method: awq`): `qweight` int32 [in, out/8] packed along the output,
  output 8j + AWQ_ORDER[k] of word j in bits 4k; `qzeros` int32 [G, out/8] the same way;
  `scales` [G, out]. The value is (q - zero) * scale.

The int4 unpacking here is eval's own (checked against the `compressed-tensors` package in
tests/test_eval_quant.py); `streamq.formats.int4_packing` is the writer's.
"""

from __future__ import annotations

import torch

from streamq.formats import awq_packing, int4_packing
from streamq.quant import fp8
from streamq.quant.granularity import PerBlock

NIBBLES = int4_packing.NIBBLES  # 4-bit values per int32 word
INT4_OFFSET = 8  # stored nibble = signed code + 8


def unpack_nibbles(words: torch.Tensor, n: int) -> torch.Tensor:
    """int32 [..., ceil(n/8)] -> unsigned 4-bit values int32 [..., n] in [0, 15], value i in
    word i // 8 at bits 4 * (i % 8) (packed along the last dim)."""
    if words.dtype != torch.int32:
        raise ValueError(f"packed int4 values must be int32, got {words.dtype}")
    if words.shape[-1] != -(-n // NIBBLES):
        raise ValueError(f"{n} packed values need {-(-n // NIBBLES)} int32 words per row, got {words.shape[-1]}")
    return int4_packing.unpack_nibbles(words, n).to(torch.int32)  # the writer's own layout, read back


def unpack_int4(words: torch.Tensor, n: int) -> torch.Tensor:
    """int32 [..., ceil(n/8)] -> signed codes int8 [..., n] in [-8, 7] (packed along the last dim)."""
    return (unpack_nibbles(words, n) - INT4_OFFSET).to(torch.int8)


def unpack_int4_rows(words: torch.Tensor, rows: int) -> torch.Tensor:
    """int32 [ceil(rows/8), cols] packed along dim 0 -> signed int8 [rows, cols] (zero points)."""
    return unpack_int4(words.t().contiguous(), rows).t().contiguous()


def group_columns(scale: torch.Tensor, in_features: int, group_size: int) -> torch.Tensor:
    """A per-group tensor [out, ceil(in/g)] repeated to one value per element [out, in]."""
    return scale.repeat_interleave(group_size, dim=1)[:, :in_features]


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, in_features: int, group_size: int,
                    zero_point: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`pack-quantized` tensors -> the weight [out, in] in `dtype` (default: the scale's dtype).

    (code - zero_point) * scale is computed in float32, where it is exact (a 5-bit integer
    times a scale of at most 24 significant bits), and rounded once to `dtype`: the value a
    kernel that dequantizes in the model dtype (one rounding of the same product) gets.
    """
    out_features = packed.shape[0]
    codes = unpack_int4(packed, in_features).to(torch.float32)
    if scale.shape != (out_features, -(-in_features // group_size)):
        raise ValueError(f"weight_scale has shape {tuple(scale.shape)}; expected "
                         f"{(out_features, -(-in_features // group_size))} for groups of {group_size}")
    if zero_point is not None:
        zp = unpack_int4_rows(zero_point, out_features).to(torch.float32)
        if zp.shape != scale.shape:
            raise ValueError(f"weight_zero_point unpacks to {tuple(zp.shape)}, the scale is {tuple(scale.shape)}")
        codes = codes - group_columns(zp, in_features, group_size)
    dtype = dtype or scale.dtype
    # The scale as a kernel computing in `dtype` holds it (a no-op when stored in that dtype).
    w = codes * group_columns(scale.to(dtype).to(torch.float32), in_features, group_size)
    return w.to(dtype)


def dequantize_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                    dtype: torch.dtype) -> torch.Tensor:
    """GPTQ v1 tensors -> the weight [out, in] in `dtype`.

    `qweight` int32 [in/8, out]: unsigned 4-bit q of column i of the weight's row o in word
    [i // 8, o] at bits 4 * (i % 8); `qzeros` int32 [G, out/8]: v1 stores zero - 1, packed along
    out; `scales` [G, out]; `g_idx` int32 [in]: the group of each input column. The value is
    (q - zero) * scale, the scale first rounded to `dtype` as a kernel computing there holds it.
    """
    in_features, out_features = qweight.shape[0] * NIBBLES, qweight.shape[1]
    groups = scales.shape[0]
    if scales.shape != (groups, out_features) or qzeros.shape != (groups, -(-out_features // NIBBLES)) \
            or g_idx.shape != (in_features,):
        raise ValueError(f"GPTQ tensors do not fit together: qweight {list(qweight.shape)}, qzeros "
                         f"{list(qzeros.shape)}, scales {list(scales.shape)}, g_idx {list(g_idx.shape)}")
    q = unpack_nibbles(qweight.t().contiguous(), in_features).to(torch.float32)  # [out, in]
    zero = (unpack_nibbles(qzeros, out_features) + 1).to(torch.float32)  # [G, out]
    g = g_idx.to(torch.int64)
    if bool(((g < 0) | (g >= groups)).any()):
        raise ValueError(f"g_idx holds groups outside [0, {groups})")
    s = scales.to(dtype).to(torch.float32)
    return ((q - zero.t()[:, g]) * s.t()[:, g]).to(dtype)


def expand_blocks(scale: torch.Tensor, shape: tuple[int, int], rows: int, cols: int) -> torch.Tensor:
    """A per-block scale [ceil(out/r), ceil(in/c)] repeated to one value per element [out, in]."""
    if scale.shape != (-(-shape[0] // rows), -(-shape[1] // cols)):
        raise ValueError(f"block scale has shape {tuple(scale.shape)}; expected "
                         f"{(-(-shape[0] // rows), -(-shape[1] // cols))} for {shape} in {rows}x{cols} blocks")
    return fp8.expand_blocks(scale, shape, PerBlock(rows, cols))


def dequantize_fp8_blocks(wq: torch.Tensor, scale: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """e4m3 [out, in] times its block's scale, float32 (exact: an e4m3 value has 4 significant bits)."""
    return wq.to(torch.float32) * expand_blocks(scale.to(torch.float32), tuple(wq.shape), rows, cols)


def dequantize_int8(wq: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 [out, in] times a per-channel ([out, 1]) or per-tensor ([1] / []) scale, float32 (exact)."""
    s = scale.to(torch.float32)
    s = s.reshape(-1, 1) if s.numel() > 1 else s.reshape(())
    return wq.to(torch.float32) * s


def unpack_awq_rows(words: torch.Tensor) -> torch.Tensor:
    """int32 [rows, cols/8] in AutoAWQ's nibble order -> unsigned values int32 [rows, cols]."""
    return awq_packing.unpack_rows(words)


def dequantize_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype
                   ) -> torch.Tensor:
    """AutoAWQ GEMM tensors -> the weight [out, in] in `dtype`: (q - zero) * scale of the group of
    `in / G` input columns, the scale first rounded to `dtype` as a kernel computing there holds it."""
    in_features, words = qweight.shape
    groups, out_features = scales.shape
    if qzeros.shape != (groups, words) or out_features != words * NIBBLES or in_features % groups:
        raise ValueError(f"AWQ tensors do not fit together: qweight {list(qweight.shape)}, qzeros "
                         f"{list(qzeros.shape)}, scales {list(scales.shape)}")
    group = in_features // groups
    q = unpack_awq_rows(qweight).to(torch.float32)  # [in, out]
    zero = unpack_awq_rows(qzeros).to(torch.float32).repeat_interleave(group, dim=0)  # [in, out]
    s = scales.to(dtype).to(torch.float32).repeat_interleave(group, dim=0)
    return ((q - zero) * s).t().contiguous().to(dtype)
