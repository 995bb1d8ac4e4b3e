"""int4_awq (AWQ W4A16): config, the smoothing transform's exactness, the router, uncovered
experts, quality against round-to-nearest, the AutoAWQ GEMM layout, and loading in transformers.

The end-to-end jobs run on the CPU on the trained fixtures (tests/fixtures/trained/{dense,moe}),
with a small calibration set (8 x 128 tokens) and a coarse grid (n_grid 10) to stay fast.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import read_tensors
from safetensors.torch import save_file

from streamq.config import parse_config
from streamq.errors import ConfigError
from streamq.schemes.base import LayerStats

TRAINED = Path(__file__).parent / "fixtures" / "trained"
GROUP = 128
N_GRID = int(__import__("os").environ.get("AWQ_NGRID", 10))


def awq_config(model: Path, out: Path, *, name: str = "int4_awq", save_name: str = "compressed-tensors",
               zero_point: bool = True, num_samples: int = 8, seq: int = 128, mse_range: bool = False,
               **extra) -> dict:
    method = {"weight": "per-group", "group_size": GROUP}
    quant = {"name": name, "bits": 4, "save_name": save_name, "quant_method": method}
    if name == "int4_awq":
        method.update(zero_point=zero_point, mse_range=mse_range)
        quant["n_grid"] = N_GRID
    else:
        quant["sym"] = not zero_point
    quant.update(extra)
    cfg = {"global": {"save_path": str(out), "device": "cpu"},
           "model": {"name": "trained", "model_path": str(model)},
           "compression": {"name": "PTQ", "quantization": quant}}
    if name == "int4_awq":
        cfg["dataset"] = {"name": "TextDataset", "data_path": str(TRAINED / "calib.jsonl"),
                          "num_samples": num_samples, "max_seq_length": seq, "batch_size": 4}
    return cfg


def run(cfg: dict):
    from streamq.engine.run import quantize

    job = parse_config(cfg, "test-awq")
    quantize(job, overwrite=True, show_progress=False)
    return job.scheme


# ---------------------------------------------------------------------------------------------
# Capturing what the engine hands the transform
# ---------------------------------------------------------------------------------------------


def _clone(x, dtype=None):
    if torch.is_tensor(x):
        x = x.detach().clone()
        return x.to(dtype) if dtype is not None and x.is_floating_point() else x
    if isinstance(x, tuple):
        return tuple(_clone(v, dtype) for v in x)
    if isinstance(x, list):
        return [_clone(v, dtype) for v in x]
    if isinstance(x, dict):
        return {k: _clone(v, dtype) for k, v in x.items()}
    return x


class Captured:
    """One layer as the engine gave it to `Int4Awq.transform`, deep-copied (the engine frees
    the layer afterwards), plus what the transform returned."""

    def __init__(self, ctx, stats, changed, weights_after):
        self.layout = ctx.layout
        self.layer = ctx.layer  # replaced by a copy in capture()
        self.weights = {m: w.detach().clone() for m, w in ctx.weights.items()}  # before the transform
        self.tensors = {n: t.clone() for n, t in ctx.tensors.items()}
        self.stats = stats
        self.changed = changed
        self.weights_after = weights_after


def capture(monkeypatch, layers: set[int]) -> dict[int, Captured]:
    """Patch Int4Awq so the next run records, for the given layer indices, the layer's inputs
    (the decoder layer itself and post_attention_layernorm as extra recorded blocks) and the
    transform's inputs and outputs."""
    from streamq.schemes.awq import Int4Awq

    out: dict[int, Captured] = {}
    orig_blocks, orig_transform = Int4Awq.recorded_blocks, Int4Awq.transform

    def recorded_blocks(self, layer, layout, owned=None):
        extra = ["", "post_attention_layernorm"] if layout.index in layers else []
        return [*orig_blocks(self, layer, layout, owned), *extra]

    def transform(self, ctx, stats):
        if ctx.layout.index not in layers:
            return orig_transform(self, ctx, stats)
        layer_copy = copy.deepcopy(ctx.layer)
        before = {m: w.detach().clone() for m, w in ctx.weights.items()}
        tensors = {n: t.clone() for n, t in ctx.tensors.items()}
        changed = orig_transform(self, ctx, stats)
        cap = Captured(ctx, stats, {k: v.clone() for k, v in changed.items()},
                       {m: w.detach().clone() for m, w in ctx.weights.items()})
        cap.layer, cap.weights, cap.tensors = layer_copy, before, tensors
        out[ctx.layout.index] = cap
        return changed

    monkeypatch.setattr(Int4Awq, "recorded_blocks", recorded_blocks)
    monkeypatch.setattr(Int4Awq, "transform", transform)
    return out


