"""Hessian observers for GPTQ: H = 2 X^T X / n over the real tokens of a Linear's input
(Frantar et al. 2022), kept as a plain sum and count so that merging the shares of several
batches, processes or GPUs is an addition."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from streamq.calib.observers import masked_rows


@functools.cache
def _has_mixed_gemm() -> bool:
    """Whether this torch adds a bfloat16 GEMM into a float32 tensor on CUDA
    (`aten::addmm.dtype_out` with a float32 `self`: torch 2.10 and later; 2.8 and 2.9 have
    the operator but require `self` in the inputs' dtype). Decided by the torch build alone,
    so every process of a run decides alike (their Hessians must be the same bytes)."""
    from torch.torch_version import TorchVersion

    return TorchVersion(torch.__version__) >= (2, 10) and hasattr(torch.ops.aten.addmm, "dtype_out")


def add_gram(acc: torch.Tensor, rows: torch.Tensor) -> None:
    """acc += rows^T rows, in float32 (the Hessian's sum of outer products, Frantar et al. 2022).

    acc: float32 [in, in]; rows: [r, in], the activations in their own dtype. bfloat16 rows
    on CUDA go to the tensor cores as they are, with float32 output
    (`torch.addmm(..., out_dtype=torch.float32)`): each product of two bfloat16 values is
    exact, the tensor cores' sums are a little less exact than float32 GEMM's (8.3e-6 of
    the largest entry against 5.5e-7 over 8192 rows on an H200), which moves GPTQ's loss by
    less than 0.1% (tests/test_gptq_gpu.py). It is 6x faster (1.3e14 against 2.1e13
    multiply-adds/s, scripts/time_gptq_units.py): the float32 GEMM, which has no tensor-core
    path without TF32, was 80% of a Qwen3-235B-A22B layer's replay for the statistics.
    Elsewhere, or where torch lacks the mixed GEMM, the rows are upcast to float32.
    """
    assert acc.dtype == torch.float32 and acc.shape == (rows.shape[-1], rows.shape[-1]), (acc.dtype, acc.shape)
    if rows.is_cuda and rows.dtype == torch.bfloat16 and _has_mixed_gemm():
        torch.addmm(acc, rows.T, rows, out_dtype=torch.float32, out=acc)
        return
    rows = rows.to(torch.float32)
    acc.addmm_(rows.T, rows)


class HessianAccumulator:
    """sum X^T X and the token count of one Linear input; H = 2 * sum / n at the end.

    The observer protocol of `streamq.calib.observers` (`update(x, mask)`, `merge(other)`
    returning self, `result()`; constructible without arguments, sized by the first
    batch). Keeping the plain sum (not a running mean) makes `merge` across processes or
    batches an addition. Real tokens only: rows whose mask is False add nothing.
    Statistics stay on the device as float32 (count int64), so `update` never syncs.
    """

    exact_merge = False  # a float32 sum depends on its order

    def __init__(self, in_features: int | None = None, device: torch.device | str | None = None) -> None:
        self.sum: torch.Tensor | None = None  # float32 [in, in]
        self.count: torch.Tensor | None = None  # int64 []
        if in_features is not None:
            self._allocate(in_features, torch.device(device) if device is not None else torch.device("cpu"))

    def _allocate(self, in_features: int, device: torch.device) -> None:
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.count = torch.zeros((), dtype=torch.int64, device=device)

    def update(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """x: [..., in] any float dtype; mask: bool with x.shape[:-1] elements, or None."""
        if self.sum is None:
            self._allocate(x.shape[-1], x.device)
        assert x.shape[-1] == self.sum.shape[0], (tuple(x.shape), tuple(self.sum.shape))
        # where, not a product: a non-finite padding row must not leak in as NaN.
        rows = masked_rows(x, mask)
        self.count += rows.shape[0] if mask is None else mask.sum()
        add_gram(self.sum, rows)

    def merge(self, other: HessianAccumulator) -> HessianAccumulator:
        if other.sum is None:
            return self
        if self.sum is None:
            self._allocate(other.sum.shape[0], other.sum.device)
        assert other.sum.shape == self.sum.shape, (tuple(other.sum.shape), tuple(self.sum.shape))
        self.sum += other.sum.to(self.sum.device)
        self.count += other.count.to(self.count.device)
        return self

    def result(self) -> torch.Tensor | None:
        """H = 2 * sum / n, float32 [in, in]; all zero when only padding was seen, None
        when nothing was."""
        if self.sum is None:
            return None
        n = self.count.to(torch.float32).clamp(min=1.0)
        return self.sum * (2.0 / n)


@dataclass(frozen=True)
class Routing:
    """Routed rows grouped by expert (`route`): `tokens` int64 [R], the token of each real
    routed row, experts in order and tokens in order within an expert; `counts` int64 [E]
    on the device and `sizes` (the same on the host) the rows of each expert."""

    tokens: torch.Tensor
    counts: torch.Tensor
    sizes: list[int]


def route(expert_ids: torch.Tensor, mask: torch.Tensor | None, num_experts: int) -> Routing:
    """Group the routed rows of one batch by expert.

    expert_ids: int [tokens, k] (top-k routing: a token's row goes to k experts; an id of
    num_experts or more is "no expert"); mask: bool [tokens] (real tokens) or None. One host
    synchronization (the sizes, which slice the rows), none before it: the counts are a
    scatter-add, not `bincount` (which synchronizes on CUDA to size its output).
    """
    ids = expert_ids.reshape(expert_ids.shape[0], -1).to(torch.int64).clamp(max=num_experts)
    tokens, k = ids.shape
    if mask is not None:
        assert mask.numel() == tokens, (mask.numel(), tokens)
        ids = torch.where(mask.reshape(-1, 1), ids, torch.full_like(ids, num_experts))  # bucket E = dropped
    ids = ids.reshape(-1)
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=ids.device).index_add_(0, ids, torch.ones_like(ids))
    order = torch.argsort(ids, stable=True)
    sizes = counts.tolist()[:num_experts]
    return Routing(order[: sum(sizes)] // k, counts[:num_experts], sizes)


class ExpertHessianAccumulator:
    """One HessianAccumulator per expert, fed by routed rows.

    `add_grouped(rows, routing)`: rows [R, in] grouped by expert as `route` orders them;
    each expert adds X_e^T X_e with one addmm over exactly its rows (a slice, no copy): the
    work is the routed rows', however unbalanced the routing (a zero-padded [E, longest,
    in] block would cost E times the busiest expert's rows). `update(x, expert_ids, mask)`
    routes and gathers the rows itself.

    `owned` (several processes splitting a layer's experts): only these experts accumulate,
    and only their sums are allocated ([len(owned), in, in], in expert order: `held`); the
    others cost no arithmetic and no memory, but their token counts are still kept.
    """

    def __init__(self, num_experts: int, in_features: int, device: torch.device | str | None = None,
                 owned: set[int] | None = None) -> None:
        self.num_experts = num_experts
        self.in_features = in_features
        self.owned = owned
        self.held = list(range(num_experts)) if owned is None else sorted(owned)
        self.slot = {e: i for i, e in enumerate(self.held)}
        self.sum = torch.zeros(len(self.held), in_features, in_features, dtype=torch.float32, device=device)
        self.count = torch.zeros(num_experts, dtype=torch.int64, device=device)

    def update(self, x: torch.Tensor, expert_ids: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """x: [..., in]; expert_ids: int [rows] or [rows, k] (rows = x's token count);
        mask: bool [rows] (real tokens), or None. One host sync (the per-expert counts)."""
        rows = x.reshape(-1, self.in_features)
        routing = route(expert_ids.reshape(rows.shape[0], -1), mask, self.num_experts)
        self.add_grouped(rows[routing.tokens], routing)

    def add_grouped(self, rows: torch.Tensor, routing: Routing) -> None:
        """rows: [R, in], the routed rows grouped by expert as `routing` (`route`) orders
        them. Every expert's count grows; only this accumulator's experts add their rows."""
        assert rows.shape == (sum(routing.sizes), self.in_features), (tuple(rows.shape), self.in_features)
        self.count += routing.counts
        start = 0
        for expert, size in enumerate(routing.sizes):
            if size and expert in self.slot:
                add_gram(self.sum[self.slot[expert]], rows[start:start + size])
            start += size

    def count_routed(self, routing: Routing) -> None:
        """Only the token counts of `routing` (a process that holds none of these Hessians)."""
        self.count += routing.counts

    def owns(self, expert: int) -> bool:
        return expert in self.slot

    def count_only(self, expert: int, tokens: int) -> None:
        """Another process's expert: `tokens` more reached it (counts are kept for all)."""
        self.count[expert] += tokens

    def update_expert(self, expert: int, x: torch.Tensor) -> None:
        """Every row of x [..., in] (real tokens only) goes to one expert: a plain addmm, not
        the zero-padded block over all experts `update` builds."""
        rows = x.reshape(-1, self.in_features)
        self.count[expert] += rows.shape[0]
        if self.owns(expert):
            add_gram(self.sum[self.slot[expert]], rows)

    def merge(self, other: ExpertHessianAccumulator) -> ExpertHessianAccumulator:
        assert (other.num_experts, other.in_features, other.held) == (self.num_experts, self.in_features, self.held)
        self.sum += other.sum.to(self.sum.device)
        self.count += other.count.to(self.count.device)
        return self

    def result(self) -> torch.Tensor:
        """H_e = 2 * sum_e / n_e, float32 [len(held), in, in] (every expert: [E, in, in]);
        zero for an expert no token reached."""
        n = self.count[self.held].to(torch.float32).clamp(min=1.0)
        return self.sum * (2.0 / n)[:, None, None]
