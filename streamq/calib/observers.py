"""Statistics of the inputs of a layer's Linears over real (non-padding) tokens.

An observer has `update(x, mask)`, `merge(other)` (the reduction a second process or GPU
uses to combine its share: max for ranges) and `result()`. Values stay on the device as
float32 tensors and are folded with `maximum`, so observing costs no host
synchronization per batch.

`LayerObserver` hooks the Linears of one layer (one observer per module, by relative
name) and is what the MoE experts wrapper (`streamq.model.moe`) folds per-expert
statistics into, from the model's own routing.
"""

from __future__ import annotations

import torch
from torch import nn


def masked_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """x as [tokens, features] with padding rows zeroed (zero never raises an absmax)."""
    rows = x.reshape(-1, x.shape[-1])
    if mask is None:
        return rows
    assert mask.numel() == rows.shape[0], (mask.numel(), rows.shape[0])
    return torch.where(mask.reshape(-1, 1), rows, torch.zeros((), dtype=rows.dtype, device=rows.device))


class AbsMax:
    """Largest |x| over real tokens: float32 []."""

    # A max is the same in any order: shares of several processes merge to the bytes one
    # process computes. A floating-point sum does not (streamq.engine.dist).
    exact_merge = True

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None

    def update(self, x: torch.Tensor, mask: torch.Tensor | None) -> None:
        # Row absmax first, then the mask: the same reduction order as the per-token path.
        rows = x.reshape(-1, x.shape[-1]).abs().amax(dim=-1).to(torch.float32)
        if mask is not None:
            rows = torch.where(mask.reshape(-1), rows, torch.zeros_like(rows))
        self._fold(rows.amax())

    def _fold(self, value: torch.Tensor) -> None:
        self.value = value if self.value is None else torch.maximum(self.value, value)

    def merge(self, other: AbsMax) -> AbsMax:
        if other.value is not None:
            self._fold(other.value.to(self.value.device) if self.value is not None else other.value)
        return self

    def result(self) -> torch.Tensor | None:
        return self.value


class ChannelAbsMax(AbsMax):
    """Largest |x| of every input channel over real tokens: float32 [in] (SmoothQuant)."""

    def update(self, x: torch.Tensor, mask: torch.Tensor | None) -> None:
        self._fold(masked_rows(x, mask).abs().amax(dim=0).to(torch.float32))


class ChannelAbsMean:
    """Mean |x| of every input channel over real tokens: float32 [in] (AWQ's x_mean).

    Keeps the float32 sum of |x| and the token count; `merge` adds both (a second process's
    share), `result` divides once, so the mean of several shares equals the mean of all.
    """

    exact_merge = False

    def __init__(self) -> None:
        self.sum: torch.Tensor | None = None
        self.count: torch.Tensor | None = None

    def update(self, x: torch.Tensor, mask: torch.Tensor | None) -> None:
        rows = masked_rows(x, mask).abs().to(torch.float32).sum(dim=0)
        n = torch.tensor(x.reshape(-1, x.shape[-1]).shape[0], device=x.device) if mask is None \
            else mask.reshape(-1).sum()
        self._add(rows, n.to(torch.int64))

    def _add(self, total: torch.Tensor, n: torch.Tensor) -> None:
        if self.sum is None:
            self.sum, self.count = total, n
        else:
            self.sum, self.count = self.sum + total.to(self.sum.device), self.count + n.to(self.count.device)

    def merge(self, other: ChannelAbsMean) -> ChannelAbsMean:
        if other.sum is not None:
            self._add(other.sum, other.count)
        return self

    def result(self) -> torch.Tensor | None:
        if self.sum is None:
            return None
        return self.sum / self.count.clamp(min=1).to(torch.float32)


def _hessian() -> AbsMax:
    from streamq.calib.hessian import HessianAccumulator

    return HessianAccumulator()  # the same update / merge / result protocol


