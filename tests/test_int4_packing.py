"""INT4 packing: round trips, compressed-tensors' own code as judge, GPTQ layout by hand."""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

from streamq.formats import int4_packing as P
from streamq.quant import int4

G = 32


def weight(out: int, n: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    w = torch.randn(out, n, generator=torch.Generator().manual_seed(seed)) * 0.05
    return w.to(dtype)


def scheme(symmetric: bool) -> QuantizationScheme:
    args = QuantizationArgs(num_bits=4, type="int", symmetric=symmetric, strategy="group", group_size=G)
    return QuantizationScheme(targets=["Linear"], weights=args)


def all_codes(rows: int, cols: int) -> torch.Tensor:
    """Every code value in every nibble position."""
    return ((torch.arange(rows * cols) * 7 % 16) - 8).reshape(rows, cols).to(torch.int8)


@pytest.mark.parametrize("cols", [8, 64, 29])  # 29: a partial last word
def test_nibble_round_trip_and_bits_match_compressed_tensors(cols: int) -> None:
    codes = all_codes(13, cols)
    packed = P.pack_weight_ct(codes)
    assert packed.dtype == torch.int32 and packed.shape == (13, -(-cols // 8))
    assert torch.equal(packed, pack_to_int32(codes, 4))
    assert torch.equal(P.unpack_weight_ct(packed, cols), codes)
    assert torch.equal(unpack_from_int32(packed, 4, torch.Size([13, cols])), codes)
    assert (packed < 0).any()  # top nibble >= 8 sets the sign bit, as in compressed-tensors


@pytest.mark.parametrize("shape", [(13, 8), (3, 5, 29), (7, 1), (2, 64)])
@pytest.mark.parametrize("transposed", [False, True])
def test_bytewise_pack_equals_the_shift_and_sum(shape: tuple[int, ...], transposed: bool) -> None:
    """The byte-wise packing (pairs of nibbles, four bytes read as one int32) gives the bits
    of the int64 arithmetic it replaced, for every value in every position, a partial last
    word, leading dimensions and a non-contiguous input (zero points are packed transposed)."""
    values = torch.randint(0, 16, shape, generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    values.view(-1)[: 16] = torch.arange(16)[: values.numel()]
    if transposed:
        values = values.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert torch.equal(P.pack_nibbles(values), P._pack_nibbles_int64(values))


def test_batched_pack_is_per_expert() -> None:
    codes = torch.stack([all_codes(16, 64), all_codes(16, 64).flip(1)])
    packed = P.pack_weight_ct(codes)
    assert torch.equal(packed[1], P.pack_weight_ct(codes[1]))
    assert torch.equal(P.unpack_weight_ct(packed, 64), codes)


@pytest.mark.parametrize("out", [16, 20])  # 20: a partial word along dim 0
def test_zero_point_packed_along_dim0_like_compressed_tensors(out: int) -> None:
    zp = all_codes(out, 4).to(torch.int32)
    packed = P.pack_zero_point_ct(zp)
    assert packed.shape == (-(-out // 8), 4)
    assert torch.equal(packed, pack_to_int32(zp.to(torch.int8), 4, packed_dim=0))
    assert torch.equal(P.unpack_zero_point_ct(packed, out), zp)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compressed_tensors_decompress_reproduces_our_weights(symmetric: bool, dtype: torch.dtype) -> None:
    w = weight(24, 128, seed=1, dtype=dtype)
    codes, scale, zp = int4.quantize_rtn(w, G, symmetric, scale_dtype=dtype)
    tensors = P.to_compressed_tensors(codes, scale, zp, scale_dtype=dtype)
    names = {"weight_packed", "weight_scale", "weight_shape"}
    assert set(tensors) == (names if symmetric else names | {"weight_zero_point"})
    assert tensors["weight_shape"].tolist() == [24, 128] and tensors["weight_shape"].dtype == torch.int64
    assert tensors["weight_scale"].dtype == dtype
    theirs = PackedQuantizationCompressor.decompress(dict(tensors), scheme(symmetric))["weight"]
    ours = int4.dequantize(codes, scale, zp, G, dtype)
    assert theirs.dtype == dtype
    assert torch.equal(theirs, ours)
    back = P.from_compressed_tensors(tensors)
    assert torch.equal(back[0], codes) and torch.equal(back[1], scale)
    assert (back[2] is None) if symmetric else torch.equal(back[2], zp)


@pytest.mark.parametrize("symmetric", [True, False])
def test_compressed_tensors_compress_gives_our_packed_codes(symmetric: bool) -> None:
    """Their quantizer, fed our scale and zero point, packs the very words we pack."""
    w = weight(16, 96, seed=2)
    codes, scale, zp = int4.quantize_rtn(w, G, symmetric)
    sd = {"weight": w, "weight_scale": scale}
    if zp is not None:
        sd["weight_zero_point"] = zp.to(torch.int8)
    theirs = PackedQuantizationCompressor.compress(sd, scheme(symmetric))
    ours = P.to_compressed_tensors(codes, scale, zp, torch.float32)
    assert torch.equal(theirs["weight_packed"], ours["weight_packed"])
    if not symmetric:
        assert torch.equal(theirs["weight_zero_point"], ours["weight_zero_point"])


def independent_gptq_unpack(t: dict[str, torch.Tensor]) -> torch.Tensor:
    """Dequantize the documented GPTQ v1 layout with plain Python ints, element by element."""
    qweight, qzeros, scales, g_idx = (t[k].tolist() for k in ("qweight", "qzeros", "scales", "g_idx"))
    n_in, n_out = len(qweight) * 8, len(qweight[0])
    out = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_in):
        g = g_idx[i]
        for o in range(n_out):
            q = ((qweight[i // 8][o] & 0xFFFFFFFF) >> (4 * (i % 8))) & 0xF
            zero = (((qzeros[g][o // 8] & 0xFFFFFFFF) >> (4 * (o % 8))) & 0xF) + 1
            out[o, i] = (q - zero) * scales[g][o]
    return out


def test_gptq_layout_against_independent_unpack() -> None:
    w = weight(16, 64, seed=3)
    codes, scale, _ = int4.quantize_rtn(w, G, True, scale_dtype=torch.float16)
    t = P.to_gptq(codes, scale, G, scale_dtype=torch.float16)
    assert t["qweight"].shape == (8, 16) and t["qweight"].dtype == torch.int32
    assert t["qzeros"].shape == (2, 2) and t["qzeros"].dtype == torch.int32
    assert t["qzeros"].eq(0x77777777).all()
    assert t["scales"].shape == (2, 16) and t["scales"].dtype == torch.float16
    assert t["g_idx"].tolist() == [i // G for i in range(64)] and t["g_idx"].dtype == torch.int32
    expected = int4.dequantize(codes, scale, None, G).to(torch.float64)
    assert torch.equal(independent_gptq_unpack(t), expected)
    back_codes, back_scale = P.from_gptq(t)
    assert torch.equal(back_codes, codes) and torch.equal(back_scale, scale)


def test_gptq_refuses_what_it_cannot_write() -> None:
    codes, scale, _ = int4.quantize_rtn(weight(12, 64), G, True)
    with pytest.raises(AssertionError):
        P.to_gptq(codes, scale, G)  # out = 12 is not a multiple of 8
