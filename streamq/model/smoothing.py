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


# Sandwich-norm layers (Gemma 2/3): the MLP reads this norm's output, not post_attention_layernorm's,
# which normalizes the attention output before the residual add.
_MLP_INPUT_NORM = "pre_feedforward_layernorm"


@torch.no_grad()
def scales_by_weight(norm: nn.Module) -> bool:
    """True when the norm's output is proportional to its weight (y = f(x) * w, as RMSNorm
    and LayerNorm without bias compute), the only kind a smoothing scale can be folded into
    by dividing the weight. Gemma's norms compute f(x) * (1 + w): dividing w would change the
    layer. Probed on the module itself (doubling its weight must double its output)."""
    w = getattr(norm, "weight", None)
    if w is None or getattr(norm, "bias", None) is not None:
        return False
    if w.device.type == "meta":  # the planner's skeleton: probe a CPU copy with unit weights
        import copy

        norm = copy.deepcopy(norm).to_empty(device="cpu")
        norm.weight.data.fill_(1.0)
        w = norm.weight
    x = torch.randn(4, w.shape[-1], generator=torch.Generator().manual_seed(0)).to(w.device, w.dtype)
    saved = w.detach().clone()
    try:
        y1 = norm(x).float()
        w.mul_(2)
        y2 = norm(x).float()
    finally:
        w.copy_(saved)
    return bool(torch.allclose(y2, 2 * y1, rtol=1e-2, atol=1e-3))


def feeds(layer: nn.Module, source: str, parent: str) -> bool:
    """`source` is a norm whose output is `parent`'s input and whose weight scales it."""
    modules = dict(layer.named_modules())
    if source not in modules:
        return False
    if parent == "mlp" and _MLP_INPUT_NORM in modules:
        return False
    return scales_by_weight(modules[source])


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
        if not feeds(layer, source, parent):
            continue
        if all(layout.prefix + t in layout.quantized for t in targets):
            groups.append(SmoothingGroup(source, targets))
    return groups


def rescale_group(ctx, source: str, targets: list[str] | tuple[str, ...], s: torch.Tensor,
                  changed: dict[str, torch.Tensor], extras: tuple[str, ...] = ()) -> None:
    """Apply per-channel scales s [in] to one group of the layer in `ctx`: the source's
    output channels divided by s, the targets' input columns multiplied by s.

    source: relative module name; a quantized Linear (its full name in `ctx.weights`: its
      rows, e.g. v_proj, up_proj) or a norm (its `.weight`, and `.bias` if any, from the
      source tensors). A quantized source's bias, if the checkpoint has one, is divided too.
    targets: full module names of quantized Linears (`ctx.weights`, [out, in]).
    extras: relative names of unquantized Linears fed by the same channels (a router):
      their `.weight` is multiplied too and written.
    `ctx.weights` entries become float32 (float64 stays float64); rescaled unquantized
    tensors are added to `changed` by tensor name, in their source dtype.
    """
    from streamq.quant.smooth import apply_smoothing

    prefix = ctx.layout.prefix
    src_full = prefix + source
    quantized_source = src_full in ctx.weights
    src_w = ctx.weights[src_full] if quantized_source else ctx.tensors[f"{src_full}.weight"].to(s.device)
    bias_name = f"{src_full}.bias"
    bias = ctx.tensors.get(bias_name)
    extra_names = [f"{prefix}{e}.weight" for e in extras]
    linears = [ctx.weights[m] for m in targets] + [ctx.tensors[n].to(s.device) for n in extra_names]
    new_src, new_bias, new_w = apply_smoothing(src_w, linears, s, None if bias is None else bias.to(s.device))
    if quantized_source:
        ctx.weights[src_full] = new_src
    else:
        changed[f"{src_full}.weight"] = new_src.to(ctx.tensors[f"{src_full}.weight"].dtype)
    if bias is not None:
        changed[bias_name] = new_bias.to(bias.dtype)
    for m, w in zip(targets, new_w[: len(targets)], strict=True):
        ctx.weights[m] = w
    for n, w in zip(extra_names, new_w[len(targets):], strict=True):
        changed[n] = w.to(ctx.tensors[n].dtype)


def smooth_layer(ctx, stats, alpha: float) -> dict[str, torch.Tensor]:
    """SmoothQuant every group of the layer in `ctx` from per-channel input maxima in
    `stats` (full module name -> float32 [in]). Updates `ctx.weights` (float32) and returns
    the rescaled norm weights by tensor name, in their source dtype."""
    from streamq.quant.smooth import group_weight_absmax, smoothquant_scales

    changed: dict[str, torch.Tensor] = {}
    prefix = ctx.layout.prefix
    for group in smoothing_groups(ctx.layer, ctx.layout):
        act = stats.values[prefix + group.observed]
        members = [prefix + t for t in group.targets]
        w_absmax = group_weight_absmax([ctx.weights[m] for m in members])
        s = smoothquant_scales(act.to(w_absmax.device), w_absmax, alpha)
        rescale_group(ctx, group.source, members, s, changed)
    return changed


