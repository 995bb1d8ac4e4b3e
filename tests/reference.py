"""Test-only whole-model reference for fp8_static: the full model in memory, hooks on
every quantized Linear, the same samples and batching. The streaming engine must
reproduce its scales and quantized weights byte for byte.

It shares only the primitives with the engine (observers, the experts instrumentation
that transformers' fused MoE requires, the FP8 functions); the layer loop, the
hidden-state cache, the kwargs capture and the per-layer materialization are exactly
what it does *not* use.
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
from streamq.model.moe import instrument_experts
from streamq.model.names import NameMap
from streamq.model.skeleton import attention_implementation, load_model_config
from streamq.schemes.base import LayerStats, Scheme


@torch.no_grad()
def reference_static(model_path: Path, batches: list, scheme: Scheme, fmt: str, ignore: tuple[str, ...],
                     all_experts: bool = False) -> dict[str, torch.Tensor]:
    """Every tensor the quantized checkpoint should contain, by name."""
    model = AutoModelForCausalLM.from_pretrained(
        str(model_path), dtype=torch.bfloat16,
        attn_implementation=attention_implementation(load_model_config(Path(model_path)))).eval()
    reader = CheckpointReader(model_path)
    layers = model.model.layers
    ignore = IgnoreMatcher(ignore)
    reader.carry_layers_from(len(layers))  # next-token-prediction layers: copied as they are
    names = NameMap(model)
    layouts = [plan_layer(layers[i], i, "model.layers", reader.layers[i], ignore, names) for i in range(len(layers))]
    observers = []
    for layout, layer in zip(layouts, layers, strict=True):
        obs = LayerObserver()
        obs.watch_linears(layer, [layout.rel(m) for m in layout.quantized if m not in layout.experts])
        for parent, module in fused_expert_modules(layer).items():
            instrument_experts(module, parent, obs, all_experts)
        observers.append(obs)
    for batch in batches:
        for obs in observers:
            obs.token_mask = batch.attention_mask.bool()
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)

    source = reader.read(list(reader.tensors))
    expected: dict[str, torch.Tensor] = {}
    for layout, obs in zip(layouts, observers, strict=True):
        stats, weights = {}, {}
        for module, tensor_name in layout.quantized.items():
            weights[module] = source[tensor_name]
            ref = layout.experts.get(module)
            if ref is None:
                stats[module] = obs.result(layout.rel(module))
            else:
                kind = "down" if ref.proj == "down_proj" else "gate_up"
                per_expert = obs.absmax[f"{ref.parent}.{kind}"]
                reached = obs.absmax[f"{ref.parent}.gate_up"] > 0
                stats[module] = per_expert[ref.index] if reached[ref.index] else per_expert.max()
        for module, q in scheme.quantize(weights, LayerStats(stats)):
            expected.update(get_format(fmt).pack(module, q, scheme.spec))
        expected.update({n: source[n] for n in layout.copied})
    expected.update({n: source[n] for n in reader.other})
    return expected


@torch.no_grad()
def reference_awq(model_path: Path, batches: list, scheme: Scheme, fmt: str, ignore: tuple[str, ...]
                  ) -> dict[str, torch.Tensor]:
    """int4_awq on the whole model in memory: forward hooks record every layer's AWQ
    statistics (channel_absmean observers) and parent blocks' inputs and outputs over all
    batches of the unquantized model, then each layer is transformed and quantized with the
    scheme's own functions. Every tensor the quantized checkpoint should contain, by name."""
    from streamq.engine.run import LayerContext

    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.bfloat16,
                                                 attn_implementation="sdpa").eval()
    reader = CheckpointReader(model_path)
    layers = model.model.layers
    ignore = IgnoreMatcher(ignore)
    names = NameMap(model)
    layouts = [plan_layer(layers[i], i, "model.layers", reader.layers[i], ignore, names) for i in range(len(layers))]
    observers, records = [], []
    for layout, layer in zip(layouts, layers, strict=True):
        obs = LayerObserver()
        obs.watch_linears(layer, dict.fromkeys(scheme.smoothing_inputs(layer, layout), scheme.smoothing_kind()))
        blocks = {name: [] for name in scheme.recorded_blocks(layer, layout)}
        for name, rec in blocks.items():
            def hook(_mod, args, kwargs, output, _rec=rec):
                _rec.append((args, dict(kwargs), output))
            obs._handles.append(layer.get_submodule(name).register_forward_hook(hook, with_kwargs=True))
        observers.append(obs)
        records.append(blocks)
    masks = [batch.attention_mask.bool() for batch in batches]
    for batch, mask in zip(batches, masks, strict=True):
        for obs in observers:
            obs.token_mask = mask
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    for obs in observers:
        obs.close()

    source = reader.read(list(reader.tensors))
    expected: dict[str, torch.Tensor] = {}
    for layout, layer, obs, blocks in zip(layouts, layers, observers, records, strict=True):
        stats = LayerStats({layout.prefix + n: o.result() for n, o in obs.observers.items()}, blocks, masks)
        tensors = {n: source[n] for n in reader.layers[layout.index]}
        weights = {m: source[n] for m, n in layout.quantized.items()}
        ctx = LayerContext(layout, layer, weights, tensors, torch.device("cpu"))
        changed = scheme.transform(ctx, stats)
        for module, q in scheme.quantize(ctx.weights, stats, layout):
            expected.update(get_format(fmt).pack(module, q, scheme.spec))
        expected.update({n: changed.get(n, source[n]) for n in layout.copied})
    expected.update({n: source[n] for n in reader.other})
    return expected
