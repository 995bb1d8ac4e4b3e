"""Per-expert activation statistics for fused MoE experts (transformers v5 layout).

transformers holds all experts of a layer in one module with 3D weights, so Linear
hooks cannot see expert inputs. During calibration the experts' forward is replaced,
on that instance only, by `observed_experts_forward`: the same computation as
transformers' eager experts loop, op for op (a test compares it with the original),
which also records the input absmax of each expert's gate/up and down projections.
"""

from __future__ import annotations

import types

import torch
from torch import nn
from torch.nn import functional as F

from streamq.calib.observers import LayerObserver
from streamq.errors import CheckpointError


def check_supported(module: nn.Module, name: str) -> None:
    if getattr(module, "is_transposed", False) or getattr(module, "has_bias", False) \
            or not getattr(module, "has_gate", True) or not getattr(module, "is_concatenated", True):
        raise CheckpointError(f"experts module '{name}' ({type(module).__name__}) uses a layout streamq cannot "
                              "calibrate yet (transposed, biased, ungated or interleaved experts)")


def observed_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                             top_k_weights: torch.Tensor) -> torch.Tensor:
    obs: LayerObserver = self._streamq_observer
    key: str = self._streamq_name
    num_experts = self.gate_up_proj.shape[0]
    token_absmax = obs.row_absmax(hidden_states)  # [N], 0 on padding

    # gate_up input: the max over tokens routed to each expert, in one scatter.
    routed = torch.zeros(num_experts + 1, dtype=torch.float32, device=hidden_states.device)
    routed.scatter_reduce_(0, top_k_index.reshape(-1), token_absmax.repeat_interleave(top_k_index.shape[1]), "amax")
    obs.fold(f"{key}.gate_up", routed[:num_experts])
    down = torch.zeros(num_experts, dtype=torch.float32, device=hidden_states.device)

    final_hidden_states = torch.zeros_like(hidden_states)
    with torch.no_grad():
        expert_mask = F.one_hot(top_k_index, num_classes=num_experts + 1).permute(2, 1, 0)
        expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
    for expert_idx in expert_hit:
        expert_idx = expert_idx[0]
        if expert_idx == num_experts:
            continue
        top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
        current_state = hidden_states[token_idx]
        gate, up = F.linear(current_state, self.gate_up_proj[expert_idx]).chunk(2, dim=-1)
        current_hidden_states = self.act_fn(gate) * up
        inter_absmax = current_hidden_states.abs().amax(dim=-1).to(torch.float32)
        mask = obs.flat_mask(hidden_states.shape[0])
        if mask is not None:
            inter_absmax = torch.where(mask[token_idx], inter_absmax, torch.zeros_like(inter_absmax))
        down[expert_idx] = torch.maximum(down[expert_idx], inter_absmax.amax())
        current_hidden_states = F.linear(current_hidden_states, self.down_proj[expert_idx])
        current_hidden_states = current_hidden_states * top_k_weights[token_idx, top_k_pos, None]
        final_hidden_states.index_add_(0, token_idx, current_hidden_states.to(final_hidden_states.dtype))
    obs.fold(f"{key}.down", down)

    if self._streamq_all_experts:
        _observe_all_experts(self, hidden_states, obs, key, token_absmax)
    return final_hidden_states


@torch.no_grad()
def _observe_all_experts(self: nn.Module, hidden_states: torch.Tensor, obs: LayerObserver, key: str,
                         token_absmax: torch.Tensor) -> None:
    """Statistics as if every real token visited every expert; outputs are not touched."""
    num_experts = self.gate_up_proj.shape[0]
    obs.fold(f"{key}.gate_up", token_absmax.amax().expand(num_experts))
    mask = obs.flat_mask(hidden_states.shape[0])
    x = hidden_states if mask is None else hidden_states[mask]
    down = torch.stack([(self.act_fn(g) * u).abs().amax().to(torch.float32) if x.numel() else
                        torch.zeros((), device=x.device)
                        for g, u in (F.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)
                                     for e in range(num_experts))])
    obs.fold(f"{key}.down", down)


def instrument_experts(module: nn.Module, name: str, observer: LayerObserver, all_experts: bool) -> None:
    check_supported(module, name)
    module._streamq_observer = observer
    module._streamq_name = name
    module._streamq_all_experts = all_experts
    module.forward = types.MethodType(observed_experts_forward, module)


def restore_experts(module: nn.Module) -> None:
    for attr in ("forward", "_streamq_observer", "_streamq_name", "_streamq_all_experts"):
        module.__dict__.pop(attr, None)
