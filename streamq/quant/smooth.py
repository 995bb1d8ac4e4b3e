"""SmoothQuant and AWQ scaling math: pure tensor functions with explicit dtypes.

Both algorithms move per-input-channel magnitude between a *source* (the RMSNorm/LayerNorm
weight that feeds a group of Linears, or a preceding Linear whose output rows are those
channels) and the *following* Linears' columns:

    y = W (x)  with x = g * n          ->    y = (W diag(s)) (x / s),   x / s = (g / s) * n

so the group computes the same function before quantization for any positive s. A router that
reads the same normalized hidden state (MoE `mlp.gate`) is just one more following Linear: its
columns are multiplied by s too, or routing would change.

Sources:
- SmoothQuant: Xiao et al. 2023, "SmoothQuant: Accurate and Efficient Post-Training Quantization
  for Large Language Models", eq. (4): s_j = max|X_j|^a / max|W_j|^(1-a).
- AWQ: Lin et al. 2023, "AWQ: Activation-aware Weight Quantization for LLM Compression and
  Acceleration", section 3.2 (s = s_X^a searched on a grid), in the form AutoAWQ implements it
  (`awq/quantize/quantizer.py`: duo scaling with a group-normalized weight mean, a 20-point grid,
  normalization by sqrt(max * min), and the per-group clipping search `_compute_best_clip`).

Dtypes: statistics and scales are float32. Tensors that are rewritten are computed in
float32 (float64 when a float64 tensor is given, which the exactness tests use) from the values
passed in, and returned in that dtype; the caller casts to the source dtype once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

# SmoothQuant's reference code clamps scales at 1e-5; a channel whose activation or weight
# range is 0 carries no information, so it is left alone (s = 1).
SMOOTH_MIN_SCALE = 1e-5
# AutoAWQ's constants: scales clamped at 1e-4, 1e-4 added to the weight term of duo scaling,
# 1e-6 added to a quantization group's absmax when normalizing |W|.
AWQ_MIN_SCALE = 1e-4
AWQ_W_EPS = 1e-4
AWQ_GROUP_EPS = 1e-6


def _work_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float32, or float64 if any input is float64 (never lower than float32)."""
    dtype = torch.float32
    for t in tensors:
        assert t.is_floating_point(), t.dtype
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _as_1d_f32(name: str, t: torch.Tensor) -> torch.Tensor:
    assert t.ndim == 1, f"{name}: expected shape [in], got {tuple(t.shape)}"
    assert t.dtype == torch.float32, f"{name}: expected float32, got {t.dtype}"
    assert bool(torch.isfinite(t).all()), f"{name}: non-finite values"
    return t


# ---------------------------------------------------------------------------------------------
# Shared: applying per-channel scales to a source and its following Linears
# ---------------------------------------------------------------------------------------------


