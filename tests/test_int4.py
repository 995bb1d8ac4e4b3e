"""INT4 per-group primitives against compressed-tensors' own qparams and quantizer."""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize
from compressed_tensors.quantization.utils.helpers import calculate_qparams

from streamq.quant import int4

G = 32


def args(symmetric: bool) -> QuantizationArgs:
    return QuantizationArgs(num_bits=4, type="int", symmetric=symmetric, strategy="group", group_size=G)


def weight(seed: int = 0) -> torch.Tensor:
    w = torch.randn(16, 256, generator=torch.Generator().manual_seed(seed))
    w[3, :G] = torch.rand(G) + 0.1  # all positive group: min is widened to 0
    w[4, G : 2 * G] = -torch.rand(G) - 0.1  # all negative group
    w[5, 2 * G : 3 * G] = 0.0  # all zero group
    return w


@pytest.mark.parametrize("symmetric", [True, False])
def test_params_codes_and_values_match_compressed_tensors(symmetric: bool) -> None:
    w = weight()
    groups = w.reshape(16, -1, G)
    ct_scale, ct_zp = calculate_qparams(groups.amin(-1), groups.amax(-1), args(symmetric))
    scale, zp = int4.group_params(w, G, symmetric)
    assert scale.dtype == torch.float32 and scale.shape == (16, 256 // G)
    assert (scale > 0).all()
    if symmetric:
        assert zp is None
        assert torch.equal(scale, ct_scale)
    else:
        assert zp.dtype == torch.int32 and zp.min() >= -8 and zp.max() <= 7
        ok = scale != torch.finfo(torch.float32).eps  # compressed-tensors' zp is NaN-derived there
        assert torch.equal(scale[ok], ct_scale[ok]) and torch.equal(zp[ok], ct_zp[ok].to(torch.int32))
        assert zp[5, 2] == -8
    codes = int4.quantize(w, scale, zp, G)
    assert codes.dtype == torch.int8 and codes.min() >= -8 and codes.max() <= 7
    ct_codes = quantize(w, scale, zp, args(symmetric), dtype=torch.int8)
    assert torch.equal(codes, ct_codes)
    assert torch.equal(int4.dequantize(codes, scale, zp, G), dequantize(ct_codes, scale, zp, args(symmetric)))
    assert torch.equal(int4.dequantize(codes, scale, zp, G)[5, 2 * G : 3 * G], torch.zeros(G))


def test_symmetric_scale_is_absmax_over_7_5() -> None:
    w = torch.tensor([[-1.5, 0.75, 0.0, 0.3]])
    scale, _ = int4.group_params(w, 4, True)
    assert torch.equal(scale, torch.tensor([[1.5]]) / 7.5)
    assert int4.quantize(w, scale, None, 4).tolist() == [[-8, 4, 0, 2]]  # 0.3 / 0.2 = 1.5 -> 2 (half to even)


def test_scale_rounded_through_storage_dtype() -> None:
    w = weight(1)
    scale, _ = int4.group_params(w, G, True, scale_dtype=torch.bfloat16)
    assert torch.equal(scale, scale.to(torch.bfloat16).to(torch.float32))


@pytest.mark.parametrize("symmetric", [True, False])
def test_batched_experts_and_fake_quantize(symmetric: bool) -> None:
    w = torch.stack([weight(0), weight(1)]).to(torch.bfloat16)
    codes, scale, zp = int4.quantize_rtn(w, G, symmetric)
    for e in range(2):
        one = int4.quantize_rtn(w[e], G, symmetric)
        assert torch.equal(codes[e], one[0]) and torch.equal(scale[e], one[1])
    fq = int4.fake_quantize(w, scale, zp, G)
    assert fq.dtype == torch.bfloat16
    assert torch.equal(fq, int4.dequantize(codes, scale, zp, G, torch.bfloat16))
    err = (fq.float() - w.float()).abs()
    step = scale.repeat_interleave(G, dim=-1)
    # Half a step from rounding (symmetric), up to a whole step at the ends of an
    # asymmetric range (the zero point is rounded), plus the bfloat16 output rounding.
    bound = step * (0.5 if symmetric else 1.0) + fq.float().abs() * 2.0**-8
    assert (err <= bound).all()
