"""Test-only whole-model reference for int4_gptq: the full model in memory, layer by layer.

For each decoder layer i: hooks accumulate a Hessian on the input of every one of its
Linears (each Linear its own accumulator: q/k/v, or gate/up, see the same input, so the
engine's one shared Hessian must equal each of ours bit for bit), and per expert from the
model's own routing; the *full model* runs forward on every calibration batch; then the
scheme solves the layer, the format packs it, and (propagate: quantized) the dequantized
weights are written back into the model, so the next layer's Hessians see the quantized
outputs of layers 0..i exactly as a served checkpoint would compute them.

It shares only primitives with the engine (Hessian accumulators, the experts
instrumentation that transformers' fused MoE requires, the scheme's solve, the format's
pack); the layer loop, the hidden-state cache, the kwargs capture, the per-layer
materialization and the engine's writing of dequantized weights are what it does *not* use.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from streamq.calib.observers import LayerObserver
from streamq.checkpoint.reader import CheckpointReader
from streamq.formats.base import get_format
from streamq.model.ignore import IgnoreMatcher
from streamq.model.layout import fused_expert_modules, plan_layer
from streamq.model.moe import instrument_experts, restore_experts
from streamq.model.names import NameMap
from streamq.schemes.base import LayerStats, Scheme


def _write_back(layer: torch.nn.Module, layout, module: str, value: torch.Tensor) -> None:
    """Put a dequantized [out, in] weight where the model computes with it (fused experts:
    gate rows then up rows of gate_up_proj[e], or down_proj[e])."""
    ref = layout.experts.get(module)
    if ref is None:
        layer.get_submodule(layout.rel(module)).weight.data.copy_(value)
        return
    experts = layer.get_submodule(ref.parent)
    if ref.proj == "down_proj":
        experts.down_proj.data[ref.index].copy_(value)
    else:
        inter = experts.gate_up_proj.shape[1] // 2
        start = 0 if ref.proj == "gate_proj" else inter
        experts.gate_up_proj.data[ref.index, start:start + inter].copy_(value)


@torch.no_grad()
def reference_gptq(model_path: Path, batches: list, scheme: Scheme, fmt: str, ignore: tuple[str, ...],
                   all_experts: bool = False, model: torch.nn.Module | None = None
                   ) -> dict[str, torch.Tensor]:
    """Every tensor the int4_gptq checkpoint should contain, by name. `model` (loaded in
    bf16 with sdpa, as the engine's skeleton) may be passed in; it is modified."""
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.bfloat16,
                                                     attn_implementation="sdpa").eval()
    reader = CheckpointReader(model_path)
    layers = model.model.layers
    matcher = IgnoreMatcher(ignore)
    source = reader.read(list(reader.tensors))
    expected: dict[str, torch.Tensor] = {}
    propagate = scheme.propagates_quantized
    for i, layer in enumerate(layers):
        layout = plan_layer(layer, i, "model.layers", reader.layers[i], matcher, NameMap(model))
        obs = LayerObserver()
        obs.expert_kind = "hessian"
        plain = [m for m in layout.quantized if m not in layout.experts]
        obs.watch_linears(layer, {layout.rel(m): "hessian" for m in plain})
        fused = fused_expert_modules(layer)
        for parent, module in fused.items():
            instrument_experts(module, parent, obs, all_experts)
        try:
            for batch in batches:
                obs.token_mask = batch.attention_mask.bool()
                model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        finally:
            obs.close()
            for module in fused.values():
                restore_experts(module)
        values = {m: obs.result(layout.rel(m)) for m in plain}
        for key, acc in obs.expert_hessians.items():
            values[layout.prefix + key] = acc.result()
            if acc.count.ndim == 1:
                values[f"{layout.prefix}{key}.count"] = acc.count
        weights = {m: source[n] for m, n in layout.quantized.items()}
        for module, q in scheme.quantize(weights, LayerStats(values), layout):
            expected.update(get_format(fmt).pack(module, q, scheme.spec))
            if propagate:
                _write_back(layer, layout, module, scheme.dequantize(q, torch.bfloat16))
        expected.update({n: source[n] for n in layout.copied})
    expected.update({n: source[n] for n in reader.other})
    return expected
