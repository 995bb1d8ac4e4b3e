"""Smoothing groups of a decoder layer: a source whose output channels feed the inputs of
one or more Linears, so scaling the source's channels down by s and the Linears' input
columns up by s leaves the layer's function unchanged (SmoothQuant, AWQ).

Found from module names inside the layer (transformers' names for Llama-family layers):
`input_layernorm` -> `self_attn.{q,k,v}_proj`, and on dense MLPs `post_attention_layernorm`
-> `mlp.{gate,up}_proj`. A group is used only when every member is quantized.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from streamq.model.layout import LayerLayout

# (source module, parent of the targets, target leaves)
_TABLE = (("input_layernorm", "self_attn", ("q_proj", "k_proj", "v_proj")),
          ("post_attention_layernorm", "mlp", ("gate_proj", "up_proj")))


@dataclass(frozen=True)
class SmoothingGroup:
    source: str  # relative module name of the norm
    targets: tuple[str, ...]  # relative names of the Linears it feeds

    @property
    def observed(self) -> str:
        """The Linear whose input the statistics are taken on (all targets share it)."""
        return self.targets[0]


def smoothing_groups(layer: nn.Module, layout: LayerLayout) -> list[SmoothingGroup]:
    modules = dict(layer.named_modules())
    groups = []
    for source, parent, leaves in _TABLE:
        targets = tuple(f"{parent}.{leaf}" for leaf in leaves)
        if source not in modules or not all(isinstance(modules.get(t), nn.Linear) for t in targets):
            continue
        if getattr(modules[source], "weight", None) is None:
            continue
        if all(layout.prefix + t in layout.quantized for t in targets):
            groups.append(SmoothingGroup(source, targets))
    return groups


def smooth_layer(ctx, stats, alpha: float) -> dict[str, torch.Tensor]:
    """SmoothQuant every group of the layer in `ctx` from per-channel input maxima in
    `stats` (full module name -> float32 [in]). Updates `ctx.weights` (float32) and returns
    the rescaled norm weights by tensor name, in their source dtype."""
    from streamq.quant.smooth import apply_smoothing, group_weight_absmax, smoothquant_scales

    changed = {}
    prefix = ctx.layout.prefix
    for group in smoothing_groups(ctx.layer, ctx.layout):
        act = stats.values[prefix + group.observed]
        members = [prefix + t for t in group.targets]
        w_absmax = group_weight_absmax([ctx.weights[m] for m in members])
        s = smoothquant_scales(act.to(w_absmax.device), w_absmax, alpha)
        norm_name = f"{prefix}{group.source}.weight"
        norm = ctx.tensors[norm_name]
        new_norm, _, new_weights = apply_smoothing(norm.to(s.device), [ctx.weights[m] for m in members], s)
        changed[norm_name] = new_norm.to(norm.dtype)
        for m, w in zip(members, new_weights, strict=True):
            ctx.weights[m] = w
    return changed