def merges_exactly(kind: str) -> bool:
    """Whether shares of observer `kind` merge to exactly one observer's result, in any order."""
    if kind == "hessian":
        from streamq.calib.hessian import HessianAccumulator

        return HessianAccumulator.exact_merge
    return OBSERVERS[kind].exact_merge


OBSERVERS = {"absmax": AbsMax, "channel_absmax": ChannelAbsMax, "channel_absmean": ChannelAbsMean,
             "hessian": _hessian}


class LayerObserver:
    """Observers per module of one layer; `token_mask` marks real tokens of the batch."""

    def __init__(self) -> None:
        self.observers: dict[str, AbsMax] = {}  # relative module name -> observer
        self.absmax: dict[str, torch.Tensor] = {}  # fused experts: "<parent>.gate_up|down" -> float32 [E]
        # What the fused-experts wrapper records per expert: "absmax" ranges, or "hessian"
        # accumulators (`expert_hessians`, "<parent>.gate_up|down" -> accumulator).
        self.expert_kind = "absmax"
        self.expert_hessians: dict[str, object] = {}
        # Several processes splitting the experts: "<parent>.gate_up|down" -> the experts
        # whose Hessians this process accumulates (absent: all).
        self.owned_experts: dict[str, set[int]] = {}
        self.token_mask: torch.Tensor | None = None  # bool [B, T]
        self._handles: list = []

    def flat_mask(self, rows: int) -> torch.Tensor | None:
        if self.token_mask is None:
            return None
        mask = self.token_mask.reshape(-1)
        assert mask.numel() == rows, (mask.numel(), rows)
        return mask

    def fold(self, key: str, value: torch.Tensor) -> None:
        value = value.to(torch.float32)
        old = self.absmax.get(key)
        self.absmax[key] = value if old is None else torch.maximum(old, value)

    def row_absmax(self, x: torch.Tensor) -> torch.Tensor:
        """Absmax of each token (row) in float32, zero for padding tokens."""
        rows = x.reshape(-1, x.shape[-1]).abs().amax(dim=-1).to(torch.float32)
        mask = self.flat_mask(rows.numel())
        return rows if mask is None else torch.where(mask, rows, torch.zeros_like(rows))

    def watch_linears(self, layer: nn.Module, kinds: dict[str, str] | list[str], hooked: bool = True) -> None:
        """Hook the inputs of these Linear modules (names relative to `layer`) with an
        observer of the given kind each ("absmax" for a plain list). `hooked=False`: the
        observers only, fed by the caller (`observers[name].update(x, token_mask)`)."""
        if isinstance(kinds, list):
            kinds = dict.fromkeys(kinds, "absmax")
        for name, kind in kinds.items():
            module = layer.get_submodule(name)
            self.observers[name] = OBSERVERS[kind]()
            if not hooked:
                continue

            def hook(_mod: nn.Module, args: tuple, _name: str = name) -> None:
                self.observers[_name].update(args[0], self.token_mask)

            self._handles.append(module.register_forward_pre_hook(hook))

    def expert_hessian(self, key: str, num_experts: int, in_features: int, device: torch.device):
        """The per-expert Hessian accumulator for `key`, created on first use."""
        from streamq.calib.hessian import ExpertHessianAccumulator

        if key not in self.expert_hessians:
            self.expert_hessians[key] = ExpertHessianAccumulator(num_experts, in_features, device,
                                                                 self.owned_experts.get(key))
        return self.expert_hessians[key]

    def shared_hessian(self, key: str):
        """One Hessian for all experts of `key` (all-experts calibration), created on first use."""
        from streamq.calib.hessian import HessianAccumulator

        if key not in self.expert_hessians:
            self.expert_hessians[key] = HessianAccumulator()
        return self.expert_hessians[key]

    def result(self, name: str) -> torch.Tensor | None:
        obs = self.observers.get(name)
        return None if obs is None else obs.result()

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
