"""Per-expert activation statistics for fused MoE experts (transformers v5 layout).

transformers holds all experts of a layer in one module with 3D weights, so Linear
hooks cannot see expert inputs. During calibration the experts' forward is wrapped, on
that instance only: the model's own forward computes the output (routing and results
unchanged), and per expert the input absmax of its gate/up and of its down projection is
recorded from the same routing.

The down projection's input is the gated intermediate, act(gate) * up or the family's own
`_apply_gate` (some clamp). The grouped and batched implementations of transformers make
it in one call, `_apply_gate`, over all routed rows in an order known from the routing
alone; streamq takes its row absmax there, for free. Other implementations (the eager
loop) get a statistics pass that recomputes the intermediate with the same `_apply_gate`.
A replay whose outputs are dropped (GPTQ's statistics) computes only the intermediate.
"""

from __future__ import annotations

import types

import torch
from torch import nn
from torch.nn import functional as F

from streamq.calib.hessian import Routing, route
from streamq.calib.observers import LayerObserver
from streamq.errors import CheckpointError


def check_supported(module: nn.Module, name: str) -> None:
    if getattr(module, "is_transposed", False) or getattr(module, "has_bias", False) \
            or not getattr(module, "has_gate", True) or not getattr(module, "is_concatenated", True):
        raise CheckpointError(f"experts module '{name}' ({type(module).__name__}) uses a layout streamq cannot "
                              "calibrate yet (transposed, biased, ungated or interleaved experts)")


# Experts implementations whose `_apply_gate` sees every routed row at once, and how the
# rows are ordered: "sorted" by expert (torch.sort of the flat routing, as transformers
# does), or "flat" (token-major, top_k rows per token).
_GATE_ROW_ORDER = {"grouped_mm": "sorted", "batched_mm": "flat"}


def _implementation(module: nn.Module) -> str | None:
    impl = getattr(getattr(module, "config", None), "_experts_implementation", None)
    return impl if isinstance(impl, str) else None


def observed_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                             top_k_weights: torch.Tensor) -> torch.Tensor:
    """The model's own experts forward (whatever implementation its config selects), with
    the statistics of the same routing recorded alongside."""
    obs: LayerObserver = self._streamq_observer
    if obs.expert_kind == "hessian":
        # The Hessians always come from the routed rows and their recomputed intermediates
        # (`_observe_hessians`), whether the outputs are used or not, so that every replay
        # (one process's, or split across processes from captured inputs:
        # `observe_expert_hessians`) adds the same rows in the same order. A replay for the
        # statistics alone (GPTQ propagates through the quantized layer afterwards) skips
        # the down projections and the weighted sum.
        out = (type(self).forward(self, hidden_states, top_k_index, top_k_weights) if self._streamq_outputs_used
               else torch.zeros_like(hidden_states))
        _observe_hessians(self, hidden_states, top_k_index, obs, self._streamq_name, self._streamq_all_experts)
        return out
    order = _GATE_ROW_ORDER.get(_implementation(self)) if hasattr(type(self), "_apply_gate") else None
    captured: list[torch.Tensor] = []
    if order is not None:
        apply_gate = type(self)._apply_gate

        def capturing_apply_gate(gate_up_out: torch.Tensor) -> torch.Tensor:
            inter = apply_gate(self, gate_up_out)
            captured.append(inter.abs().amax(dim=-1).to(torch.float32))  # a range needs only the absmax
            return inter

        self._apply_gate = capturing_apply_gate
    try:
        out = type(self).forward(self, hidden_states, top_k_index, top_k_weights)
    finally:
        self.__dict__.pop("_apply_gate", None)
    if len(captured) == 1 and captured[0].shape[0] == top_k_index.numel():
        _observe_captured(self, hidden_states, top_k_index, captured[0], order, obs, self._streamq_name)
    else:  # an implementation that computes the intermediate elsewhere: recompute it
        _observe_routed(self, hidden_states, top_k_index, obs, self._streamq_name)
    if self._streamq_all_experts:
        _observe_all_experts(self, hidden_states, obs, self._streamq_name, obs.row_absmax(hidden_states))
    return out


def _gated(self: nn.Module, gate_up_out: torch.Tensor) -> torch.Tensor:
    """The down projection's input from gate/up outputs [rows, 2 I], as the model computes
    it: the class's `_apply_gate` (transformers v5 gives every experts class one, and some
    families clamp gate and up in theirs), else act(gate) * up."""
    apply_gate = getattr(type(self), "_apply_gate", None)
    if apply_gate is not None:
        return apply_gate(self, gate_up_out)
    gate, up = gate_up_out.chunk(2, dim=-1)
    return self.act_fn(gate) * up


def _grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor | None:
    """x rows grouped by expert @ weight[e].T with one grouped GEMM, where torch has one (CUDA)."""
    fn = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
    if fn is None or x.device.type != "cuda" or x.dtype != torch.bfloat16:
        return None
    try:
        return fn(x, weight.transpose(-2, -1), offs=torch.cumsum(counts, 0, dtype=torch.int32))
    except (RuntimeError, NotImplementedError):  # older GPUs / torch builds: per-expert loop instead
        return None


