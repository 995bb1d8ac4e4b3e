"""fp8_dynamic end to end on the tiny checkpoints: names, dtypes, shapes, exact FP8 bytes,
untouched tensors, config.json, side files, index, ignore_layers and NaN weights.

The expected FP8 weights are recomputed here from first principles (float64 arithmetic
and an explicit round-to-nearest-even onto the table of e4m3 values), not with streamq's
own functions, so a wrong scale, a missed fused group or a bad cast shows up as a
byte mismatch.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from conftest import MODEL_VARIANTS, NUM_LAYERS, copy_model, make_config, read_tensors, run_job, write_yaml
from safetensors import safe_open

from streamq.cli import main as cli_main
from streamq.errors import CheckpointError

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
LINEAR_LEAVES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LAYER_LINEAR_RE = re.compile(r"^model\.layers\.\d+\.(.+\.)?(" + "|".join(LINEAR_LEAVES) + r")\.weight$")
NUM_EXPERTS = 12
# (save_name, weight granularity) combinations the formats allow for fp8_dynamic.
FORMATS = [("fp8", "per-tensor"), ("compressed-tensors", "per-tensor"), ("compressed-tensors", "per-channel")]

# All finite non-negative e4m3fn values in code order (0x00..0x7e), which is ascending order.
_CODES = torch.arange(0, 0x7F, dtype=torch.uint8)
_POS_VALUES = _CODES.view(FP8).to(torch.float64)
assert bool((_POS_VALUES[1:] > _POS_VALUES[:-1]).all()) and _POS_VALUES[-1] == FP8_MAX


def exact_fp8(v: torch.Tensor) -> torch.Tensor:
    """float64 -> e4m3fn with one correctly rounded step (nearest, ties to even code), saturating."""
    assert v.dtype == torch.float64
    a = v.abs().clamp(max=FP8_MAX)
    hi = torch.searchsorted(_POS_VALUES, a).clamp(max=len(_POS_VALUES) - 1)
    lo = (hi - 1).clamp(min=0)
    d_lo, d_hi = a - _POS_VALUES[lo], _POS_VALUES[hi] - a
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0))
    code = torch.where(pick_hi, hi, lo).to(torch.uint8)
    code = torch.where(torch.signbit(v), code | 0x80, code)
    return code.view(FP8)


def fp8_is_tie(v: torch.Tensor) -> torch.Tensor:
    """True where |v| lies exactly halfway between two adjacent e4m3 values."""
    a = v.abs()
    hi = torch.searchsorted(_POS_VALUES, a).clamp(1, len(_POS_VALUES) - 1)
    return (a - _POS_VALUES[hi - 1]) == (_POS_VALUES[hi] - a)


def fp8_half_ulp(v: torch.Tensor) -> torch.Tensor:
    """Half the e4m3 spacing at |v| (float64): 2^(e-3)/2 for normals, 2^-9/2 for subnormals."""
    a = v.abs().clamp(min=2.0**-6)
    return torch.exp2(torch.floor(torch.log2(a)) - 3) / 2


def group_key(name: str, per_tensor: bool) -> str:
    """Modules vLLM fuses share one per-tensor scale: q/k/v of an attention, gate/up of an MLP or expert."""
    module = name[: -len(".weight")]
    parent, _, leaf = module.rpartition(".")
    if not per_tensor:
        return module
    if leaf in ("q_proj", "k_proj", "v_proj"):
        return parent + ".qkv"
    if leaf in ("gate_proj", "up_proj"):
        return parent + ".gate_up"
    return module


def quantized_weight_names(src: dict[str, torch.Tensor], ignored_modules: set[str] = frozenset()) -> list[str]:
    names = [n for n in src if LAYER_LINEAR_RE.match(n)]
    assert not any(n.endswith("mlp.gate.weight") for n in names)  # the router is never a target
    return [n for n in names if n[: -len(".weight")] not in ignored_modules]


def check_quantized_output(src_dir: Path, out_dir: Path, fmt: str, weight: str,
                           ignored_modules: set[str] = frozenset()) -> dict[str, torch.Tensor]:
    """Every assertion on tensors of an fp8_dynamic output; returns the output tensors."""
    src, out = read_tensors(src_dir), read_tensors(out_dir)
    per_tensor = weight == "per-tensor"
    qnames = quantized_weight_names(src, ignored_modules)
    assert qnames, "nothing to quantize?"

    # Names: the source's plus one weight_scale per quantized Linear; no input_scale (dynamic).
    expected_names = set(src) | {n[: -len("weight")] + "weight_scale" for n in qnames}
    assert set(out) == expected_names, (
        f"missing {sorted(expected_names - set(out))[:5]}, unexpected {sorted(set(out) - expected_names)[:5]}")
    assert not any(n.endswith("input_scale") for n in out)

    # Untouched tensors: bit for bit (norms, embeddings, biases, router, lm_head, ignored Linears).
    for name in sorted(set(src) - set(qnames)):
        s, o = src[name], out[name]
        assert o.dtype == s.dtype and o.shape == s.shape, name
        assert torch.equal(o.view(torch.uint8), s.view(torch.uint8)), f"{name} changed"

    # Group absmax in float64 (bf16 values are exact there); scale in float32 as the format says.
    group_amax: dict[str, torch.Tensor] = {}
    for name in qnames:
        w = src[name].to(torch.float64)
        amax = w.abs().amax() if per_tensor else w.abs().amax(dim=1, keepdim=True)
        key = group_key(name, per_tensor)
        group_amax[key] = amax if key not in group_amax else torch.maximum(group_amax[key], amax)
    for name in qnames:
        w = src[name].to(torch.float64)
        q, scale = out[name], out[name[: -len("weight")] + "weight_scale"]
        assert q.dtype == FP8 and q.shape == w.shape, (name, q.dtype, q.shape)
        assert scale.dtype == torch.float32, (name, scale.dtype)
        want_shape = {("fp8", True): (), ("compressed-tensors", True): (1,)}.get((fmt, per_tensor), (w.shape[0], 1))
        assert tuple(scale.shape) == want_shape, (name, tuple(scale.shape))
        want_scale = group_amax[group_key(name, per_tensor)].to(torch.float32) / torch.tensor(FP8_MAX)
        assert torch.equal(scale.reshape(want_scale.shape), want_scale), f"{name}: scale is not group absmax / 448"
        s64 = scale.reshape(want_scale.shape).to(torch.float64)
        v64 = (w / s64).clamp(-FP8_MAX, FP8_MAX)
        # The quotient is a float32 division (DESIGN.md; AutoFP8, llm-compressor and vLLM do the
        # same). fl32(fl64(w / s)) equals fl32(w / s) here: an 8-bit / 24-bit quotient never lands
        # on a float32 midpoint after float64 rounding.
        v32 = v64.to(torch.float32).to(torch.float64)
        expected = exact_fp8(v32)
        mismatch = q.view(torch.uint8) != expected.view(torch.uint8)
        assert not mismatch.any(), (f"{name}: {int(mismatch.sum())} FP8 bytes differ from the exact rounding, "
                                    f"first at {mismatch.nonzero()[0].tolist()}")
        # Against the exact float64 quotient the result may differ only where the float32 quotient
        # is an exact tie between two FP8 values (w = absmax * 42/448 gives 42.0000013 in float64
        # but 42.0 in float32, which rounds to even: 40, not 44).
        differs = q.view(torch.uint8) != exact_fp8(v64).view(torch.uint8)
        assert bool(fp8_is_tie(v32[differs]).all()), f"{name}: differs from exact rounding off a tie"
        err = (q.to(torch.float64) * s64 - w).abs()
        # Half an ulp, plus the float32 quotient's rounding (at most 2^-19 of half an ulp).
        bound = fp8_half_ulp(v64) * s64 * (1 + 2.0**-18)
        assert bool((err <= bound).all()), f"{name}: dequantization error above half an FP8 ulp"
    return out


@pytest.mark.parametrize("fmt,weight", FORMATS, ids=["fp8", "ct-tensor", "ct-channel"])
@pytest.mark.parametrize("variant", MODEL_VARIANTS)
def test_tensors_exact(tiny_models, quantized, variant, fmt, weight):
    out = check_quantized_output(tiny_models[variant], quantized(variant, fmt, weight), fmt, weight)
    if variant == "qwen3_moe":
        for i in range(NUM_LAYERS):
            for e in range(NUM_EXPERTS):
                for proj in ("gate_proj", "up_proj", "down_proj"):
                    name = f"model.layers.{i}.mlp.experts.{e}.{proj}"
                    assert out[f"{name}.weight"].dtype == FP8 and f"{name}.weight_scale" in out, name
            assert out[f"model.layers.{i}.mlp.gate.weight"].dtype == torch.bfloat16
            assert not any(".gate_up_proj" in n or n.endswith("experts.down_proj") for n in out), "fused names"
    # Per-tensor: in every fused group, the member with the largest absmax reaches exactly +-448.
    if weight == "per-tensor":
        groups: dict[str, float] = {}
        for name, t in out.items():
            if t.dtype == FP8:
                key = group_key(name, True)
                groups[key] = max(groups.get(key, 0.0), float(t.to(torch.float32).abs().max()))
        assert groups and all(v == FP8_MAX for v in groups.values()), groups


def expected_quantization_config(fmt: str, weight: str, ignored: list[str]) -> dict:
    if fmt == "fp8":
        return {"quant_method": "fp8", "activation_scheme": "dynamic", "ignored_layers": ignored}
    strategy = {"per-tensor": "tensor", "per-channel": "channel"}[weight]
    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False, "strategy": strategy,
                        "group_size": None, "block_structure": None, "actorder": None, "observer": "minmax"},
            "input_activations": {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": True,
                                  "strategy": "tensor", "group_size": None, "block_structure": None,
                                  "actorder": None, "observer": None},
            "output_activations": None,
            "format": "float-quantized",
        }},
        "ignore": ignored,
        "kv_cache_scheme": None,
        "sparsity_config": {},
        "global_compression_ratio": None,
    }


@pytest.mark.parametrize("fmt,weight", FORMATS, ids=["fp8", "ct-tensor", "ct-channel"])
@pytest.mark.parametrize("variant", MODEL_VARIANTS)
def test_config_side_files_and_index(tiny_models, quantized, variant, fmt, weight):
    src_dir, out_dir = tiny_models[variant], quantized(variant, fmt, weight)
    src_cfg = json.loads((src_dir / "config.json").read_text())
    out_cfg = json.loads((out_dir / "config.json").read_text())
    assert "quantization_config" not in src_cfg
    qc = out_cfg.pop("quantization_config")
    assert out_cfg == src_cfg
    routers = [f"model.layers.{i}.mlp.gate" for i in range(2)] if variant == "qwen3_moe" else []
    assert qc == expected_quantization_config(fmt, weight, ["lm_head", *routers])  # routers listed, kept bf16
    if fmt == "compressed-tensors":
        from compressed_tensors.quantization import QuantizationConfig

        parsed = QuantizationConfig.model_validate(qc)  # the library itself accepts the block
        assert parsed.config_groups["group_0"].weights.strategy == qc["config_groups"]["group_0"]["weights"]["strategy"]

    # Tokenizer, chat template and generation config: copied byte for byte.
    side = {p.name for p in src_dir.iterdir()
            if p.is_file() and not p.name.endswith(".safetensors") and p.name not in
            ("config.json", "model.safetensors.index.json")}
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"} <= side
    for name in side:
        assert (out_dir / name).read_bytes() == (src_dir / name).read_bytes(), name

    # Index: covers every stored tensor, each in the file it names; no unlisted shard.
    index = json.loads((out_dir / "model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    stored: dict[str, str] = {}
    shards = sorted(p.name for p in out_dir.glob("*.safetensors"))
    assert len(shards) == NUM_LAYERS + 1, shards  # one shard per decoder layer plus the rest
    for shard in shards:
        with safe_open(out_dir / shard, framework="pt") as f:
            for key in f.keys():
                stored[key] = shard
    assert weight_map == stored
    assert set(weight_map.values()) == set(shards)
    assert all((out_dir / f).is_file() for f in weight_map.values())
    assert index["metadata"]["total_size"] >= sum(t.numel() * t.element_size()
                                                  for t in read_tensors(out_dir).values())
    assert not [p.name for p in out_dir.iterdir() if p.name.startswith(".")], "temporary files left behind"


IGNORE_CASES = {
    # arch: (ignore_layers, modules that must stay in high precision). Each ignores whole what
    # vLLM fuses (q/k/v, gate/up, a layer's experts); splitting one is refused (test_config).
    "llama": (["lm_head", "model.layers.0.self_attn.o_proj", r"re:.*\.mlp\.down_proj", "model.layers.1.self_attn"],
              {"model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj",
               *(f"model.layers.1.self_attn.{p}_proj" for p in "qkvo")}),
    "qwen3_moe": (["lm_head", "model.layers.0.self_attn.o_proj", r"re:model\.layers\.1\.mlp\.experts\..*"],
                  {"model.layers.0.self_attn.o_proj",
                   *(f"model.layers.1.mlp.experts.{e}.{p}" for e in range(12) for p in ("gate_proj", "up_proj",
                                                                                         "down_proj"))}),
}


@pytest.mark.parametrize("fmt", ["fp8", "compressed-tensors"])
@pytest.mark.parametrize("arch", sorted(IGNORE_CASES))
def test_ignore_layers(tiny_models, tmp_path, arch, fmt):
    patterns, ignored = IGNORE_CASES[arch]
    out_dir = tmp_path / "out"
    run_job(make_config(tiny_models[arch], out_dir, save_name=fmt, ignore_layers=patterns))
    out = check_quantized_output(tiny_models[arch], out_dir, fmt, "per-tensor", ignored_modules=ignored)
    for module in ignored:
        assert out[f"{module}.weight"].dtype == torch.bfloat16 and f"{module}.weight_scale" not in out, module
    # Something next to each ignored module is still quantized (the patterns are not too broad).
    assert out["model.layers.0.self_attn.v_proj.weight"].dtype == FP8
    qc = json.loads((out_dir / "config.json").read_text())["quantization_config"]
    listed = qc["ignored_layers"] if fmt == "fp8" else qc["ignore"]
    assert "lm_head" in listed and ignored <= set(listed), listed
    assert not any(m.endswith(("v_proj", "up_proj")) and m.startswith("model.layers.0.") for m in listed), listed


def test_lm_head_kept_even_if_not_listed(tiny_models, tmp_path):
    out_dir = tmp_path / "out"
    run_job(make_config(tiny_models["llama"], out_dir, ignore_layers=["model.layers.0.mlp.down_proj"]))
    out = read_tensors(out_dir)
    assert out["lm_head.weight"].dtype == torch.bfloat16 and "lm_head.weight_scale" not in out
    assert out["model.layers.0.mlp.down_proj.weight"].dtype == torch.bfloat16
    assert "lm_head" in json.loads((out_dir / "config.json").read_text())["quantization_config"]["ignored_layers"]


def _poison(model_dir: Path, tensor: str, value: float) -> None:
    """Set one element of `tensor` (in whatever shard holds it) to `value`, in place."""
    from safetensors.torch import load_file, save_file

    for file in model_dir.glob("*.safetensors"):
        tensors = load_file(file)
        if tensor in tensors:
            tensors[tensor].view(-1)[7] = value
            save_file(tensors, file, metadata={"format": "pt"})
            return
    raise AssertionError(f"{tensor} not found")


def _looks_complete(out_dir: Path) -> bool:
    return out_dir.exists() and ((out_dir / "config.json").exists()
                                 or (out_dir / "model.safetensors.index.json").exists())


@pytest.mark.parametrize("tensor,value", [("model.layers.1.mlp.up_proj.weight", math.nan),
                                          ("model.layers.0.self_attn.k_proj.weight", math.inf),
                                          ("model.layers.1.mlp.experts.10.down_proj.weight", math.nan)])
def test_nan_or_inf_weight_fails_naming_the_tensor(tiny_models, tmp_path, tensor, value):
    arch = "qwen3_moe" if ".experts." in tensor else "llama"
    src = copy_model(tiny_models[arch], tmp_path / "src")
    _poison(src, tensor, value)
    out_dir = tmp_path / "out"
    with pytest.raises(CheckpointError, match=re.escape(tensor)):
        run_job(make_config(src, out_dir))
    assert not _looks_complete(out_dir)


def test_nan_weight_cli_exit_code(tiny_models, tmp_path, capsys):
    src = copy_model(tiny_models["qwen2"], tmp_path / "src")
    tensor = "model.layers.1.self_attn.o_proj.weight"
    _poison(src, tensor, math.nan)
    out_dir = tmp_path / "out"
    cfg = write_yaml(tmp_path / "job.yaml", make_config(src, out_dir))
    rc = cli_main(["quantize", "-c", str(cfg), "-q"])
    err = capsys.readouterr().err
    assert rc == 1
    assert f"streamq: error: tensor '{tensor}' contains NaN or Inf" in err
    assert not _looks_complete(out_dir)