def group_weight_absmax(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """max_k max_o |W_k[o, j]| over every Linear of a group: [in] float32.

    weights: 2D [out_k, in] each, same `in`. Used as SmoothQuant's max|W_j|.
    """
    assert len(weights) > 0, "a smoothing group needs at least one Linear"
    n_in = weights[0].shape[1]
    out = torch.zeros(n_in, dtype=torch.float32, device=weights[0].device)
    for w in weights:
        assert w.ndim == 2 and w.shape[1] == n_in, (tuple(w.shape), n_in)
        out = torch.maximum(out, w.abs().amax(dim=0).to(torch.float32))
    return out


def apply_smoothing(
    source_weight: torch.Tensor,
    linears: Sequence[torch.Tensor],
    s: torch.Tensor,
    source_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor]]:
    """Divide the source's channels by s and multiply the following Linears' columns by s.

    source_weight: the tensor that produces channel j of the group's input, indexed by j on
      dim 0: a norm weight [in] (RMSNorm / LayerNorm computing `normalized * weight (+ bias)`;
      a Gemma-style `(1 + weight)` norm must be converted first), or a preceding Linear's
      weight [in, k] whose OUTPUT rows are the channels (v_proj -> o_proj, up_proj -> down_proj).
    source_bias: optional [in] (LayerNorm bias, or the preceding Linear's bias); divided by s.
    linears: following weights [out_k, in] (q/k/v; o_proj; router + experts' gate/up; down_proj).
    s: [in], positive and finite.

    Returns (source / s, bias / s or None, [W_k * s]) computed in the work dtype (float32, or
    float64 for float64 inputs) from the given tensors. The inputs are not modified.
    """
    assert s.ndim == 1 and s.is_floating_point(), (tuple(s.shape), s.dtype)
    assert bool(torch.isfinite(s).all()) and bool((s > 0).all()), "smoothing scales must be finite and > 0"
    n_in = s.shape[0]
    assert source_weight.ndim in (1, 2) and source_weight.shape[0] == n_in, (
        f"source rows {tuple(source_weight.shape)} do not match {n_in} scales "
        "(v_proj -> o_proj needs v_proj's output size equal to o_proj's input size)"
    )
    dtype = _work_dtype(source_weight, s, *linears, *([source_bias] if source_bias is not None else []))
    s_w = s.to(dtype)
    src = source_weight.to(dtype) / s_w.view(-1, *([1] * (source_weight.ndim - 1)))
    bias = None
    if source_bias is not None:
        assert source_bias.shape == (n_in,), tuple(source_bias.shape)
        bias = source_bias.to(dtype) / s_w
    outs = []
    for w in linears:
        assert w.ndim == 2 and w.shape[1] == n_in, f"Linear {tuple(w.shape)} does not take {n_in} inputs"
        outs.append(w.to(dtype) * s_w.view(1, -1))
    return src, bias, outs


# ---------------------------------------------------------------------------------------------
# SmoothQuant
# ---------------------------------------------------------------------------------------------