def _observe_gate_up(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                     obs: LayerObserver, key: str) -> torch.Tensor:
    """Per expert: absmax of the real tokens routed to it. Returns the per-token absmax."""
    num_experts, top_k = self.gate_up_proj.shape[0], top_k_index.shape[1]
    token_absmax = obs.row_absmax(hidden_states)  # [N], 0 on padding
    ids = top_k_index.reshape(-1).clamp(max=num_experts)  # num_experts: "no expert" slot
    routed = torch.zeros(num_experts + 1, dtype=torch.float32, device=hidden_states.device)
    routed.scatter_reduce_(0, ids, token_absmax.repeat_interleave(top_k), "amax")
    obs.fold(f"{key}.gate_up", routed[:num_experts])
    return token_absmax


def _fold_down(obs: LayerObserver, key: str, num_experts: int, ids: torch.Tensor, row_absmax: torch.Tensor,
               row_real: torch.Tensor) -> None:
    """Per expert: absmax of the gated intermediate over its real rows."""
    row_absmax = torch.where(row_real, row_absmax, torch.zeros_like(row_absmax))
    down = torch.zeros(num_experts + 1, dtype=torch.float32, device=row_absmax.device)
    down.scatter_reduce_(0, ids.clamp(max=num_experts), row_absmax, "amax")
    obs.fold(f"{key}.down", down[:num_experts])


@torch.no_grad()
def _observe_captured(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                      inter_absmax: torch.Tensor, order: str, obs: LayerObserver, key: str) -> None:
    """Statistics from the intermediate's row absmax captured inside the forward."""
    num_experts, top_k = self.gate_up_proj.shape[0], top_k_index.shape[1]
    token_absmax = _observe_gate_up(self, hidden_states, top_k_index, obs, key)
    ids = top_k_index.reshape(-1)
    if order == "sorted":  # the same call as transformers' grouped forward, so the same permutation
        ids, perm = torch.sort(ids)
        rows = perm // top_k
    else:
        rows = torch.arange(ids.numel(), device=ids.device) // top_k
    _fold_down(obs, key, num_experts, ids, inter_absmax, token_absmax[rows] > 0)


