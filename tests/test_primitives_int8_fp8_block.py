"""`streamq.quant.int8` and the block functions of `streamq.quant.fp8` against float64
formulas written here (no streamq function computes an expected value).

INT8: per output channel, scale = fl32(absmax / 127), codes = round-half-even(w / scale)
clamped to [-127, 127]; an all-zero row gets a tiny positive scale (never 0, never NaN).
FP8 blocks: one scale per `rows` x `cols` tile, scale = fl32(tile absmax / 448), including
the partial tiles at the bottom and right edges of shapes that are not multiples of 128.

The float64 quotient is rounded to float32 before the final rounding, because the engine
(like compressed-tensors and vLLM) divides in float32; that is the only place float32
enters the expected values.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_quantize_dynamic import FP8, FP8_MAX, exact_fp8, fp8_half_ulp

from streamq.quant import fp8, int8
from streamq.quant.granularity import PerBlock

INT8_MAX = 127.0
TINY = 1e-12  # the documented floor of a scale (quant.int8.MIN_SCALE / quant.fp8.MIN_SCALE)


def _weight(shape: tuple[int, int], seed: int, dtype=torch.bfloat16) -> torch.Tensor:
    """Gaussian weights with a few outlier columns, as real Linear weights have."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g, dtype=torch.float64) * 0.02
    w[:, :: max(1, shape[1] // 5)] *= 30
    return w.to(dtype)


def round_half_even64(v: torch.Tensor) -> torch.Tensor:
    """Round float64 to the nearest integer, ties to the even one, without torch.round."""
    assert v.dtype == torch.float64
    f = torch.floor(v)
    d = v - f
    up = (d > 0.5) | ((d == 0.5) & (torch.remainder(f, 2) == 1))
    return f + up.to(torch.float64)


def int8_scale64(w: torch.Tensor) -> torch.Tensor:
    amax = w.to(torch.float64).abs().amax(dim=1, keepdim=True)
    return (amax / INT8_MAX).to(torch.float32).clamp(min=TINY)


def int8_codes64(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    v32 = (w.to(torch.float64) / scale.to(torch.float64)).to(torch.float32).to(torch.float64)
    return round_half_even64(v32).clamp(-INT8_MAX, INT8_MAX)


# ----------------------------------------------------------------------------- INT8


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(96, 200), (1, 7), (130, 64)])
def test_int8_channel_scale_and_codes(shape, dtype):
    w = _weight(shape, seed=sum(shape), dtype=dtype)
    scale = int8.channel_scale(w)
    assert scale.dtype == torch.float32 and tuple(scale.shape) == (shape[0], 1)
    assert torch.equal(scale, int8_scale64(w)), "scale is not fl32(row absmax / 127)"

    q = int8.quantize_int8(w, scale)
    assert q.dtype == torch.int8 and q.shape == w.shape
    assert torch.equal(q.to(torch.float64), int8_codes64(w, scale))
    assert int(q.min()) >= -127, "-128 must never be produced"
    # The absmax element of every row lands on +-127 exactly.
    w64 = w.to(torch.float64)
    at_max = w64.abs() == w64.abs().amax(dim=1, keepdim=True)
    assert bool((q.to(torch.float64).abs()[at_max] == 127).all())
    # Dequantization error at most half a step, plus the float32 quotient's rounding: it may
    # make an exact tie of a value up to 2^-24 * 127 steps off one (127 * 2^-24 <= 2^-16 / 2).
    deq = int8.dequantize_int8(q, scale, torch.float64)
    s64 = scale.to(torch.float64)
    assert bool(((deq - w64).abs() <= s64 / 2 * (1 + 2.0**-16)).all())


def test_int8_rounds_half_to_even_and_clamps():
    x = torch.tensor([[0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, 126.5, 127.5, 128.0, 1e6, -128.0, -1e6, 0.49999997]])
    q = int8.quantize_int8(x, torch.ones(1, 1))
    want = [0, 2, 2, 4, 0, -2, -2, 126, 127, 127, 127, -127, -127, 0]
    assert q.tolist() == [want]
    # Scalar ([]) scales are accepted too (per-token / per-tensor use).
    assert int8.quantize_int8(x, torch.tensor(1.0)).tolist() == [want]


def test_int8_zero_rows_get_tiny_positive_scale_never_nan():
    w = _weight((6, 40), seed=3)
    w[2] = 0
    w[5] = -0.0
    scale = int8.channel_scale(w)
    assert bool(torch.isfinite(scale).all()) and bool((scale > 0).all())
    assert float(scale[2]) == pytest.approx(TINY) and float(scale[5]) == pytest.approx(TINY)
    q = int8.quantize_int8(w, scale)
    assert not q[2].any() and not q[5].any()
    deq = int8.dequantize_int8(q, scale)
    assert bool(torch.isfinite(deq).all()) and not deq[2].any()
    # The other rows are untouched by the floor.
    assert torch.equal(scale[[0, 1, 3, 4]], int8_scale64(w)[[0, 1, 3, 4]])


def test_int8_token_scale_formula():
    x = _weight((17, 33), seed=11, dtype=torch.float32)
    x[4] = 0
    s = int8.token_scale(x)
    assert s.dtype == torch.float32 and tuple(s.shape) == (17, 1)
    assert torch.equal(s, int8_scale64(x))
    assert float(s[4]) > 0


def test_int8_scheme_quantize_matches_formulas_and_refuses_nan():
    from streamq.errors import CheckpointError
    from streamq.schemes.int8 import Int8Dynamic

    weights = {"a.q_proj": _weight((64, 48), 1), "a.down_proj": _weight((48, 96), 2)}
    out = dict(Int8Dynamic().quantize(weights, None))
    for name, w in weights.items():
        assert torch.equal(out[name].weight_scale, int8_scale64(w))
        assert torch.equal(out[name].weight.to(torch.float64), int8_codes64(w, out[name].weight_scale))
        assert out[name].input_scale is None and out[name].zero_point is None
    bad = dict(weights)
    bad["a.down_proj"] = bad["a.down_proj"].clone()
    bad["a.down_proj"][3, 5] = float("nan")
    with pytest.raises(CheckpointError, match="a.down_proj.weight"):
        list(Int8Dynamic().quantize(bad, None))


# ----------------------------------------------------------------------------- FP8 blocks


def block_absmax64(w: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Tile by tile in float64 (exact for bf16/fp16/fp32 inputs), partial edge tiles included."""
    w64 = w.to(torch.float64).abs()
    out_f, in_f = w.shape
    rb, cb = math.ceil(out_f / rows), math.ceil(in_f / cols)
    out = torch.empty(rb, cb, dtype=torch.float64)
    for i in range(rb):
        for j in range(cb):
            out[i, j] = w64[i * rows:(i + 1) * rows, j * cols:(j + 1) * cols].max()
    return out


def block_scale64(w: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return (block_absmax64(w, rows, cols) / FP8_MAX).to(torch.float32).clamp(min=TINY)


def expand64(scale: torch.Tensor, shape: tuple[int, int], rows: int, cols: int) -> torch.Tensor:
    i = torch.arange(shape[0]) // rows
    j = torch.arange(shape[1]) // cols
    return scale.to(torch.float64)[i][:, j]


BLOCK_CASES = [
    ((200, 300), (128, 128)),  # partial tiles at the bottom and the right
    ((256, 256), (128, 128)),  # exact multiples
    ((192, 512), (128, 128)),  # a Qwen3-235B-A22B expert shard at TP8 (192 rows per rank)
    ((5, 7), (128, 128)),  # smaller than one tile
    ((129, 127), (128, 128)),  # one row over, one column under
    ((70, 50), (32, 16)),  # non-square tiles
]


@pytest.mark.parametrize("shape,block", BLOCK_CASES, ids=[f"{s[0]}x{s[1]}-{b[0]}x{b[1]}" for s, b in BLOCK_CASES])
def test_block_absmax_scale_expand_quantize(shape, block):
    rows, cols = block
    pb = PerBlock(rows, cols)
    w = _weight(shape, seed=shape[0] * 7 + shape[1])
    grid = (math.ceil(shape[0] / rows), math.ceil(shape[1] / cols))

    amax = fp8.block_absmax(w, pb)
    assert amax.dtype == torch.float32 and tuple(amax.shape) == grid
    assert torch.equal(amax.to(torch.float64), block_absmax64(w, rows, cols))
    assert torch.equal(fp8.weight_absmax(w, pb), amax)

    scale = fp8.scale_from_absmax(amax)
    want_scale = block_scale64(w, rows, cols)
    assert scale.dtype == torch.float32 and torch.equal(scale, want_scale), "scale is not fl32(block absmax / 448)"

    full = fp8.expand_blocks(scale, shape, pb)
    assert tuple(full.shape) == shape
    assert torch.equal(full.to(torch.float64), expand64(scale, shape, rows, cols))

    q = fp8.quantize_fp8_blocks(w, scale, pb)
    assert q.dtype == FP8 and q.shape == w.shape
    s64 = expand64(scale, shape, rows, cols)
    v64 = (w.to(torch.float64) / s64).clamp(-FP8_MAX, FP8_MAX)
    want = exact_fp8(v64.to(torch.float32).to(torch.float64))
    assert torch.equal(q.view(torch.uint8), want.view(torch.uint8))
    # Every tile's absmax element lands on +-448, and the error stays within half an FP8 ulp.
    w64 = w.to(torch.float64)
    at_max = w64.abs() == expand64(block_absmax64(w, rows, cols), shape, rows, cols)
    assert bool((q.to(torch.float64).abs()[at_max] == FP8_MAX).all())
    deq = fp8.dequantize_fp8(q, full, torch.float64)
    assert bool(((deq - w64).abs() <= fp8_half_ulp(v64) * s64 * (1 + 2.0**-18)).all())


def test_edge_tile_scale_comes_from_the_edge_tile_only():
    pb = PerBlock(128, 128)
    w = torch.full((200, 300), 0.5, dtype=torch.bfloat16)
    w[199, 299] = 1000.0  # bottom-right corner: the partial tile rows 128..199, cols 256..299
    w[10, 290] = -3.0  # top-right partial tile
    scale = fp8.scale_from_absmax(fp8.block_absmax(w, pb))
    want = torch.tensor([[0.5, 0.5, 3.0], [0.5, 0.5, 1000.0]], dtype=torch.float64)
    assert torch.equal(scale, (want / FP8_MAX).to(torch.float32))
    q = fp8.quantize_fp8_blocks(w, scale, pb)
    assert float(q[199, 299].float()) == FP8_MAX and float(q[10, 290].float()) == -FP8_MAX
    assert float(q[0, 0].float()) == FP8_MAX and float(q[150, 270].float()) == pytest.approx(0.5 / 1000 * FP8_MAX,
                                                                                              rel=2**-4)


def test_all_zero_blocks_get_tiny_positive_scale_never_nan():
    pb = PerBlock(128, 128)
    w = _weight((300, 260), seed=5)
    w[128:256, :] = 0  # the whole middle tile row
    w[256:, 256:] = 0  # the bottom-right edge tile (44 x 4)
    scale = fp8.scale_from_absmax(fp8.block_absmax(w, pb))
    assert tuple(scale.shape) == (3, 3)
    assert bool(torch.isfinite(scale).all()) and bool((scale > 0).all())
    assert bool((scale[1] == torch.tensor(TINY, dtype=torch.float32)).all())
    assert float(scale[2, 2]) == pytest.approx(TINY)
    q = fp8.quantize_fp8_blocks(w, scale, pb)
    deq = fp8.dequantize_fp8(q, fp8.expand_blocks(scale, tuple(w.shape), pb))
    assert bool(torch.isfinite(deq).all())
    assert not deq[128:256].any() and not deq[256:, 256:].any()
    other = torch.ones(3, 3, dtype=torch.bool)
    other[1] = False
    other[2, 2] = False
    assert torch.equal(scale[other], block_scale64(w, 128, 128)[other])


def test_fp8_blockwise_scheme_matches_formulas_and_refuses_inf():
    from streamq.errors import CheckpointError
    from streamq.schemes.fp8 import Fp8Blockwise

    weights = {"a.gate_proj": _weight((192, 200), 1), "a.o_proj": _weight((64, 129), 2)}
    out = dict(Fp8Blockwise().quantize(weights, None))
    for name, w in weights.items():
        q = out[name]
        assert torch.equal(q.weight_scale, block_scale64(w, 128, 128)), name
        s64 = expand64(q.weight_scale, tuple(w.shape), 128, 128)
        want = exact_fp8((w.to(torch.float64) / s64).clamp(-FP8_MAX, FP8_MAX).to(torch.float32).to(torch.float64))
        assert torch.equal(q.weight.view(torch.uint8), want.view(torch.uint8)), name
        assert q.input_scale is None
    bad = dict(weights)
    bad["a.o_proj"] = bad["a.o_proj"].clone()
    bad["a.o_proj"][0, 128] = float("inf")
    with pytest.raises(CheckpointError, match="a.o_proj.weight"):
        list(Fp8Blockwise().quantize(bad, None))
