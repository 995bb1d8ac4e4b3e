"""One decoder layer with real weights: filled from the source tensors, then freed."""

from __future__ import annotations

import torch
from torch import nn

from streamq.errors import CheckpointError
from streamq.model.buffers import init_missing_buffers
from streamq.model.layout import LayerLayout, fused_expert_modules


@torch.no_grad()
def materialize_layer(layer: nn.Module, layout: LayerLayout, tensors: dict[str, torch.Tensor],
                      device: torch.device, model: nn.Module | None = None) -> None:
    """Allocate the layer on `device` and copy the checkpoint tensors in.

    Fused expert parameters are filled expert by expert ([gate; up] along dim 0, the
    layout transformers' own loader builds), so no second copy of the layer exists.
    """
    layer.to_empty(device=device)
    init_missing_buffers(model if model is not None else layer, layer, layout.prefix,
                         {layout.prefix + rel for rel in layout.sources} | set(tensors))
    fused = fused_expert_modules(layer)
    for name, param in layer.named_parameters():
        parent, _, attr = name.rpartition(".")
        source = _source(layout, name, tensors)
        if source is not None:
            if tuple(tensors[source].shape) != tuple(param.shape):
                raise CheckpointError(f"tensor '{source}' has shape {tuple(tensors[source].shape)}, the model "
                                      f"expects {tuple(param.shape)} for '{layout.prefix}{name}'")
            param.copy_(tensors[source], non_blocking=True)
        elif parent in fused and attr in ("gate_up_proj", "down_proj"):
            for e in range(param.shape[0]):
                if attr == "gate_up_proj":
                    gate = tensors[_expert_source(layout, parent, e, "gate_proj")]
                    up = tensors[_expert_source(layout, parent, e, "up_proj")]
                    param[e, :gate.shape[0]].copy_(gate, non_blocking=True)
                    param[e, gate.shape[0]:].copy_(up, non_blocking=True)
                else:
                    param[e].copy_(tensors[_expert_source(layout, parent, e, "down_proj")], non_blocking=True)
        else:
            raise CheckpointError(f"layer {layout.index}: parameter '{layout.prefix}{name}' is not in the checkpoint")
    for name, buf in layer.named_buffers():
        source = _source(layout, name, tensors)
        if source is not None:
            buf.copy_(tensors[source])


def _source(layout: LayerLayout, name: str, tensors: dict) -> str | None:
    """The disk tensor of a parameter in memory; a layout without a plan (eval reads layers
    back by their memory names) uses the name itself."""
    if name in layout.sources:
        return layout.sources[name]
    return layout.prefix + name if layout.prefix + name in tensors else None


def _expert_source(layout: LayerLayout, parent: str, e: int, role: str) -> str:
    return layout.expert_sources.get((parent, e, role), f"{layout.prefix}{parent}.{e}.{role}.weight")


def layer_weight_views(layer: nn.Module, layout: LayerLayout) -> dict[str, torch.Tensor]:
    """Module name -> the 2D weight inside the materialized layer (views into fused experts)."""
    out = {}
    for module in layout.quantized:
        ref = layout.experts.get(module)
        if ref is None:
            out[module] = layer.get_submodule(layout.rel(module)).weight
            continue
        experts = layer.get_submodule(ref.parent)
        if ref.proj == "down_proj":
            out[module] = experts.down_proj[ref.index]
        else:
            inter = experts.gate_up_proj.shape[1] // 2
            rows = slice(0, inter) if ref.proj == "gate_proj" else slice(inter, 2 * inter)
            out[module] = experts.gate_up_proj[ref.index, rows]
    return out


def release_layer(layer: nn.Module) -> None:
    layer.to("meta")