def smoothquant_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's s_j = max|X_j|^alpha / max|W_j|^(1 - alpha): [in] float32.

    act_absmax: [in] float32, max |x_j| over the calibration tokens (real tokens only).
    weight_absmax: [in] float32, max over all Linears of the group of column absmax
      (`group_weight_absmax`).
    A channel with act_absmax == 0 or weight_absmax == 0 gets s = 1 (nothing to balance);
    the rest are clamped below at SMOOTH_MIN_SCALE.
    """
    _as_1d_f32("act_absmax", act_absmax)
    _as_1d_f32("weight_absmax", weight_absmax)
    assert act_absmax.shape == weight_absmax.shape, (tuple(act_absmax.shape), tuple(weight_absmax.shape))
    assert 0.0 <= alpha <= 1.0, f"alpha must be in [0, 1], got {alpha}"
    a = torch.tensor(alpha, dtype=torch.float32, device=act_absmax.device)
    s = act_absmax.pow(a) / weight_absmax.pow(1 - a)
    dead = (act_absmax == 0) | (weight_absmax == 0) | ~torch.isfinite(s)
    s = torch.where(dead, torch.ones_like(s), s)
    return s.clamp(min=SMOOTH_MIN_SCALE)


# ---------------------------------------------------------------------------------------------
# AWQ scale search
# ---------------------------------------------------------------------------------------------


def awq_weight_mean(weights: Sequence[torch.Tensor], group_size: int) -> torch.Tensor:
    """AWQ's per-input-channel weight magnitude w_mean: [in] float32.

    For every Linear of the group, |W| [out_k, in] is divided by the absmax of its quantization
    group (row o, columns [g*G, (g+1)*G)) plus 1e-6, putting each group on a 0..1 scale; w_mean is
    then the mean over ALL output rows of all the group's Linears (the rows concatenated, so a
    Linear weighs by its row count), as AutoAWQ's `_search_best_scale` does. The group
    normalization makes the statistic measure where a column sits relative to the range its
    quantization group will get, not its absolute size. group_size <= 0 means one group per row.
    Computed as a per-Linear float32 row sum, accumulated in list order, divided by the row total.
    """
    assert len(weights) > 0, "an AWQ group needs at least one Linear"
    n_in = weights[0].shape[1]
    g = n_in if group_size <= 0 else group_size
    assert n_in % g == 0, f"in={n_in} is not a multiple of group_size={g}"
    total = torch.zeros(n_in, dtype=torch.float32, device=weights[0].device)
    rows = 0
    for w in weights:
        assert w.ndim == 2 and w.shape[1] == n_in, (tuple(w.shape), n_in)
        a = w.to(torch.float32).abs().view(w.shape[0], n_in // g, g)
        a = a / (a.amax(dim=2, keepdim=True) + AWQ_GROUP_EPS)
        total += a.view(w.shape[0], n_in).sum(dim=0)
        rows += w.shape[0]
    return total / rows


def awq_grid(n_grid: int = 20) -> torch.Tensor:
    """The ratios r = i / n_grid for i in range(n_grid): [n_grid] float32 (0 included, 1 not)."""
    assert n_grid >= 1, n_grid
    return torch.arange(n_grid, dtype=torch.float32) / n_grid


def awq_candidate_scales(
    x_mean: torch.Tensor, w_mean: torch.Tensor | None, ratio: float, duo_scaling: bool
) -> torch.Tensor:
    """One AWQ candidate s for ratio r: [in] float32.

    duo_scaling: s = x_mean^r / (w_mean^(1-r) + 1e-4)   (AutoAWQ adds the 1e-4: guards w_mean=0)
    otherwise:   s = x_mean^r                            (the paper's s_X^a)
    then s = clamp(s, min=1e-4), s = s / sqrt(max(s) * min(s)) (centres s around 1 on a log
    scale), and any non-finite entry -> 1. Note with duo scaling r = 0 is NOT the identity.
    x_mean: [in] float32 mean |x_j| over real tokens; w_mean: [in] float32 (`awq_weight_mean`).
    """
    _as_1d_f32("x_mean", x_mean)
    r = torch.tensor(float(ratio), dtype=torch.float32, device=x_mean.device)
    if duo_scaling:
        assert w_mean is not None, "duo scaling needs w_mean"
        _as_1d_f32("w_mean", w_mean)
        assert w_mean.shape == x_mean.shape, (tuple(w_mean.shape), tuple(x_mean.shape))
        s = x_mean.pow(r) / (w_mean.pow(1 - r) + AWQ_W_EPS)
    else:
        s = x_mean.pow(r)
    s = s.clamp(min=AWQ_MIN_SCALE)
    s = s / (s.max() * s.min()).sqrt()
    return torch.where(torch.isfinite(s), s, torch.ones_like(s))


def awq_candidates(
    x_mean: torch.Tensor, w_mean: torch.Tensor | None, n_grid: int = 20, duo_scaling: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """All candidates of the grid: (ratios [n_grid] float32, scales [n_grid, in] float32)."""
    ratios = awq_grid(n_grid)
    scales = torch.stack([awq_candidate_scales(x_mean, w_mean, float(r), duo_scaling) for r in ratios])
    return ratios, scales


def grid_losses(candidates: torch.Tensor, loss_fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """loss_fn(s) for every candidate row: [n_grid] float32, on the candidates' device.

    loss_fn maps s [in] float32 to a float32 scalar, typically the squared error of the parent
    block's output with weights Q(W * s) / s (`scaled_fake_quantize`) against the unquantized
    output; a SUM over real tokens (the argmin of a sum equals that of the mean).
    """
    assert candidates.ndim == 2 and candidates.dtype == torch.float32, (tuple(candidates.shape), candidates.dtype)
    out = torch.empty(candidates.shape[0], dtype=torch.float32, device=candidates.device)
    for i in range(candidates.shape[0]):
        loss = loss_fn(candidates[i])
        assert isinstance(loss, torch.Tensor) and loss.numel() == 1, "loss_fn must return a scalar tensor"
        assert loss.dtype == torch.float32, f"loss_fn must return float32, got {loss.dtype}"
        out[i] = loss.reshape(()).to(out.device)
    return out


def pick(losses: torch.Tensor, candidates: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The candidate with the smallest loss: (s [in] float32, its grid index).

    Ties go to the lowest index (lowest ratio), as AutoAWQ's strict `<` scan does. NaN counts as
    +inf; if no loss is finite this raises ValueError (AutoAWQ raises there too).
    """
    assert losses.ndim == 1 and losses.shape[0] == candidates.shape[0], (tuple(losses.shape), tuple(candidates.shape))
    clean = torch.where(torch.isnan(losses), torch.full_like(losses, float("inf")), losses).cpu()
    if not bool(torch.isfinite(clean).any()):
        raise ValueError(f"AWQ scale search: no finite loss on the grid ({losses.tolist()})")
    best = int((clean == clean.min()).nonzero()[0, 0])
    return candidates[best], best


def search_scales(
    x_mean: torch.Tensor,
    w_mean: torch.Tensor | None,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    n_grid: int = 20,
    duo_scaling: bool = True,
) -> tuple[torch.Tensor, float, torch.Tensor]:
    """Single-process AWQ grid search: (best s [in] float32, best ratio, losses [n_grid] float32).

    Equivalent to `awq_candidates` -> `grid_losses` -> `pick`; a multi-process caller runs those
    three itself with an all-reduce sum of the losses in between.
    """
    ratios, candidates = awq_candidates(x_mean, w_mean, n_grid, duo_scaling)
    losses = grid_losses(candidates, loss_fn)
    s, idx = pick(losses, candidates)
    return s, float(ratios[idx]), losses


def scaled_fake_quantize(
    w: torch.Tensor, s: torch.Tensor, fake_quant: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Q(W * s) / s for a weight [out, in] and scales [in]: what the loss of a grid point sees.

    Computed in the work dtype (float32, float64 for float64 inputs). fake_quant maps a weight
    [out, in] to its quantize-dequantize round trip of the same shape.
    """
    assert w.ndim == 2 and s.shape == (w.shape[1],), (tuple(w.shape), tuple(s.shape))
    dtype = _work_dtype(w, s)
    sv = s.to(dtype).view(1, -1)
    return fake_quant(w.to(dtype) * sv).to(dtype) / sv


def sum_squared_error(ref: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """sum((out - ref)^2) as a float32 scalar (differences taken in float32 or wider)."""
    assert ref.shape == out.shape, (tuple(ref.shape), tuple(out.shape))
    dtype = _work_dtype(ref, out)
    return (out.to(dtype) - ref.to(dtype)).pow(2).sum().to(torch.float32)


# ---------------------------------------------------------------------------------------------
# AWQ clipping search (`mse_range: true`)
# ---------------------------------------------------------------------------------------------


def clip_ratios(n_grid: int = 20, max_shrink: float = 0.5) -> torch.Tensor:
    """Shrink ratios 1 - i / n_grid for i in range(int(max_shrink * n_grid)): [n] float32.

    The AutoAWQ defaults give 1.00, 0.95, ..., 0.55 (10 ratios; 1.0 = no clipping first).
    """
    n = int(max_shrink * n_grid)
    assert n >= 1, (n_grid, max_shrink)
    return 1 - torch.arange(n, dtype=torch.float32) / n_grid


def sample_tokens(x: torch.Tensor, n_sample_tokens: int = 512) -> torch.Tensor:
    """Every k-th row of x [n, in] with k = max(1, n // n_sample_tokens) (AutoAWQ's sampling)."""
    assert x.ndim == 2, tuple(x.shape)
    return x[:: max(1, x.shape[0] // n_sample_tokens)]


def clamp_to_clip(w: torch.Tensor, clip_max: torch.Tensor, group_size: int) -> torch.Tensor:
    """W clamped to [-c, c] per (row, group): w [out, in], clip_max [out, in/g] -> [out, in].

    This is how a clip search result is applied before quantizing (AutoAWQ `apply_clip`): the
    quantizer then derives its range from the clamped weight.
    """
    out_f, n_in = w.shape
    assert n_in % group_size == 0 and clip_max.shape == (out_f, n_in // group_size), (
        tuple(w.shape), tuple(clip_max.shape), group_size)
    c = clip_max.to(w.dtype).unsqueeze(-1)
    return torch.clamp(w.view(out_f, n_in // group_size, group_size), -c, c).view(out_f, n_in)


def clip_errors(
    w: torch.Tensor,
    x: torch.Tensor,
    group_size: int,
    fake_quant: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ratios: torch.Tensor,
    out_chunk: int = 256,
) -> torch.Tensor:
    """Squared output error of every shrink ratio per (row, group): [n_ratios, out, in/g] float32.

    w: [out, in] (already AWQ-scaled if scales were applied); x: [n, in] inputs the Linear sees
      (divided by the same AWQ scales; sample first with `sample_tokens`).
    For ratio r the clip maxima are c = r * absmax(W[o, group]); fake_quant(w_rows, c_rows) must
      return the quantize-dequantize of those rows using c as the range
      (e.g. `lambda w, c: fq(clamp_to_clip(w, c, g))`); it must treat rows independently.
    The error of a group is that group's partial output, sum_{j in group} x[t, j] * W[o, j],
    squared error summed over the tokens t (a sum so ranks can all-reduce it).
    """
    assert w.ndim == 2 and x.ndim == 2 and x.shape[1] == w.shape[1], (tuple(w.shape), tuple(x.shape))
    out_f, n_in = w.shape
    g = n_in if group_size <= 0 else group_size
    assert n_in % g == 0, (n_in, g)
    n_groups = n_in // g
    dtype = _work_dtype(w, x)
    xg = x.to(dtype).view(-1, n_groups, g)
    errs = torch.empty(ratios.shape[0], out_f, n_groups, dtype=torch.float32, device=w.device)
    for lo in range(0, out_f, out_chunk):
        wc = w[lo : lo + out_chunk].to(dtype)
        rows = wc.shape[0]
        wg = wc.view(rows, n_groups, g)
        org_max = wg.abs().amax(dim=2)  # [rows, G]
        ref = torch.einsum("tgk,rgk->rtg", xg, wg)
        for i, r in enumerate(ratios.tolist()):
            wq = fake_quant(wc, org_max * r).to(dtype)
            assert wq.shape == wc.shape, (tuple(wq.shape), tuple(wc.shape))
            cur = torch.einsum("tgk,rgk->rtg", xg, wq.view(rows, n_groups, g))
            errs[i, lo : lo + rows] = (cur - ref).pow(2).sum(dim=1).to(torch.float32)
    return errs


def clip_pick(errors: torch.Tensor, w: torch.Tensor, group_size: int, ratios: torch.Tensor) -> torch.Tensor:
    """Per (row, group) the clip maximum r * absmax with the smallest error: [out, in/g].

    errors: [n_ratios, out, in/g] (`clip_errors`, summed across ranks if several). Ties go to the
    earliest ratio (the least clipping). Returned in the work dtype of w (float32 or float64).
    """
    out_f, n_in = w.shape
    g = n_in if group_size <= 0 else group_size
    dtype = _work_dtype(w)
    org_max = w.to(dtype).view(out_f, n_in // g, g).abs().amax(dim=2)
    assert errors.shape == (ratios.shape[0], *org_max.shape), (tuple(errors.shape), tuple(org_max.shape))
    clean = torch.where(torch.isnan(errors), torch.full_like(errors, float("inf")), errors)
    # argmin over dim 0 with first-index ties, made explicit: index of the first position equal to the min.
    is_min = clean == clean.amin(dim=0, keepdim=True)
    idx = torch.where(is_min, torch.arange(ratios.shape[0], device=errors.device).view(-1, 1, 1), ratios.shape[0])
    best = idx.amin(dim=0).clamp(max=ratios.shape[0] - 1)
    return org_max * ratios.to(device=w.device, dtype=dtype)[best]


def clip_search(
    w: torch.Tensor,
    x: torch.Tensor,
    group_size: int,
    fake_quant: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    n_grid: int = 20,
    max_shrink: float = 0.5,
    n_sample_tokens: int = 512,
    out_chunk: int = 256,
) -> torch.Tensor:
    """AWQ auto-clip of one Linear: the clip maxima [out, in/g] minimizing the output error.

    Single-process composition of `sample_tokens`, `clip_ratios`, `clip_errors` and `clip_pick`.
    AutoAWQ skips q_proj/k_proj (their error is amplified by the q k^T product); that choice is
    the caller's.
    """
    ratios = clip_ratios(n_grid, max_shrink)
    errs = clip_errors(w, sample_tokens(x, n_sample_tokens), group_size, fake_quant, ratios, out_chunk)
    return clip_pick(errs, w, group_size, ratios)
