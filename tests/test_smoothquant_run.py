"""SmoothQuant inside int8_dynamic (`quant_helpers: [smooth]`), on real decoder layers and
through the engine.

(a) `smooth_layer` on a float64 copy of a real decoder layer (dense: input_layernorm ->
    q/k/v and post_attention_layernorm -> gate/up; MoE: attention only) with random,
    outlier-heavy statistics leaves the layer's output unchanged to float64 precision,
    while the norms move by large factors.
(b) A run on the tiny MoE smooths attention only: post_attention_layernorm and the router
    are written bit for bit, and the experts are quantized from their unscaled weights.
(c) A run on the tiny dense model writes both norms changed (in the source dtype) and
    every other unquantized tensor bit for bit; the written norms and the dequantized
    INT8 weights together still compute the source function: norm_out[j] * W_deq[o, j]
    matches norm_src[j] * W_src[o, j] within the INT8 step (and one bf16 rounding of the norm).
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from conftest import read_tensors
from test_quantize_dynamic import quantized_weight_names
from transformers import AutoModelForCausalLM

from streamq.checkpoint.reader import CheckpointReader
from streamq.model.ignore import IgnoreMatcher
from streamq.model.layer import layer_weight_views
from streamq.model.layout import plan_layer
from streamq.model.names import NameMap
from streamq.model.smoothing import smooth_layer, smoothing_groups
from streamq.schemes.base import LayerStats

PREFIX = "model.layers.0."


def _random_absmax(n: int, seed: int) -> torch.Tensor:
    """Per-channel input maxima as LLM activations have them: most channels O(1), a few huge."""
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(n, generator=g, dtype=torch.float64) * 2 + 0.05
    a[torch.randperm(n, generator=g)[:4]] *= 100
    return a.to(torch.float32)


@torch.no_grad()
@pytest.mark.parametrize("variant,groups", [("qwen3", {"input_layernorm", "post_attention_layernorm"}),
                                            ("qwen3_moe", {"input_layernorm"})])
def test_smooth_layer_preserves_a_real_decoder_layer_in_float64(tiny_models, variant, groups):
    # Eager experts: the grouped-GEMM kernel takes no float64.
    model = AutoModelForCausalLM.from_pretrained(tiny_models[variant], dtype=torch.float64,
                                                 experts_implementation="eager")
    layer = model.model.layers[0]
    reader = CheckpointReader(tiny_models[variant])
    layout = plan_layer(layer, 0, "model.layers", reader.layers[0], IgnoreMatcher(("lm_head",)),
                        NameMap(model))
    assert {g.source for g in smoothing_groups(layer, layout)} == groups

    hidden = model.config.hidden_size
    stats = LayerStats({PREFIX + "self_attn.q_proj": _random_absmax(hidden, 1),
                        PREFIX + "mlp.gate_proj": _random_absmax(hidden, 2)})
    weights = layer_weight_views(layer, layout)
    before = dict(weights)
    tensors = {PREFIX + n: p.detach().clone() for n, p in layer.named_parameters()}
    ctx = SimpleNamespace(layout=layout, layer=layer, weights=weights, tensors=tensors, device=torch.device("cpu"))
    changed = smooth_layer(ctx, stats, 0.5)

    assert set(changed) == {f"{PREFIX}{g}.weight" for g in groups}
    for name, value in changed.items():
        assert value.dtype == torch.float64
        ratio = tensors[name] / value  # = s
        assert float(ratio.max() / ratio.min()) > 10, f"{name}: smoothing changed almost nothing"
    smoothed_modules = {m for m in weights if weights[m] is not before[m]}
    want = {PREFIX + "self_attn." + p for p in ("q_proj", "k_proj", "v_proj")}
    if "post_attention_layernorm" in groups:
        want |= {PREFIX + "mlp.gate_proj", PREFIX + "mlp.up_proj"}
    assert smoothed_modules == want  # experts, o_proj, down_proj untouched

    smoothed = copy.deepcopy(layer)
    for name, value in changed.items():
        smoothed.get_parameter(name[len(PREFIX):]).copy_(value)
    for module in smoothed_modules:
        smoothed.get_submodule(layout.rel(module)).weight.copy_(weights[module])

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 12, hidden, generator=g, dtype=torch.float64)
    # Scale the input channels like the statistics say (outliers), as the real activations would be.
    x = x * stats.values[PREFIX + "self_attn.q_proj"].to(torch.float64)
    position_ids = torch.arange(12).unsqueeze(0).expand(2, -1)
    kwargs = {"position_ids": position_ids, "position_embeddings": model.model.rotary_emb(x, position_ids)}
    ref, out = layer(x, **kwargs), smoothed(x, **kwargs)
    ref = ref[0] if isinstance(ref, tuple) else ref
    out = out[0] if isinstance(out, tuple) else out
    assert float((out - ref).norm() / ref.norm()) < 1e-12


def _implied_s_check(src, out, norm, members):
    """norm_out * W_deq == norm_src * W_src column by column, within the INT8 step of each row
    and the bf16 rounding of the written norm (s_j = norm_src[j] / norm_out[j])."""
    s = src[norm].to(torch.float64) / out[norm].to(torch.float64)
    for m in members:
        w = src[m + ".weight"].to(torch.float64)
        q, scale = out[m + ".weight"], out[m + ".weight_scale"].to(torch.float64)
        deq = q.to(torch.float64) * scale
        bound = scale / 2 * (1 + 2.0**-15) + (w * s).abs() * 2.0**-7
        assert bool(((deq - w * s).abs() <= bound).all()), m
    return s


def test_dense_run_smooths_both_norms_and_nothing_else(tiny_models, quantized_scheme):
    src_dir = tiny_models["qwen3"]
    out = read_tensors(quantized_scheme("qwen3", "int8_dynamic", smooth=True))
    plain = read_tensors(quantized_scheme("qwen3", "int8_dynamic"))
    src = read_tensors(src_dir)
    qnames = set(quantized_weight_names(src))
    norms = {f"model.layers.{i}.{n}.weight" for i in range(2) for n in ("input_layernorm", "post_attention_layernorm")}
    for name in sorted(set(src) - qnames):
        assert out[name].dtype == src[name].dtype and out[name].shape == src[name].shape, name
        same = torch.equal(out[name].view(torch.uint8), src[name].view(torch.uint8))
        assert same == (name not in norms), f"{name}: {'unchanged' if same else 'changed'}"
    for i in range(2):
        p = f"model.layers.{i}."
        s = _implied_s_check(src, out, p + "input_layernorm.weight",
                             [p + f"self_attn.{x}" for x in ("q_proj", "k_proj", "v_proj")])
        assert float(s.max() / s.min()) > 1.5, "smoothing scales are all about equal"
        _implied_s_check(src, out, p + "post_attention_layernorm.weight", [p + "mlp.gate_proj", p + "mlp.up_proj"])
        # o_proj and down_proj are not smoothed: quantized exactly as without smoothing.
        for m in (p + "self_attn.o_proj", p + "mlp.down_proj"):
            assert torch.equal(out[m + ".weight"], plain[m + ".weight"]), m
            assert torch.equal(out[m + ".weight_scale"], plain[m + ".weight_scale"]), m


def test_moe_run_smooths_attention_only(tiny_models, quantized_scheme):
    out = read_tensors(quantized_scheme("qwen3_moe", "int8_dynamic", smooth=True))
    plain = read_tensors(quantized_scheme("qwen3_moe", "int8_dynamic"))
    src = read_tensors(tiny_models["qwen3_moe"])
    qnames = set(quantized_weight_names(src))
    for name in sorted(set(src) - qnames):
        same = torch.equal(out[name].view(torch.uint8), src[name].view(torch.uint8))
        if name.endswith("input_layernorm.weight"):
            assert not same, f"{name} was not smoothed"
        else:
            assert same, f"{name} changed (post_attention_layernorm and the router must be written bit for bit)"
    for i in range(2):
        p = f"model.layers.{i}."
        _implied_s_check(src, out, p + "input_layernorm.weight",
                         [p + f"self_attn.{x}" for x in ("q_proj", "k_proj", "v_proj")])
    # Experts (and o_proj) are quantized from their unscaled weights: as without smoothing.
    for name in qnames:
        if ".self_attn.q_proj" in name or ".self_attn.k_proj" in name or ".self_attn.v_proj" in name:
            continue
        m = name[: -len(".weight")]
        assert torch.equal(out[m + ".weight"], plain[m + ".weight"]), m
        assert torch.equal(out[m + ".weight_scale"], plain[m + ".weight_scale"]), m


def test_offset_norms_are_not_smoothed(tmp_path):
    """Gemma's norms compute f(x) * (1 + w) and its MLP reads pre_feedforward_layernorm: no
    smoothing group may divide those norms (it would change the layer); a Llama-style norm
    (f(x) * w) is still found. Found from what the modules compute, not their names."""
    from transformers import AutoModelForCausalLM

    from streamq.model.smoothing import awq_groups, scales_by_weight
    from streamq.testing.arch_matrix import build_arch_model

    gemma = AutoModelForCausalLM.from_pretrained(build_arch_model("gemma3_text", tmp_path / "g"))
    llama = AutoModelForCausalLM.from_pretrained(build_arch_model("llama", tmp_path / "l"))
    for model, expected in ((gemma, False), (llama, True)):
        layer = model.model.layers[0]
        assert scales_by_weight(layer.input_layernorm) is expected
        reader = CheckpointReader(model.name_or_path)
        layout = plan_layer(layer, 0, "model.layers", reader.layers[0], IgnoreMatcher(("lm_head",)), NameMap(model))
        assert bool(smoothing_groups(layer, layout)) is expected
        assert bool([g for g in awq_groups(layer, layout) if "layernorm" in g.source]) is expected