# ---------------------------------------------------------------------------------------------
# AWQ groups
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AwqGroup:
    """One AWQ scaling group of a decoder layer.

    source: relative name of the module whose output channels are divided by s (a norm, or
      a Linear whose rows are the channels: v_proj, up_proj).
    targets: full module names of the quantized Linears reading those channels.
    observed: relative module whose input is the group's input (x_mean statistic), or None
      when the statistic comes from the recorded block inputs (per-expert down_proj).
    parent: relative module re-run on its recorded inputs for the loss.
    extras: relative names of unquantized Linears fed by the same channels (the MoE router):
      scaled with the targets, never quantized.
    expert: (fused experts module, index) for a per-expert up_proj -> down_proj group.
    """

    source: str
    targets: tuple[str, ...]
    observed: str | None
    parent: str
    extras: tuple[str, ...] = ()
    expert: tuple[str, int] | None = None


def _is_linear(modules: dict, name: str) -> bool:
    return isinstance(modules.get(name), nn.Linear)


def awq_groups(layer: nn.Module, layout: LayerLayout, experts_down: bool = True) -> list[AwqGroup]:
    """The AWQ groups of one decoder layer, in layer order (the order they are searched and
    applied): input_layernorm -> q/k/v (parent self_attn); v_proj -> o_proj when v_proj's
    outputs are o_proj's inputs one to one (not under GQA; parent o_proj, as AutoAWQ);
    post_attention_layernorm -> gate/up (dense, parent mlp) or -> router + every expert's
    gate/up (MoE, parent: the whole MoE block; the router is scaled, not quantized);
    up_proj -> down_proj (dense, parent mlp; MoE: one group per expert, parent that
    expert's MLP, computed from the recorded experts inputs and routing).

    A group is used only when every target is quantized. In a MoE block with modules other than
    the router and the fused experts (shared experts) the post_attention_layernorm group is
    skipped (its other readers would change); the per-expert groups still apply.
    """
    from streamq.model.layout import fused_expert_modules

    modules = dict(layer.named_modules())
    p = layout.prefix

    def quantized(*rel: str) -> bool:
        return all(p + r in layout.quantized for r in rel)

    def has_weight(name: str) -> bool:
        return getattr(modules.get(name), "weight", None) is not None

    groups = []
    qkv = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    if feeds(layer, "input_layernorm", "self_attn") and all(_is_linear(modules, t) for t in qkv) \
            and quantized(*qkv):
        groups.append(AwqGroup("input_layernorm", tuple(p + t for t in qkv), qkv[0], "self_attn"))
    v, o = "self_attn.v_proj", "self_attn.o_proj"
    if _is_linear(modules, v) and _is_linear(modules, o) and quantized(v, o) \
            and modules[v].weight.shape[0] == modules[o].weight.shape[1]:
        groups.append(AwqGroup(v, (p + o,), o, o))
    dense = ("mlp.gate_proj", "mlp.up_proj")
    fused = fused_expert_modules(layer)
    if all(_is_linear(modules, t) for t in dense) and _is_linear(modules, "mlp.down_proj"):
        if feeds(layer, "post_attention_layernorm", "mlp") and quantized(*dense):
            groups.append(AwqGroup("post_attention_layernorm", tuple(p + t for t in dense), dense[0], "mlp"))
        if quantized("mlp.up_proj", "mlp.down_proj"):
            groups.append(AwqGroup("mlp.up_proj", (p + "mlp.down_proj",), "mlp.down_proj", "mlp"))
    elif "mlp.experts" in fused and has_weight("mlp.gate") and feeds(layer, "post_attention_layernorm", "mlp") \
            and set(dict(modules["mlp"].named_children())) == {"gate", "experts"}:
        refs = sorted((ref.index, ref.proj, m) for m, ref in layout.experts.items() if ref.parent == "mlp.experts")
        num = fused["mlp.experts"].gate_up_proj.shape[0]
        gate_up = tuple(m for _, proj, m in refs if proj in ("gate_proj", "up_proj"))
        if len(gate_up) == 2 * num:
            groups.append(AwqGroup("post_attention_layernorm", gate_up, "mlp.gate", "mlp", extras=("mlp.gate",)))
        by_expert = {(e, proj): m for e, proj, m in refs}
        for e in range(num) if experts_down else ():
            up, down = by_expert.get((e, "up_proj")), by_expert.get((e, "down_proj"))
            if up is not None and down is not None:
                groups.append(AwqGroup(layout.rel(up), (down,), None, "mlp.experts", expert=("mlp.experts", e)))
    return groups