def _set_weights(layer, layout, weights: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> None:
    """Write module weights (ctx.weights names) and tensors (checkpoint names) into a layer."""
    from streamq.model.layer import layer_weight_views

    views = layer_weight_views(layer, layout)
    with torch.no_grad():
        for m, w in weights.items():
            views[m].copy_(w.to(views[m].dtype))
        params = dict(layer.named_parameters())
        for name, t in tensors.items():
            rel = layout.rel(name)
            if rel in params:
                params[rel].copy_(t.to(params[rel].dtype))


def _layer_outputs(layer, stats: LayerStats, dtype) -> list[torch.Tensor]:
    outs = []
    with torch.no_grad():
        for args, kwargs, _ in stats.blocks[""]:
            out = layer(*_clone(args, dtype), **_clone(kwargs, dtype))
            outs.append(out[0] if isinstance(out, tuple) else out)
    return outs


# ---------------------------------------------------------------------------------------------
# Whole-model quality: a dequantized copy of a quantized checkpoint, perplexity on held-out text
# ---------------------------------------------------------------------------------------------


def dequantized_checkpoint(quantized: Path, dst: Path) -> Path:
    """A plain bf16 checkpoint with the weights a loader reconstructs from `quantized`
    (compressed-tensors pack-quantized or AWQ GEMM), and its rescaled norms and routers."""
    from streamq.formats.awq_packing import dequantize_awq
    from streamq.formats.int4_packing import from_compressed_tensors
    from streamq.quant import int4

    tensors = read_tensors(quantized)
    out = {}
    for name, t in tensors.items():
        module, _, suffix = name.rpartition(".")
        if suffix == "weight_packed":
            parts = {k: tensors[f"{module}.{k}"] for k in ("weight_packed", "weight_scale", "weight_shape",
                                                         "weight_zero_point") if f"{module}.{k}" in tensors}
            codes, scale, zp = from_compressed_tensors(parts)
            out[f"{module}.weight"] = int4.dequantize(codes, scale, zp, GROUP, torch.bfloat16)
        elif suffix == "qweight":
            w = dequantize_awq(t, tensors[f"{module}.qzeros"], tensors[f"{module}.scales"], torch.bfloat16)
            out[f"{module}.weight"] = w
        elif suffix in ("weight_scale", "weight_shape", "weight_zero_point", "qzeros", "scales"):
            continue
        else:
            out[name] = t
    dst.mkdir(parents=True, exist_ok=True)
    save_file(out, dst / "model.safetensors")
    config = json.loads((quantized / "config.json").read_text())
    config.pop("quantization_config", None)
    (dst / "config.json").write_text(json.dumps(config))
    for f in quantized.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("generation_config.json", "chat_template.jinja"):
            shutil.copy(f, dst / f.name)
    return dst


def with_outlier_channels(src: Path, dst: Path, channels=(5, 17, 64, 101), factor: float = 16.0) -> Path:
    """A copy of a checkpoint with activation outlier channels, computing the same function:
    in every layer the norms feeding q/k/v and gate/up (router and experts) are multiplied by
    `factor` on a few channels and the Linears reading them divided by it (a power of two, exact
    in bf16). Real LLMs have such channels; the trained fixtures, too small, do not (max / median
    of the per-channel mean |x| is 1.2-1.7 there), and AWQ exists to protect them."""
    from safetensors.torch import load_file

    shutil.copytree(src, dst)
    tensors = load_file(src / "model.safetensors")
    idx = torch.tensor(channels)
    for name in list(tensors):
        if name.endswith(("input_layernorm.weight", "post_attention_layernorm.weight")):
            tensors[name][idx] *= factor
        elif name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight",
                            "up_proj.weight", "mlp.gate.weight")):
            tensors[name][:, idx] /= factor
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def eval_ids(tokenizer, n: int = 16, length: int = 128) -> torch.Tensor:
    texts = [json.loads(line)["text"] for line in (TRAINED / "eval.jsonl").read_text().splitlines()[:n]]
    ids = [tokenizer(t)["input_ids"][:length] for t in texts]
    ids = [i for i in ids if len(i) == length]
    return torch.tensor(ids)


