"""GPTQ for INT4 per-group weights, batched over experts; Hessian accumulators.

The solve is Algorithm 1 of Frantar et al. 2022 ("GPTQ: Accurate Post-Training
Quantization for Generative Pre-trained Transformers"): Cholesky factor of the inverse
Hessian, columns quantized one at a time with the error spread over the remaining
columns, lazy batch updates of `block_size` columns. Choices (DESIGN.md, "GPTQ and AWQ
facts", matching llm-compressor):

- group scales/zero points come from the ORIGINAL weight before the solve ("static
  groups"), for the original column groups, with or without `actorder`;
- `actorder` (static) visits columns in decreasing diag(H) (stable sort) order; no g_idx
  (llm-compressor's `actorder: weight`/`static`);
- dead columns (diag H = 0): H[i, i] = 1 and W[:, i] = 0;
- damping `damp_percent * mean(diag H)` per expert; where a Cholesky fails the damping
  grows by `damp_step` per retry, and after `max_tries` that expert is quantized
  round-to-nearest (RTN) and flagged; an expert whose H is all zero (no token reached
  it) is RTN too, never zeros.

Everything is float32 on any device; the experts are one batched problem (bmm /
cholesky_ex over the leading dimension), with no Python loop over experts. Host syncs:
one per damping attempt and one at the end (the reasons list), none per column. Peak
memory is about four copies of the float32 weight (input, working copy, per-column
scales, per-column zero points when asymmetric) plus two int8 code tensors and the
[E or 1, in, in] factor; on CUDA the column loop's graph adds a few block-wide slices
(`_GraphedBlock`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from streamq.quant import int4

log = logging.getLogger(__name__)

# Reasons an expert was not GPTQ-solved (RTN_* go with rtn=True).
SOLVED = "gptq"
RTN_NO_TOKENS = "rtn: hessian is zero (no calibration token reached it)"
RTN_CHOLESKY = "rtn: cholesky failed at every damping tried"


@dataclass
class GPTQResult:
    """Output of `gptq_quantize` for E experts (E = 1 for a plain Linear).

    codes: int8 [E, out, in] in [-8, 7]; scale: float32 [E, out, in / g];
    zero_point: int32 [E, out, in / g] or None (symmetric); rtn: bool [E] (expert fell
    back to round-to-nearest); reasons: one of SOLVED / RTN_* per expert; damp: float32
    [E], the damping fraction of mean(diag H) that the successful Cholesky used (0 for
    RTN experts).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    rtn: torch.Tensor
    reasons: list[str]
    damp: torch.Tensor

    def dequantize(self, group_size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return int4.dequantize(self.codes, self.scale, self.zero_point, group_size, dtype)


def _inverse_hessian_factor(
    h: torch.Tensor, damp_percent: float, damp_step: float, max_tries: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, per batch element.

    h: float32 [B, in, in] with dead columns already fixed. Returns (U float32
    [B, in, in], ok bool [B], damp float32 [B]); U is the identity where not ok.
    """
    b, n, _ = h.shape
    mean_diag = torch.diagonal(h, dim1=-2, dim2=-1).mean(dim=-1)  # [B]
    u = torch.empty_like(h)
    ok = torch.zeros(b, dtype=torch.bool, device=h.device)
    used = torch.zeros(b, dtype=torch.float32, device=h.device)
    for attempt in range(max_tries):
        frac = damp_percent + damp_step * attempt
        # Each intermediate is dropped as soon as the next exists: at most two [B, n, n]
        # temporaries live beside h and u (this is the solve's memory peak for big experts).
        damped = h.clone()
        torch.diagonal(damped, dim1=-2, dim2=-1).add_((frac * mean_diag)[:, None])
        lower, info = torch.linalg.cholesky_ex(damped)
        del damped
        hinv = torch.cholesky_inverse(lower)
        del lower
        upper, info2 = torch.linalg.cholesky_ex(hinv, upper=True)
        del hinv
        good = (info == 0) & (info2 == 0) & torch.isfinite(upper).all(dim=(-2, -1)) & ~ok
        u[good] = upper[good]
        del upper
        used = torch.where(good, torch.full_like(used, frac), used)
        ok = ok | good
        if bool(ok.all()):  # one host sync per attempt, not per column
            break
    if not bool(ok.all()):
        u[~ok] = torch.eye(n, dtype=h.dtype, device=h.device)
    return u, ok, used


# Full blocks from which a call captures its column loop as a CUDA graph: block 0 runs
# eagerly, capture costs about one eager block, so the graph pays from the third block on.
GRAPH_MIN_BLOCKS = 3


def _column_block(w1: torch.Tensor, u1: torch.Tensor, s1: torch.Tensor, z1: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's inner loop over one block of B columns (Algorithm 1, lines 4-9).

    w1 float32 [E, out, B] (read, not written); u1 float32 [hb, B, B], the block's diagonal
    block of the inverse Hessian's upper factor (hb = 1 or E); s1 float32 / z1 int32 or
    None [E, out, B], each column's group scale and zero point. Returns (codes int8
    [E, out, B], err float32 [E, out, B]), err the scaled errors that update the columns
    after the block. About ten kernels a column, so this loop is launch-bound on a GPU.
    """
    e, out, width = w1.shape
    assert u1.shape[-2:] == (width, width) and s1.shape == w1.shape, (tuple(u1.shape), tuple(s1.shape))
    w1 = w1.clone()
    err1 = torch.empty_like(w1)
    q1 = torch.empty(e, out, width, dtype=int4.CODE_DTYPE, device=w1.device)
    for i in range(width):
        col = w1[:, :, i]  # [E, out]
        s = s1[:, :, i]
        z = None if z1 is None else z1[:, :, i]
        q = int4.quantize_elementwise(col, s, z)
        q1[:, :, i] = q
        err = (col - int4.dequantize_elementwise(q, s, z)) / u1[:, i, i][:, None]  # [E, out]
        w1[:, :, i:] -= err[:, :, None] * u1[:, None, i, i:]
        err1[:, :, i] = err
    return q1, err1


class _GraphedBlock:
    """`_column_block` for one shape, captured once as a CUDA graph and replayed per block.

    The column loop launches about ten small kernels a column; on a GPU the host cannot
    issue them as fast as they run, and processes sharing a host slow each other down. A
    replay issues the whole block at once. The kernels and their inputs are those of the
    eager loop, so the codes are byte-identical (tests/test_gptq_gpu.py).

    Capture uses `capture_begin` on a side stream rather than `torch.cuda.graph`, which
    would synchronize the whole device and empty the allocator's cache (stalling the
    reader's copies on other streams). "thread_local" lets the engine's other threads
    launch work and copy meanwhile, but no thread may synchronize the whole device during
    a capture (`torch.cuda.synchronize()` invalidates it): the engine's device-wide
    synchronizations all run on the thread that solves. Memory: the static inputs and
    outputs (five block slices) and the captured temporaries (about three), the latter
    in the graph's private pool. Freed with the object, that pool's blocks stay reserved
    (not allocated: the budget counts allocated bytes) until the caching allocator empties
    its cache, which it does before failing an allocation, so they grow the process's
    reserved memory call by call. A pool shared by all captures would not; on torch 2.11 a
    second capture into one MemPool was refused ("already recording to mempool_id").
    """

    def __init__(self, w1: torch.Tensor, u1: torch.Tensor, s1: torch.Tensor, z1: torch.Tensor | None):
        self._inputs = [t.clone() for t in (w1, u1, s1)] + ([] if z1 is None else [z1.clone()])
        self._graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream(device=w1.device)
        side.wait_stream(torch.cuda.current_stream(w1.device))
        with torch.cuda.stream(side):
            self._graph.capture_begin(capture_error_mode="thread_local")
            try:
                self._outputs = _column_block(*self._inputs, *([None] if z1 is None else []))
            finally:
                self._graph.capture_end()
        torch.cuda.current_stream(w1.device).wait_stream(side)

    def __call__(self, w1: torch.Tensor, u1: torch.Tensor, s1: torch.Tensor, z1: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Same contract as `_column_block`; the results are the graph's own buffers, valid
        until the next call."""
        values = (w1, u1, s1) if z1 is None else (w1, u1, s1, z1)
        assert len(values) == len(self._inputs), "zero points given to a graph captured without (or vice versa)"
        for static, value in zip(self._inputs, values, strict=True):
            assert static.shape == value.shape, (tuple(static.shape), tuple(value.shape))
            static.copy_(value)
        self._graph.replay()
        return self._outputs


def _capture(args: tuple) -> _GraphedBlock | None:
    """The column loop of blocks shaped like `args` as a graph; None (eager: the same bytes,
    only slower) where the graph's memory cannot be had. Any other capture failure is a bug
    or a broken rule (`_GraphedBlock`) and is raised: an invalidated capture can leave the
    allocator unable to reclaim memory for the rest of the process."""
    try:
        return _GraphedBlock(*args)
    except torch.cuda.OutOfMemoryError as e:
        log.warning("GPTQ column loop runs eagerly: no memory for its CUDA graph (%s)", e)
        return None


def gptq_quantize(
    w: torch.Tensor,
    hessian: torch.Tensor,
    group_size: int,
    symmetric: bool,
    actorder: bool = False,
    damp_percent: float = 0.01,
    block_size: int = 128,
    damp_step: float = 0.01,
    max_tries: int = 10,
    scale_dtype: torch.dtype = torch.float32,
    graphs: bool = True,
) -> GPTQResult:
    """GPTQ-quantize E weights [E, out, in] (float32) against their Hessians.

    hessian: float32 [E, in, in], or [in, in] shared by all E (one factorization then).
    `scale_dtype` is the dtype the scales will be stored in (see int4.group_params).
    Returns codes in the original column order (actorder leaves no trace on disk).
    `graphs`: on CUDA, replay the column loop of each full block as one CUDA graph
    (`_GraphedBlock`); the same kernels on the same values, so the same bytes as eager.
    """
    assert w.ndim == 3, f"expected [E, out, in], got {tuple(w.shape)}"
    assert w.dtype == torch.float32 and hessian.dtype == torch.float32, (w.dtype, hessian.dtype)
    e, out, n = w.shape
    shared = hessian.ndim == 2
    h = (hessian.unsqueeze(0) if shared else hessian).clone()
    hb = h.shape[0]  # 1 when shared, else E
    assert tuple(h.shape) == (hb, n, n) and hb in (1, e), (tuple(hessian.shape), tuple(w.shape))
    assert block_size > 0 and max_tries > 0

    scale, zp = int4.group_params(w, group_size, symmetric, scale_dtype)  # from the original weight
    rtn_codes = int4.quantize(w, scale, zp, group_size)

    diag = torch.diagonal(h, dim1=-2, dim2=-1)  # view into h: [hb, n]
    empty = (diag == 0).all(dim=-1)  # H is PSD, so a zero diagonal means H = 0
    dead = diag == 0
    # Visiting order from the diagonal before the dead fix (dead columns last), as
    # llm-compressor; dead columns are decoupled (zero row and column), so their place
    # in the order changes no code.
    perm = torch.argsort(diag, dim=-1, descending=True, stable=True) if actorder else None  # [hb, n]
    diag.masked_fill_(dead, 1.0)
    work = w.masked_fill(dead[:, None, :], 0.0)
    # Per-column scale/zero point in visiting order (gather of the original groups).
    group_of_col = torch.arange(n, device=w.device) // group_size
    if perm is not None:
        work = torch.gather(work, 2, perm[:, None, :].expand(e, out, n))
        h = torch.gather(h, 1, perm[:, :, None].expand(hb, n, n))
        h = torch.gather(h, 2, perm[:, None, :].expand(hb, n, n))
        cols = group_of_col[perm]  # [hb, n]
    else:
        cols = group_of_col.expand(hb, n)
    u, ok, damp = _inverse_hessian_factor(h, damp_percent, damp_step, max_tries)
    ok = ok & ~empty
    damp = torch.where(ok, damp, torch.zeros_like(damp))
    col_scale = torch.gather(scale, 2, cols[:, None, :].expand(e, out, n))
    col_zp = None if zp is None else torch.gather(zp, 2, cols[:, None, :].expand(e, out, n))

    codes = torch.empty(e, out, n, dtype=int4.CODE_DTYPE, device=w.device)
    width = max(1, min(block_size, n))
    graphed = None
    full_blocks = n // width
    for b, i1 in enumerate(range(0, n, width)):
        i2 = min(i1 + width, n)
        args = (work[:, :, i1:i2], u[:, i1:i2, i1:i2], col_scale[:, :, i1:i2],
                None if col_zp is None else col_zp[:, :, i1:i2])
        # Block 0 runs eagerly (and warms up what capture must not initialize); later full
        # blocks replay one captured graph where there are enough of them to pay for it.
        if b == 1 and graphs and w.is_cuda and full_blocks >= GRAPH_MIN_BLOCKS:
            graphed = _capture(args)
        if graphed is not None and i2 - i1 == width:
            q1, err1 = graphed(*args)
        else:
            q1, err1 = _column_block(*args)
        codes[:, :, i1:i2] = q1
        if i2 < n:
            work[:, :, i2:] -= torch.matmul(err1, u[:, i1:i2, i2:])
    del graphed

    if perm is not None:
        codes = torch.empty_like(codes).scatter_(2, perm[:, None, :].expand(e, out, n), codes)
    rtn = ~ok.expand(e)
    codes = torch.where(rtn[:, None, None], rtn_codes, codes)
    reasons = [
        SOLVED if good else (RTN_NO_TOKENS if no_tokens else RTN_CHOLESKY)
        for good, no_tokens in zip(ok.expand(e).tolist(), empty.expand(e).tolist(), strict=True)
    ]
    return GPTQResult(codes, scale, zp, rtn, reasons, damp.expand(e).clone())
