"""SmoothQuant / AWQ scaling math: exact function preservation, formulas, grid pick, clip search."""

from __future__ import annotations

import math

import pytest
import torch

from streamq.quant.smooth import (
    apply_smoothing,
    awq_candidate_scales,
    awq_candidates,
    awq_grid,
    awq_weight_mean,
    clamp_to_clip,
    clip_errors,
    clip_pick,
    clip_ratios,
    clip_search,
    grid_losses,
    group_weight_absmax,
    pick,
    sample_tokens,
    scaled_fake_quantize,
    search_scales,
    smoothquant_scales,
    sum_squared_error,
)

F64 = torch.float64
TIGHT = dict(rtol=1e-11, atol=1e-11)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rand(*shape, gen, dtype=F64):
    return torch.randn(*shape, generator=gen, dtype=dtype)


def _scales(n: int, gen) -> torch.Tensor:
    """Positive scales over three decades, float32 like the real ones."""
    return torch.exp(torch.randn(n, generator=gen) * 2).to(torch.float32)


def _rmsnorm(x, w, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def fq_sym(w: torch.Tensor, g: int) -> torch.Tensor:
    """Local symmetric int4 per-group fake quant: scale = absmax / 7, codes in [-8, 7]."""
    out_f, n_in = w.shape
    wg = w.reshape(out_f, n_in // g, g)
    scale = (wg.abs().amax(-1, keepdim=True) / 7).clamp(min=1e-12)
    return (torch.clamp(torch.round(wg / scale), -8, 7) * scale).reshape(out_f, n_in)


# --- function preservation (float64) ---------------------------------------------------------


def test_norm_to_qkv_preserves_function():
    gen = _gen(0)
    h = 64
    x = _rand(10, h, gen=gen) * 3
    norm_w = _rand(h, gen=gen).abs() + 0.5
    q, k, v = _rand(64, h, gen=gen), _rand(16, h, gen=gen), _rand(16, h, gen=gen)
    s = _scales(h, gen)
    new_norm, bias, (q2, k2, v2) = apply_smoothing(norm_w, [q, k, v], s)
    assert bias is None and new_norm.dtype == F64 and q2.dtype == F64
    n0, n1 = _rmsnorm(x, norm_w), _rmsnorm(x, new_norm)
    for w0, w1 in ((q, q2), (k, k2), (v, v2)):
        torch.testing.assert_close(n1 @ w1.T, n0 @ w0.T, **TIGHT)
    # inputs untouched
    assert not torch.equal(new_norm, norm_w)


def test_layernorm_bias_is_divided_too():
    gen = _gen(1)
    h = 32
    x = _rand(6, h, gen=gen)
    gamma, beta = _rand(h, gen=gen), _rand(h, gen=gen)
    w = _rand(8, h, gen=gen)
    s = _scales(h, gen)
    g2, b2, (w2,) = apply_smoothing(gamma, [w], s, source_bias=beta)
    ln = torch.nn.functional.layer_norm
    torch.testing.assert_close(ln(x, (h,), g2, b2) @ w2.T, ln(x, (h,), gamma, beta) @ w.T, **TIGHT)


def test_v_proj_to_o_proj_preserves_attention_output():
    gen = _gen(2)
    hidden, heads, hd, t = 32, 4, 8, 7
    x = _rand(t, hidden, gen=gen)
    wv, bv = _rand(heads * hd, hidden, gen=gen), _rand(heads * hd, gen=gen)
    wo = _rand(hidden, heads * hd, gen=gen)
    probs = torch.softmax(_rand(heads, t, t, gen=gen), dim=-1)  # any per-head token mixing

    def attn(wv_, bv_, wo_):
        vals = (x @ wv_.T + bv_).view(t, heads, hd).transpose(0, 1)  # [heads, t, hd]
        mixed = (probs @ vals).transpose(0, 1).reshape(t, heads * hd)
        return mixed @ wo_.T

    s = _scales(heads * hd, gen)
    wv2, bv2, (wo2,) = apply_smoothing(wv, [wo], s, source_bias=bv)
    torch.testing.assert_close(attn(wv2, bv2, wo2), attn(wv, bv, wo), **TIGHT)


def test_v_proj_to_o_proj_refuses_gqa_shapes():
    gen = _gen(3)
    wv = _rand(16, 32, gen=gen)  # 2 kv heads x 8
    wo = _rand(32, 32, gen=gen)  # 4 q heads x 8
    with pytest.raises(AssertionError):
        apply_smoothing(wv, [wo], torch.ones(32))
    with pytest.raises(AssertionError):
        apply_smoothing(wv, [wo], torch.ones(16))


def test_up_proj_to_down_proj_preserves_mlp():
    gen = _gen(4)
    hidden, inter = 32, 48
    x = _rand(9, hidden, gen=gen)
    wg, wu, wd = _rand(inter, hidden, gen=gen), _rand(inter, hidden, gen=gen), _rand(hidden, inter, gen=gen)

    def mlp(wu_, wd_):
        return (torch.nn.functional.silu(x @ wg.T) * (x @ wu_.T)) @ wd_.T

    s = _scales(inter, gen)
    wu2, _, (wd2,) = apply_smoothing(wu, [wd], s)
    torch.testing.assert_close(mlp(wu2, wd2), mlp(wu, wd), **TIGHT)


def test_router_scaled_with_experts_keeps_logits_and_outputs():
    gen = _gen(5)
    hidden, inter, n_exp = 32, 16, 4
    x = _rand(12, hidden, gen=gen)
    norm_w = _rand(hidden, gen=gen).abs() + 0.5
    router = _rand(n_exp, hidden, gen=gen)
    gates = [_rand(inter, hidden, gen=gen) for _ in range(n_exp)]
    ups = [_rand(inter, hidden, gen=gen) for _ in range(n_exp)]
    wmax = group_weight_absmax([router, *gates, *ups])
    amax = _rmsnorm(x, norm_w).abs().amax(0).to(torch.float32)
    s = smoothquant_scales(amax, wmax, 0.5)
    new_norm, _, outs = apply_smoothing(norm_w, [router, *gates, *ups], s)
    router2, gates2, ups2 = outs[0], outs[1 : 1 + n_exp], outs[1 + n_exp :]
    n0, n1 = _rmsnorm(x, norm_w), _rmsnorm(x, new_norm)
    torch.testing.assert_close(n1 @ router2.T, n0 @ router.T, **TIGHT)
    assert torch.equal((n1 @ router2.T).argmax(-1), (n0 @ router.T).argmax(-1))
    for e in range(n_exp):
        torch.testing.assert_close(n1 @ gates2[e].T, n0 @ gates[e].T, **TIGHT)
        torch.testing.assert_close(n1 @ ups2[e].T, n0 @ ups[e].T, **TIGHT)


def test_apply_smoothing_works_in_float32_for_low_precision_sources():
    w = torch.randn(8, 16, dtype=torch.bfloat16)
    src, _, (w2,) = apply_smoothing(torch.ones(16, dtype=torch.bfloat16), [w], torch.full((16,), 2.0))
    assert src.dtype == torch.float32 and w2.dtype == torch.float32
    assert torch.equal(w2, w.float() * 2) and torch.equal(src, torch.full((16,), 0.5))


# --- SmoothQuant scales -----------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.5, 0.8])
def test_smoothquant_scales_formula(alpha):
    gen = _gen(6)
    act = torch.rand(64, generator=gen) * 20 + 0.01
    wmax = torch.rand(64, generator=gen) + 0.01
    expect = torch.tensor([a**alpha / w ** (1 - alpha) for a, w in zip(act.tolist(), wmax.tolist(), strict=True)])
    got = smoothquant_scales(act, wmax, alpha)
    assert got.dtype == torch.float32 and got.shape == (64,)
    torch.testing.assert_close(got, expect.to(torch.float32), rtol=1e-5, atol=0)


def test_smoothquant_scales_guards():
    act = torch.tensor([0.0, 1.0, 4.0, 1e-20])
    wmax = torch.tensor([1.0, 0.0, 1.0, 1e6])
    s = smoothquant_scales(act, wmax, 0.5)
    assert s[0] == 1 and s[1] == 1  # dead channels stay put
    assert s[2] == 2
    assert s[3] == pytest.approx(1e-5)  # clamped
    assert bool(torch.isfinite(s).all() and (s > 0).all())


def test_group_weight_absmax_is_max_over_linears():
    a = torch.tensor([[1.0, -5.0], [2.0, 0.0]])
    b = torch.tensor([[-3.0, 1.0]])
    assert group_weight_absmax([a, b]).tolist() == [3.0, 5.0]


# --- AWQ scales and grid ----------------------------------------------------------------------


def test_awq_grid():
    assert torch.equal(awq_grid(20), torch.tensor([i / 20 for i in range(20)], dtype=torch.float32))
    assert awq_grid(4).dtype == torch.float32


def test_awq_weight_mean_matches_group_normalized_concat_mean():
    gen = _gen(7)
    ws = [torch.randn(24, 64, generator=gen), torch.randn(8, 64, generator=gen) * 5]
    g = 16
    cat = torch.cat(ws, 0)
    norm = cat.abs().view(-1, g) / (cat.abs().view(-1, g).amax(1, keepdim=True) + 1e-6)
    expect = norm.view(cat.shape).mean(0)
    torch.testing.assert_close(awq_weight_mean(ws, g), expect, rtol=1e-6, atol=1e-7)
    per_row = awq_weight_mean(ws, -1)
    torch.testing.assert_close(per_row, (cat.abs() / (cat.abs().amax(1, keepdim=True) + 1e-6)).mean(0))


@pytest.mark.parametrize("duo", [True, False])
def test_awq_candidate_scales_formula(duo):
    gen = _gen(8)
    xm = torch.rand(32, generator=gen) * 4 + 1e-3
    wm = torch.rand(32, generator=gen)
    r = 0.35
    raw = [
        max((x**r / (w ** (1 - r) + 1e-4)) if duo else x**r, 1e-4)
        for x, w in zip(xm.tolist(), wm.tolist(), strict=True)
    ]
    norm = math.sqrt(max(raw) * min(raw))
    expect = torch.tensor([v / norm for v in raw], dtype=torch.float32)
    got = awq_candidate_scales(xm, wm, r, duo)
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=0)
    assert float(got.max() * got.min()) == pytest.approx(1.0, rel=1e-5)
    if not duo:
        assert torch.equal(awq_candidate_scales(xm, None, 0.0, False), torch.ones(32))


def test_search_scales_picks_min_with_ties_to_lowest_ratio():
    gen = _gen(9)
    xm, wm = torch.rand(16, generator=gen) + 0.1, torch.rand(16, generator=gen) + 0.1
    table = [5.0, 3.0, 1.0, 4.0, 1.0, 2.0, 1.0, 9.0]
    calls = []

    def loss_fn(s):
        calls.append(s)
        return torch.tensor(table[len(calls) - 1], dtype=torch.float32)

    s, ratio, losses = search_scales(xm, wm, loss_fn, n_grid=8)
    assert losses.tolist() == table and losses.dtype == torch.float32
    assert ratio == 2 / 8
    _, cands = awq_candidates(xm, wm, 8, True)
    assert torch.equal(s, cands[2]) and torch.equal(calls[2], cands[2])


def test_split_grid_losses_sum_then_pick():
    """Per-rank losses summed before the argmin: the multi-process path."""
    gen = _gen(10)
    xm, wm = torch.rand(16, generator=gen) + 0.1, torch.rand(16, generator=gen) + 0.1
    ratios, cands = awq_candidates(xm, wm, 5, True)
    target = cands[3]
    rank_a = grid_losses(cands, lambda s: (s - target).pow(2).sum() + 1.0)
    rank_b = grid_losses(cands, lambda s: (s - target).abs().sum())
    s, idx = pick(rank_a + rank_b, cands)
    assert idx == 3 and torch.equal(s, target) and ratios[idx] == pytest.approx(0.6)


def test_pick_ignores_nan_and_refuses_all_nan():
    cands = torch.arange(8, dtype=torch.float32).view(4, 2)
    nan = float("nan")
    s, idx = pick(torch.tensor([nan, 2.0, 1.0, 1.0]), cands)
    assert idx == 2 and s.tolist() == [4.0, 5.0]
    with pytest.raises(ValueError, match="no finite loss"):
        pick(torch.full((4,), nan), cands)


def test_awq_beats_plain_rtn_with_outlier_channels():
    gen = _gen(11)
    n_tok, n_in, n_out, g = 256, 128, 64, 32
    x = torch.randn(n_tok, n_in, generator=gen)
    outliers = torch.randperm(n_in, generator=gen)[:4]
    x[:, outliers] *= 50.0
    w = torch.randn(n_out, n_in, generator=gen) * 0.05
    ref = x @ w.T

    def fq(t):
        return fq_sym(t, g)

    def loss_fn(s):
        return sum_squared_error(ref, x @ scaled_fake_quantize(w, s, fq).T)

    x_mean = x.abs().mean(0)
    w_mean = awq_weight_mean([w], g)
    s, ratio, losses = search_scales(x_mean, w_mean, loss_fn)
    rtn = sum_squared_error(ref, x @ fq(w).T)
    assert float(losses.min()) == float(loss_fn(s))
    assert float(loss_fn(s)) < 0.5 * float(rtn), (float(loss_fn(s)), float(rtn), ratio)
    assert ratio > 0
    # outlier channels get scaled up
    assert float(s[outliers].min()) > float(s.median())


# --- clip search --------------------------------------------------------------------------------


def _fq_clip(g):
    return lambda w, c: fq_sym(clamp_to_clip(w, c, g), g)


def test_clip_ratios_and_sampling():
    r = clip_ratios()
    assert r.tolist() == pytest.approx([1 - i / 20 for i in range(10)])
    x = torch.arange(2048, dtype=torch.float32).view(1024, 2)
    assert sample_tokens(x, 512).shape == (512, 2) and sample_tokens(x[:100], 512).shape == (100, 2)


def test_clamp_to_clip():
    w = torch.tensor([[3.0, -4.0, 1.0, 2.0]])
    assert clamp_to_clip(w, torch.tensor([[2.0, 1.5]]), 2).tolist() == [[2.0, -2.0, 1.0, 1.5]]


def test_clip_errors_match_bruteforce():
    gen = _gen(12)
    g, n_out, n_in = 8, 4, 16
    w = torch.randn(n_out, n_in, generator=gen, dtype=F64)
    x = torch.randn(20, n_in, generator=gen, dtype=F64)
    ratios = clip_ratios(20, 0.5)
    errs = clip_errors(w, x, g, _fq_clip(g), ratios, out_chunk=3)
    assert errs.shape == (10, n_out, 2) and errs.dtype == torch.float32
    for i, r in enumerate(ratios.tolist()):
        for o in range(n_out):
            for gi in range(2):
                cols = slice(gi * g, (gi + 1) * g)
                wg = w[o, cols]
                c = wg.abs().max() * r
                wq = torch.clamp(wg, -c, c)
                scale = wq.abs().max() / 7
                wq = torch.clamp(torch.round(wq / scale), -8, 7) * scale
                e = ((x[:, cols] @ wq - x[:, cols] @ wg) ** 2).sum()
                assert float(errs[i, o, gi]) == pytest.approx(float(e), rel=1e-5, abs=1e-9)


def test_clip_search_picks_min_error_and_helps():
    gen = _gen(13)
    g, n_out, n_in = 32, 16, 128
    # heavy tails: a few large weights per group make plain absmax ranges wasteful
    u = torch.rand(n_out, n_in, generator=gen) - 0.5
    w = -torch.sign(u) * torch.log1p(-2 * u.abs()) * 0.02  # Laplace by inverse CDF
    x = torch.randn(300, n_in, generator=gen)
    fq = _fq_clip(g)
    clip = clip_search(w, x, g, fq, n_sample_tokens=1000)
    absmax = w.view(n_out, -1, g).abs().amax(-1)
    assert clip.shape == (n_out, n_in // g) and clip.dtype == torch.float32
    ratio = clip / absmax
    assert bool(((ratio > 0.549) & (ratio < 1.0 + 1e-6)).all())
    # per (row, group): the picked error is the minimum over the ratios
    ratios = clip_ratios()
    errs = clip_errors(w, x, g, fq, ratios)
    picked = clip_pick(errs, w, g, ratios)
    assert torch.equal(picked, clip)
    idx = torch.round((1 - ratio) * 20).long()
    chosen = errs.gather(0, idx.unsqueeze(0)).squeeze(0)
    assert torch.equal(chosen, errs.amin(0))
    # and the output error of the whole Linear drops versus no clipping
    ref = x @ w.T
    clipped = sum_squared_error(ref, x @ fq(w, clip).T)
    plain = sum_squared_error(ref, x @ fq(w, absmax).T)
    assert float(clipped) < float(plain)


def test_clip_ties_keep_the_full_range():
    w = torch.randn(8, 32)
    x = torch.randn(10, 32)
    clip = clip_search(w, x, 16, lambda w_, c: w_)  # a "quantizer" with no error: all ties
    torch.testing.assert_close(clip, w.view(8, 2, 16).abs().amax(-1), rtol=0, atol=0)