def perplexity_and_logits(model_dir: Path, ids: torch.Tensor) -> tuple[float, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    return math.exp(float(nll)), logits


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


def test_config_keys(tmp_path):
    from streamq.formats.base import QuantSpec  # noqa: F401
    from streamq.schemes.awq import Int4Awq

    job = parse_config(awq_config(TRAINED / "dense", tmp_path / "o"), "x")
    s = job.scheme
    assert isinstance(s, Int4Awq)
    assert (s.group_size, s.sym, s.n_grid, s.duo_scaling) == (GROUP, False, N_GRID, True)
    assert s.needs_calibration and not s.propagates_quantized
    assert parse_config(awq_config(TRAINED / "dense", tmp_path / "o", zero_point=False), "x").scheme.sym is True
    cfg = awq_config(TRAINED / "dense", tmp_path / "o")
    cfg["compression"]["quantization"]["quant_method"]["mse_range"] = True
    assert parse_config(cfg, "x").scheme.mse_range is True
    cfg["compression"]["quantization"]["n_grid"] = 0
    with pytest.raises(ConfigError, match=r"n_grid"):
        parse_config(cfg, "x")
    cfg = awq_config(TRAINED / "dense", tmp_path / "o")
    del cfg["dataset"]
    with pytest.raises(ConfigError, match="dataset"):
        parse_config(cfg, "x")


# ---------------------------------------------------------------------------------------------
# The AutoAWQ GEMM layout
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("symmetric", [True, False])
def test_awq_format_round_trip(symmetric):
    from streamq.formats import get_format, parse_quantization_config
    from streamq.formats.awq_packing import dequantize_awq, unpack_awq
    from streamq.quant import int4
    from streamq.quant.granularity import PerGroup
    from streamq.schemes.base import QuantizedLinear

    fmt = get_format("awq")
    spec = parse_config(awq_config(TRAINED / "dense", "/tmp/unused", zero_point=not symmetric), "x").scheme.spec
    assert fmt.supports(spec) is None
    g = 32
    spec = type(spec)(spec.type, spec.bits, PerGroup(g), spec.symmetric, None, False)
    w = torch.randn(48, 96, generator=torch.Generator().manual_seed(0))
    codes, scale, zp = int4.quantize_rtn(w, g, symmetric, torch.float16)
    tensors = fmt.pack("m", QuantizedLinear(codes, scale, zero_point=zp), spec)
    shapes = {t.suffix: t.shape for t in fmt.specs(spec, 48, 96)}
    dtypes = {"I32": torch.int32, "F16": torch.float16}
    for t in fmt.specs(spec, 48, 96):
        assert tensors[f"m.{t.suffix}"].shape == t.shape and tensors[f"m.{t.suffix}"].dtype == dtypes[t.dtype]
    assert fmt.logical_shape(spec, shapes) == (48, 96)
    q, z, s = unpack_awq(tensors["m.qweight"], tensors["m.qzeros"], tensors["m.scales"])
    assert torch.equal(q, codes.to(torch.int32) + 8)
    assert torch.equal(z, torch.full_like(z, 8) if symmetric else zp + 8)
    assert torch.equal(s.float(), scale)
    expect = int4.dequantize(codes, scale, zp, g)
    assert torch.equal(dequantize_awq(tensors["m.qweight"], tensors["m.qzeros"], tensors["m.scales"]), expect)
    block = fmt.config_block(spec, ["lm_head"])
    assert block == {"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": g,
                     "zero_point": not symmetric, "modules_to_not_convert": ["lm_head"]}
    parsed_fmt, parsed, ignored = parse_quantization_config(block)
    assert parsed_fmt is fmt and parsed == spec and ignored == ["lm_head"]


# ---------------------------------------------------------------------------------------------
# End-to-end runs shared by the tests below (each runs once per module)
# ---------------------------------------------------------------------------------------------

CAPTURED_LAYER = 1
NEVER = 5  # the MoE run's router never picks this expert


def _never_route_forward(self, hidden_states):
    """Qwen3MoeTopKRouter.forward with expert NEVER's logit forced to -inf before the top-k."""
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    router_logits = torch.nn.functional.linear(hidden_states, self.weight)
    masked = router_logits.clone()
    masked[:, NEVER] = float("-inf")
    probs = torch.nn.functional.softmax(masked, dtype=torch.float, dim=-1)
    top_value, top_index = torch.topk(probs, self.top_k, dim=-1)
    if self.norm_topk_prob:
        top_value /= top_value.sum(dim=-1, keepdim=True)
    return router_logits, top_value.to(router_logits.dtype), top_index


@pytest.fixture(scope="module")
def dense_runs(tmp_path_factory):
    """The dense fixture with outlier channels, quantized by int4_awq (layer 1 captured) and by
    int4_rtn, both asymmetric W4 group 128, compressed-tensors."""
    root = tmp_path_factory.mktemp("awq_dense")
    src = with_outlier_channels(TRAINED / "dense", root / "src")
    with pytest.MonkeyPatch.context() as mp:
        caps = capture(mp, {CAPTURED_LAYER})
        scheme = run(awq_config(src, root / "awq"))
    run(awq_config(src, root / "rtn", name="int4_rtn"))
    return {"src": src, "awq": root / "awq", "rtn": root / "rtn", "cap": caps[CAPTURED_LAYER], "scheme": scheme,
            "root": root}


@pytest.fixture(scope="module")
def moe_runs(tmp_path_factory):
    """The MoE fixture quantized by int4_awq with a router that never picks expert NEVER (layer
    1 captured), and by int4_rtn."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    root = tmp_path_factory.mktemp("awq_moe")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Qwen3MoeTopKRouter, "forward", _never_route_forward)
        caps = capture(mp, {CAPTURED_LAYER})
        scheme = run(awq_config(TRAINED / "moe", root / "awq"))
        fallbacks = list(scheme.fallbacks)  # the last layer's notes
    run(awq_config(TRAINED / "moe", root / "rtn", name="int4_rtn"))
    return {"awq": root / "awq", "rtn": root / "rtn", "cap": caps[CAPTURED_LAYER], "scheme": scheme,
            "fallbacks": fallbacks}


# ---------------------------------------------------------------------------------------------
# The transform
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["dense", "moe"])
def test_smoothing_preserves_layer_function_float64(which, dense_runs, moe_runs):
    """The engine's layer, its weights and recorded statistics, transformed in float64: the
    smoothed layer (rescaled norms, router and Linears, not yet quantized) computes the same
    outputs as the original on every calibration batch, to float64 rounding."""
    from streamq.engine.run import LayerContext
    from streamq.schemes.awq import Int4Awq

    cap = (dense_runs if which == "dense" else moe_runs)["cap"]
    f64 = torch.float64
    original = copy.deepcopy(cap.layer).to(f64)
    if which == "moe":  # grouped_mm has no float64 kernel: the eager loop computes the same experts
        original.mlp.experts.config._experts_implementation = "eager"
    ctx = LayerContext(cap.layout, original, {m: w.to(f64) for m, w in cap.weights.items()},
                       {n: t.to(f64) for n, t in cap.tensors.items()}, torch.device("cpu"))
    stats = LayerStats(cap.stats.values, _clone(cap.stats.blocks, f64), cap.stats.masks)
    scheme = Int4Awq(GROUP, False, N_GRID)
    changed = scheme.transform(ctx, stats)
    groups = len(scheme.chosen)
    assert groups == (3 if which == "dense" else 1 + 8), scheme.chosen  # no v->o under GQA
    p = cap.layout.prefix
    expect = {f"{p}input_layernorm.weight", f"{p}post_attention_layernorm.weight"}
    if which == "moe":
        expect.add(f"{p}mlp.gate.weight")
    assert set(changed) == expect
    assert all(t.dtype == f64 for t in changed.values())
    smoothed = copy.deepcopy(original)
    _set_weights(smoothed, cap.layout, ctx.weights, changed)
    moved = max(float((smoothed.get_submodule(n).weight - original.get_submodule(n).weight).abs().max()
                      / original.get_submodule(n).weight.abs().max())
                for n in ("input_layernorm", "post_attention_layernorm"))
    assert moved > 0.05, "the transform should have rescaled the norms"
    for a, b in zip(_layer_outputs(original, stats, f64), _layer_outputs(smoothed, stats, f64), strict=True):
        assert float((a - b).abs().max() / b.abs().max()) < 1e-10


def test_router_logits_unchanged_in_bf16(moe_runs):
    """With the norm divided by s and the router's columns multiplied by s (both written in
    bf16), the router's logits on the calibration tokens stay within bf16 rounding, and the
    experts picked agree."""
    cap = moe_runs["cap"]
    p = cap.layout.prefix
    layer = cap.layer
    new_norm = copy.deepcopy(layer.post_attention_layernorm)
    with torch.no_grad():
        new_norm.weight.copy_(cap.changed[f"{p}post_attention_layernorm.weight"])
        w_router = cap.changed[f"{p}mlp.gate.weight"]
        assert w_router.dtype == torch.bfloat16 and not torch.equal(w_router, layer.mlp.gate.weight)
        worst, agree, total = 0.0, 0, 0
        for b, (args, _, _) in enumerate(cap.stats.blocks["post_attention_layernorm"]):
            mask = cap.stats.masks[b].reshape(-1)
            h = args[0]
            before = torch.nn.functional.linear(layer.post_attention_layernorm(h), layer.mlp.gate.weight)
            after = torch.nn.functional.linear(new_norm(h), w_router)
            before, after = before.reshape(-1, before.shape[-1])[mask], after.reshape(-1, after.shape[-1])[mask]
            worst = max(worst, float((after.float() - before.float()).abs().max() / before.float().abs().max()))
            agree += int((before.topk(2).indices.sort().values == after.topk(2).indices.sort().values).all(-1).sum())
            total += int(mask.sum())
    # bf16 keeps 8 significant bits: each of the two rescaled tensors and the logits themselves
    # round with relative error <= 2^-9; 2^-5 of the largest logit bounds their sum with margin.
    assert worst < 2**-5, worst
    assert agree >= 0.99 * total, (agree, total)


def test_uncovered_expert_keeps_neutral_scale_and_is_quantized(moe_runs):
    """An expert no calibration token reached keeps s = 1 for its down_proj (its down_proj
    tensors equal int4_rtn's exactly) and is quantized like every other expert."""
    note = [f for f in moe_runs["fallbacks"] if f".experts.{NEVER}.up_proj" in f]
    assert note and "no calibration token" in note[0]
    awq, rtn = read_tensors(moe_runs["awq"]), read_tensors(moe_runs["rtn"])
    for i in range(4):
        base = f"model.layers.{i}.mlp.experts.{NEVER}"
        for suffix in ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape"):
            assert torch.equal(awq[f"{base}.down_proj.{suffix}"], rtn[f"{base}.down_proj.{suffix}"])
        for proj in ("gate_proj", "up_proj"):
            assert f"{base}.{proj}.weight_packed" in awq and f"{base}.{proj}.weight" not in awq
        # Experts that did see tokens got their own scales.
        other = f"model.layers.{i}.mlp.experts.{(NEVER + 1) % 8}.down_proj.weight_scale"
        assert not torch.equal(awq[other], rtn[other])


# ---------------------------------------------------------------------------------------------
# Quality and loading
# ---------------------------------------------------------------------------------------------


def test_awq_beats_rtn_on_outlier_channels(dense_runs):
    """Perplexity and logit error of the dequantized outputs on held-out text: AWQ recovers most
    of what round-to-nearest loses when activations have outlier channels (measured: bf16 32.04,
    int4_rtn 33.17 / 11% logit error, int4_awq 32.48 / 4.3%)."""
    from transformers import AutoTokenizer

    ids = eval_ids(AutoTokenizer.from_pretrained(TRAINED / "dense"))
    ppl0, ref = perplexity_and_logits(TRAINED / "dense", ids)
    results = {}
    for name in ("awq", "rtn"):
        deq = dequantized_checkpoint(dense_runs[name], dense_runs[name].parent / f"{name}-deq")
        ppl, logits = perplexity_and_logits(deq, ids)
        results[name] = (ppl, float((logits - ref).norm() / ref.norm()))
    (ppl_awq, err_awq), (ppl_rtn, err_rtn) = results["awq"], results["rtn"]
    assert ppl0 < ppl_awq < ppl_rtn, (ppl0, results)
    assert ppl_awq - ppl0 < 0.7 * (ppl_rtn - ppl0), (ppl0, results)
    assert err_awq < 0.6 * err_rtn, results


def test_mse_range_clipping_lowers_output_error(dense_runs):
    """`mse_range: true` (the clipping search after the scales) lowers the logit error further
    on held-out text (measured: 4.3% without, 4.0% with; perplexity 32.48 -> 32.43)."""
    from transformers import AutoTokenizer

    out = dense_runs["root"] / "awq-clip"
    run(awq_config(dense_runs["src"], out, mse_range=True))
    ids = eval_ids(AutoTokenizer.from_pretrained(TRAINED / "dense"))
    _, ref = perplexity_and_logits(TRAINED / "dense", ids)
    errs = {}
    for name, path in (("clip", out), ("awq", dense_runs["awq"])):
        _, logits = perplexity_and_logits(dequantized_checkpoint(path, path.parent / f"{name}-deq-clip"), ids)
        errs[name] = float((logits - ref).norm() / ref.norm())
    assert errs["clip"] < errs["awq"], errs


def test_transformers_loads_compressed_tensors_output(dense_runs):
    """transformers (compressed-tensors package) loads the symmetric pack-quantized output with
    its rescaled norms; its logits equal our own dequantization's up to bf16 compute (relative
    Frobenius error < 2%) and stay within 8% of the bf16 model's (measured about 5%: int4
    group-128 weights through 4 layers).

    Symmetric only: transformers 5.x with compressed-tensors 0.20 initializes an asymmetric
    module's `weight_zero_point` unpacked ([out, groups]) and re-initializes the packed
    [ceil(out/8), groups] tensor that compressed-tensors itself writes ("size mismatch"), so
    asymmetric W4A16 does not load there yet (vLLM loads it; upstream llm-compressor#1618)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = dense_runs["root"] / "awq-sym"
    run(awq_config(dense_runs["src"], out, zero_point=False))
    ids = eval_ids(AutoTokenizer.from_pretrained(TRAINED / "dense"), n=4)
    model = AutoModelForCausalLM.from_pretrained(out)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert getattr(q_proj, "quantization_scheme", None) is not None
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    deq = dequantized_checkpoint(out, dense_runs["root"] / "awq-sym-deq")
    _, ours = perplexity_and_logits(deq, ids)
    _, ref = perplexity_and_logits(TRAINED / "dense", ids)
    assert float((logits - ours).norm() / ours.norm()) < 0.02
    assert float((logits - ref).norm() / ref.norm()) < 0.08


# ---------------------------------------------------------------------------------------------
# Streaming against the whole-model reference, and the AWQ layout end to end
# ---------------------------------------------------------------------------------------------


def _mha_llama(dst: Path, tiny_llama: Path) -> Path:
    """A tiny llama without GQA (4 KV heads), so v_proj -> o_proj is an AWQ group too."""
    from transformers import AutoModelForCausalLM

    from streamq.testing.tiny_models import _fill_weights, tiny_config

    cfg = tiny_config("llama")
    cfg.num_key_value_heads = cfg.num_attention_heads
    model = AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
    _fill_weights(model, 1)
    model.save_pretrained(dst)
    for f in tiny_llama.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "chat_template.jinja"):
            shutil.copy(f, dst / f.name)
    return dst


@pytest.mark.parametrize("arch,mse_range", [("mha_llama", False), ("qwen2", False), ("qwen3_moe", False),
                                            ("mha_llama", True), ("qwen3_moe", True)])
def test_streaming_matches_whole_model_reference(arch, mse_range, tiny_models, tmp_path):
    """The layer-by-layer engine writes exactly the bytes of a whole-model AWQ (all layers in
    memory, hooks, the same scheme functions), padding included (batch 4 of 6 samples)."""
    from reference import reference_awq
    from test_static_streaming import CALIB, assert_bytes_equal, read_output, reference_batches

    model = _mha_llama(tmp_path / "mha", tiny_models["llama"]) if arch == "mha_llama" else tiny_models[arch]
    cfg = awq_config(model, tmp_path / "out", group_size=32, n_grid=4, mse_range=mse_range)
    cfg["compression"]["quantization"]["quant_method"]["group_size"] = 32
    del cfg["compression"]["quantization"]["group_size"]
    cfg["compression"]["quantization"]["ignore_layers"] = ["lm_head"]
    cfg["dataset"].update(data_path=str(CALIB), num_samples=6, max_seq_length=48, batch_size=4)
    job = parse_config(cfg, "x")
    from streamq.engine.run import quantize

    quantize(job, show_progress=False)
    scheme = job.scheme
    expected = reference_awq(model, reference_batches(model, 4), scheme, "compressed-tensors", ("lm_head",))
    groups = {k.split(".", 3)[3] for k in scheme.chosen}
    if arch == "mha_llama":
        assert "self_attn.v_proj" in groups, scheme.chosen
    assert_bytes_equal(read_output(tmp_path / "out"), expected)


@pytest.mark.parametrize("zero_point", [True, False])
def test_awq_layout_end_to_end(zero_point, tiny_models, tmp_path):
    """save_name awq on the tiny MoE: a verified run whose every quantized Linear, unpacked with
    `awq_packing.unpack_awq`, dequantizes to exactly the weights of the compressed-tensors run
    of the same job (fp16 holds the bf16 scales exactly here), and whose config block parses."""
    from streamq.formats import parse_quantization_config
    from streamq.formats.awq_packing import unpack_awq

    model = tiny_models["qwen3_moe"]
    outs = {}
    for save_name in ("awq", "compressed-tensors"):
        cfg = awq_config(model, tmp_path / save_name, save_name=save_name, zero_point=zero_point, n_grid=4)
        cfg["compression"]["quantization"]["quant_method"]["group_size"] = 32
        cfg["compression"]["quantization"]["ignore_layers"] = ["lm_head"]
        run(cfg)
        outs[save_name] = read_tensors(tmp_path / save_name)
    qc = json.loads((tmp_path / "awq" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "awq" and qc["version"] == "gemm" and qc["zero_point"] is zero_point
    _, spec, _ = parse_quantization_config(qc)
    assert spec.symmetric is not zero_point and spec.weight.size == 32
    awq, ct = outs["awq"], outs["compressed-tensors"]
    modules = [n[: -len(".qweight")] for n in awq if n.endswith(".qweight")]
    assert len(modules) == 2 * (4 + 3 * 12)  # 2 layers: q/k/v/o and 12 experts x 3
    from streamq.formats.int4_packing import from_compressed_tensors
    from streamq.quant import int4

    for m in modules:
        codes, zeros, scales = unpack_awq(awq[f"{m}.qweight"], awq[f"{m}.qzeros"], awq[f"{m}.scales"])
        if not zero_point:
            assert bool((zeros == 8).all())
        mine = ((codes - zeros.repeat_interleave(32, dim=1)).float()
                * scales.float().repeat_interleave(32, dim=1))
        parts = {k.rpartition(".")[2]: v for k, v in ct.items() if k.rpartition(".")[0] == m}
        c, s, z = from_compressed_tensors(parts)
        assert torch.equal(mine, int4.dequantize(c, s, z, 32)), m
    plain = [n for n in ct if not n.rpartition(".")[2].startswith("weight_")]
    assert plain and all(torch.equal(awq[n], ct[n]) for n in plain)  # norms, routers, the rest: same bytes
