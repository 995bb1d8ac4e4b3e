"""The compressed-tensors output loads in transformers and computes what the bf16 model does.

transformers 5.x hands `quant_method: compressed-tensors` to the compressed-tensors
package. Dense Linears stay quantized modules (FP8 weight + weight_scale, dynamic FP8
activations at run time). Qwen3-MoE experts are fused 3D parameters in transformers v5
and are not `Linear`s: the loader dequantizes our per-expert FP8 tensors into the fused
bf16 `gate_up_proj` / `down_proj` (checked below against our own bytes), so the MoE
model loads and runs, with experts in bf16 compute.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import NUM_LAYERS, read_tensors
from transformers import AutoModelForCausalLM, AutoTokenizer

from streamq.testing.tiny_models import CALIB_FILE

FP8 = torch.float8_e4m3fn

# Tolerance. FP8 e4m3 keeps 3 mantissa bits: each weight (and, dynamically, each activation)
# is rounded with a relative error of at most 2^-4 (6.25%) and about 2-3% RMS. Through two
# decoder layers the logits of these tiny models move by 4-5% (relative Frobenius norm per
# sequence, measured on all four archs, per-tensor and per-channel). 10% leaves a 2x margin,
# and still fails for real breakage: a scale ignored or applied twice, a tensor put in the
# wrong module, or experts loaded without their scales move the logits by far more than that.
MAX_REL_ERR = 0.10
# Quantization must have had an effect: a loader that silently used bf16 weights would match.
MIN_REL_ERR = 1e-3


def _sequences(tokenizer) -> list[torch.Tensor]:
    """Four real chat sequences from the bundled calibration file, 24-64 tokens each."""
    seqs = []
    for line in CALIB_FILE.read_text().splitlines():
        record = json.loads(line)
        if "messages" in record:
            ids = tokenizer.apply_chat_template(record["messages"], tokenize=True, return_dict=True)["input_ids"]
            if len(ids) >= 24:
                seqs.append(torch.tensor([list(ids)[:64]]))
        if len(seqs) == 4:
            return seqs
    raise AssertionError("fewer than 4 chat records of 24+ tokens in the calibration file")


def _logits(model, seqs) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(input_ids=s).logits.float() for s in seqs]


def _load_and_compare(model_dir, quantized_dir, check):
    """Load both models, run `check(model)` on the freshly loaded quantized model (the first
    forward decompresses its Linears in place), then return per-sequence relative logit errors."""
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(quantized_dir)
    check(model)
    seqs = _sequences(AutoTokenizer.from_pretrained(quantized_dir))
    return [float((a - b).norm() / b.norm()) for a, b in zip(_logits(model, seqs), _logits(ref, seqs), strict=True)]


def _check_quantized_linears(model, out_tensors, arch):
    """The attention Linears are compressed-tensors modules holding exactly our FP8 bytes."""
    for i in range(NUM_LAYERS):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            name = f"model.layers.{i}.self_attn.{proj}"
            module = model.get_submodule(name)
            assert getattr(module, "quantization_scheme", None) is not None, f"{name} was not quantized on load"
            assert module.weight.dtype == FP8
            assert torch.equal(module.weight.data.view(torch.uint8), out_tensors[f"{name}.weight"].view(torch.uint8))
            assert torch.allclose(module.weight_scale.data.float().reshape(-1),
                                  out_tensors[f"{name}.weight_scale"].reshape(-1), rtol=2**-7, atol=0)
    assert getattr(model.get_submodule("lm_head") if arch != "qwen3" else model.lm_head,
                   "quantization_scheme", None) is None


@pytest.mark.parametrize("arch,weight", [("llama", "per-tensor"), ("qwen2", "per-tensor"), ("qwen3", "per-tensor"),
                                         ("llama", "per-channel")])
def test_dense_loads_and_matches_bf16(tiny_models, quantized, arch, weight):
    out_dir = quantized(arch, "compressed-tensors", weight)
    out = read_tensors(out_dir)
    errs = _load_and_compare(tiny_models[arch], out_dir, lambda model: _check_quantized_linears(model, out, arch))
    assert all(MIN_REL_ERR < e < MAX_REL_ERR for e in errs), errs


def test_moe_loads_experts_dequantized_and_matches_bf16(tiny_models, quantized):
    out_dir = quantized("qwen3_moe", "compressed-tensors")
    out, src = read_tensors(out_dir), read_tensors(tiny_models["qwen3_moe"])

    def check(model):
        _check_quantized_linears(model, out, "qwen3_moe")
        for i in range(NUM_LAYERS):
            experts = model.get_submodule(f"model.layers.{i}.mlp.experts")
            for e in range(12):
                p = f"model.layers.{i}.mlp.experts.{e}."
                deq = {proj: out[p + proj + ".weight"].float() * out[p + proj + ".weight_scale"]
                       for proj in ("gate_proj", "up_proj", "down_proj")}
                want_gate_up = torch.cat([deq["gate_proj"], deq["up_proj"]])
                got_gate_up, got_down = experts.gate_up_proj[e].float(), experts.down_proj[e].float()
                # Our FP8 values times our scale, up to the bf16 rounding of the loaded parameter.
                assert torch.allclose(got_gate_up, want_gate_up, rtol=2**-7, atol=1e-8), p
                assert torch.allclose(got_down, deq["down_proj"], rtol=2**-7, atol=1e-8), p
                # ... and not simply the original bf16 weights.
                assert not torch.equal(got_down, src[p + "down_proj.weight"].float()), p
            router = model.get_submodule(f"model.layers.{i}.mlp.gate")
            assert torch.equal(router.weight.data, src[f"model.layers.{i}.mlp.gate.weight"])

    errs = _load_and_compare(tiny_models["qwen3_moe"], out_dir, check)
    assert all(MIN_REL_ERR < e < MAX_REL_ERR for e in errs), errs