def _routed_intermediate(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """act(gate) * up of every routed row, rows sorted by expert (stable): returns
    (intermediate [rows, I], expert id per row, token index per row)."""
    num_experts, top_k = self.gate_up_proj.shape[0], top_k_index.shape[1]
    ids = top_k_index.reshape(-1).clamp(max=num_experts)  # num_experts: "no expert" slot
    ids_sorted, perm = torch.sort(ids, stable=True)
    rows = perm // top_k
    counts = torch.bincount(ids_sorted, minlength=num_experts + 1)[:num_experts]
    x = hidden_states[rows]
    inter = _grouped_linear(x, self.gate_up_proj, counts)
    if inter is None:
        sizes = counts.tolist()
        chunks = torch.split(x[: sum(sizes)], sizes)
        inter = torch.cat([F.linear(c, self.gate_up_proj[e]) for e, c in enumerate(chunks) if c.shape[0]])
    used = inter.shape[0]
    return _gated(self, inter), ids_sorted[:used], rows[:used]


@torch.no_grad()
def _observe_hessians(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                      obs: LayerObserver, key: str, all_experts: bool) -> None:
    """Per expert: the Hessian of its gate/up input (the tokens routed to it) and of its
    down input (its gated intermediate rows), real tokens only. With all-experts
    calibration every expert sees every token: one gate/up Hessian serves them all, and
    each expert's down Hessian comes from its intermediate on every token."""
    num_experts = self.gate_up_proj.shape[0]
    mask = obs.flat_mask(hidden_states.shape[0])
    if all_experts:
        obs.shared_hessian(f"{key}.gate_up").update(hidden_states, mask)
        x = hidden_states if mask is None else hidden_states[mask]
        acc = obs.expert_hessian(f"{key}.down", num_experts, self.down_proj.shape[-1], x.device)
        for e in range(num_experts):
            if not acc.owns(e):  # another process's expert: only its token count
                acc.count_only(e, x.shape[0])
                continue
            acc.update_expert(e, _gated(self, F.linear(x, self.gate_up_proj[e])))
        return
    # One routing for both Hessians, and its one host synchronization before any of their
    # GEMMs is queued: the rows of each expert are slices of one gather, and the gated
    # intermediates come from one grouped GEMM over the same rows (real tokens only).
    # A process that owns none of the experts' down projections (several processes splitting
    # the work units) skips their GEMM, one that owns no Hessian here the gather too; every
    # expert's token count is kept all the same.
    routing = route(top_k_index, mask, num_experts)
    device = hidden_states.device
    gate_up = obs.expert_hessian(f"{key}.gate_up", num_experts, hidden_states.shape[-1], device)
    owns_down = obs.owned_experts.get(f"{key}.down") != set()  # absent: every expert's
    rows = hidden_states.reshape(-1, hidden_states.shape[-1])[routing.tokens] if gate_up.slot or owns_down else None
    if rows is None:
        gate_up.count_routed(routing)
    else:
        gate_up.add_grouped(rows, routing)
    if owns_down:
        inter = _gated(self, _expert_gate_up(self, rows, routing))
        obs.expert_hessian(f"{key}.down", num_experts, inter.shape[-1], device).add_grouped(inter, routing)
    else:  # the width only names the (empty) sums' shape
        obs.expert_hessian(f"{key}.down", num_experts, self.gate_up_proj.shape[-2] // 2, device).count_routed(routing)


def _expert_gate_up(self: nn.Module, rows: torch.Tensor, routing: Routing) -> torch.Tensor:
    """rows [R, H] grouped by expert (`route`) @ each expert's gate_up weight: [R, 2 I]."""
    if rows.shape[0] == 0:
        return rows.new_zeros((0, self.gate_up_proj.shape[-2]))
    out = _grouped_linear(rows, self.gate_up_proj, routing.counts)
    if out is None:
        out = torch.cat([F.linear(c, self.gate_up_proj[e])
                         for e, c in enumerate(torch.split(rows, routing.sizes)) if c.shape[0]])
    return out


@torch.no_grad()
def _observe_routed(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    obs: LayerObserver, key: str) -> None:
    """Per expert: absmax of the real tokens routed to it (gate/up input) and of its
    intermediate activation act(gate) * up (down input). Rows are sorted by expert so the
    intermediates come from one grouped GEMM on CUDA instead of a loop of small ones."""
    token_absmax = _observe_gate_up(self, hidden_states, top_k_index, obs, key)
    inter, ids, rows = _routed_intermediate(self, hidden_states, top_k_index)
    inter_absmax = inter.abs().amax(dim=-1).to(torch.float32)
    # padding rows (and all-zero tokens) add nothing
    _fold_down(obs, key, self.gate_up_proj.shape[0], ids, inter_absmax, token_absmax[rows] > 0)


@torch.no_grad()
def _observe_all_experts(self: nn.Module, hidden_states: torch.Tensor, obs: LayerObserver, key: str,
                         token_absmax: torch.Tensor) -> None:
    """Statistics as if every real token visited every expert; outputs are not touched."""
    num_experts = self.gate_up_proj.shape[0]
    obs.fold(f"{key}.gate_up", token_absmax.amax().expand(num_experts))
    mask = obs.flat_mask(hidden_states.shape[0])
    x = hidden_states if mask is None else hidden_states[mask]
    down = torch.stack([_gated(self, F.linear(x, self.gate_up_proj[e])).abs().amax().to(torch.float32)
                        if x.numel() else torch.zeros((), device=x.device) for e in range(num_experts)])
    obs.fold(f"{key}.down", down)


def instrument_experts(module: nn.Module, name: str, observer: LayerObserver, all_experts: bool,
                       outputs_used: bool = True) -> None:
    """Record the experts' statistics into `observer` on every forward of `module`.
    `outputs_used=False` (a replay whose layer outputs are dropped): with Hessian statistics
    the forward computes only what they need and returns zeros of the input's shape."""
    check_supported(module, name)
    module._streamq_observer = observer
    module._streamq_name = name
    module._streamq_all_experts = all_experts
    module._streamq_outputs_used = outputs_used
    module.forward = types.MethodType(observed_experts_forward, module)


def capture_experts(module: nn.Module, name: str, sink: list, outputs_used: bool = True) -> None:
    """Every forward of `module` appends its inputs (hidden_states [N, H], the version of
    hidden_states at the call, top_k_index [N, k]) to `sink`, for expert statistics taken
    elsewhere from them
    (`observe_expert_hessians`, on the process that owns them). `outputs_used=False` (the
    layer's outputs are dropped): the experts compute nothing and return zeros of the
    input's shape. Undone by `restore_experts`."""
    check_supported(module, name)

    def forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        sink.append((hidden_states.detach(), hidden_states._version, top_k_index.detach()))
        if outputs_used:
            return type(self).forward(self, hidden_states, top_k_index, top_k_weights)
        return torch.zeros_like(hidden_states)

    module.forward = types.MethodType(forward, module)


def observe_expert_hessians(module: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                            observer: LayerObserver, name: str, all_experts: bool) -> None:
    """The experts' Hessians from one forward's inputs (as `capture_experts` records them),
    into `observer`: the same computation, in the same order, as a statistics-only replay
    of `instrument_experts(..., outputs_used=False)`, so the sums are the same bytes."""
    _observe_hessians(module, hidden_states, top_k_index, observer, name, all_experts)


def restore_experts(module: nn.Module) -> None:
    for attr in ("forward", "_streamq_observer", "_streamq_name", "_streamq_all_experts", "_streamq_outputs_used"):
        module.__dict__.pop(attr, None)
