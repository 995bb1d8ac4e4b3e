"""AutoAWQ GEMM layout: round trip, an independent unpack from the documented layout, a hand-packed word."""

from __future__ import annotations

import pytest
import torch

from streamq.formats.awq_packing import AWQ_ORDER, dequantize_awq, pack_awq, pack_rows, unpack_awq, unpack_rows

# Written out here from the AutoAWQ layout (not imported) so the test pins the format itself.
ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def _case(out_f=16, n_in=64, g=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (out_f, n_in), generator=gen, dtype=torch.int32)
    zeros = torch.randint(0, 16, (out_f, n_in // g), generator=gen, dtype=torch.int32)
    # float16-exact scales so the round trip is exact
    scales = (torch.rand(out_f, n_in // g, generator=gen) * 0.1 + 1e-3).to(torch.float16).to(torch.float32)
    return codes, zeros, scales


def _reference_unpack(packed: torch.Tensor) -> list[list[int]]:
    """From the documented layout, with Python ints: word j, nibble k -> column 8j + ORDER[k]."""
    rows = []
    for row in packed.tolist():
        vals = [0] * (8 * len(row))
        for j, word in enumerate(row):
            u = word & 0xFFFFFFFF
            for k in range(8):
                vals[8 * j + ORDER[k]] = (u >> (4 * k)) & 0xF
        rows.append(vals)
    return rows


def test_order_constant_matches_autoawq():
    assert list(AWQ_ORDER) == ORDER


def test_round_trip_and_shapes():
    codes, zeros, scales = _case()
    t = pack_awq(codes, zeros, scales)
    assert t["qweight"].shape == (64, 2) and t["qweight"].dtype == torch.int32
    assert t["qzeros"].shape == (4, 2) and t["qzeros"].dtype == torch.int32
    assert t["scales"].shape == (4, 16) and t["scales"].dtype == torch.float16
    c2, z2, s2 = unpack_awq(t["qweight"], t["qzeros"], t["scales"])
    assert torch.equal(c2, codes) and torch.equal(z2, zeros)
    assert torch.equal(s2.to(torch.float32), scales)


def test_independent_unpack_and_dequant():
    codes, zeros, scales = _case(out_f=24, n_in=32, g=8, seed=1)
    t = pack_awq(codes, zeros, scales)
    # qweight row i = input column i, over outputs; qzeros row = group, over outputs
    assert _reference_unpack(t["qweight"]) == codes.t().tolist()
    assert _reference_unpack(t["qzeros"]) == zeros.t().tolist()
    w = dequantize_awq(t["qweight"], t["qzeros"], t["scales"])
    expect = torch.empty(24, 32)
    for o in range(24):
        for i in range(32):
            expect[o, i] = (codes[o, i] - zeros[o, i // 8]) * scales[o, i // 8]
    assert torch.equal(w, expect)


def test_hand_packed_word():
    # outputs 0..7 with codes 1..8: nibble k holds output ORDER[k] -> 1,3,5,7,2,4,6,8 from bit 0 up.
    codes = torch.arange(1, 9, dtype=torch.int32).view(8, 1)
    zeros = torch.full((8, 1), 15, dtype=torch.int32)  # 0xFFFFFFFF -> -1 as int32
    scales = torch.ones(8, 1)
    t = pack_awq(codes, zeros, scales)
    assert t["qweight"].tolist() == [[0x86427531 - 2**32]]
    assert t["qzeros"].tolist() == [[-1]]
    assert unpack_rows(torch.tensor([[0x86427531 - 2**32]], dtype=torch.int32)).tolist() == [list(range(1, 9))]


def test_pack_rows_inverse_on_all_values():
    v = torch.arange(16, dtype=torch.int32).repeat(3, 2)  # [3, 32], every nibble value incl. >= 8 at bit 28
    assert torch.equal(unpack_rows(pack_rows(v)), v)


def test_rejects_bad_input():
    codes, zeros, scales = _case(out_f=16, n_in=32, g=16)
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_awq(codes[:12], zeros[:12], scales[:12])
    bad = codes.clone()
    bad[0, 0] = 16
    with pytest.raises(ValueError, match="0..15"):
        pack_awq(bad, zeros, scales)
    with pytest.raises(ValueError, match="0..15"):
        pack_awq(codes, zeros - 1 - zeros.max(), scales)
    with pytest.raises(ValueError, match="float16"):
        pack_awq(codes, zeros, scales * 1e6)
