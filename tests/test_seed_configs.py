"""The seed's configs run unchanged: a model placed at their model_path, data at their data_path."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import read_tensors

from streamq.cli import main
from streamq.testing.tiny_models import CALIB_FILE, build_tiny_model

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("config,model_arch", [
    ("configs/qwen3/fp8_static/qwen3-a22b_fp8_static_low_memory.yaml", "qwen3_moe"),
    ("configs/qwen2_5/fp8_static/qwen2_5-7b_instruct_fp8_static.yaml", "qwen2"),
    ("configs/qwen2_5/fp8_dynamic/qwen2_5-7b_instruct_fp8_dynamic.yaml", "qwen2"),
])
def test_seed_config_runs_unchanged(tmp_path, monkeypatch, config, model_arch):
    import yaml

    raw = yaml.safe_load((REPO / config).read_text())
    build_tiny_model(model_arch, tmp_path / raw["model"]["model_path"], num_layers=2)
    if "dataset" in raw:
        data = tmp_path / raw["dataset"]["data_path"]
        data.parent.mkdir(parents=True)
        shutil.copyfile(CALIB_FILE, data)
    monkeypatch.chdir(tmp_path)
    assert main(["quantize", "-c", str(REPO / config), "-q"]) == 0
    out = tmp_path / raw["global"]["save_path"]
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "fp8"
    assert qc["activation_scheme"] == ("static" if "fp8_static" in config else "dynamic")
    assert "lm_head" in qc["ignored_layers"]
    assert os.path.isfile(out / "model.safetensors.index.json")


@pytest.mark.parametrize("config,model_arch,quant_method,fmt", [
    ("configs/qwen3/int8_dynamic/qwen3-a22b_int8_dynamic.yaml", "qwen3_moe", "compressed-tensors", "int-quantized"),
    ("configs/qwen3/smooth_int8/qwen3-8b_int8_dynamic_smooth.yaml", "qwen3", "compressed-tensors", "int-quantized"),
    ("configs/qwen3/fp8_blockwise/qwen3-a22b_fp8_blockwise.yaml", "qwen3_moe", "fp8", None),
])
def test_plugin_scheme_configs_run_unchanged(tmp_path, monkeypatch, config, model_arch, quant_method, fmt):
    """The shipped int8_dynamic / SmoothQuant / fp8_blockwise configs (AngelSlim's shapes,
    `PTQWeightOnly` and `num_workers` included) parse and run as they are."""
    import yaml

    from streamq.config import load_config
    from streamq.formats import parse_quantization_config

    raw = yaml.safe_load((REPO / config).read_text())
    job = load_config(REPO / config)
    assert job.scheme.name == raw["compression"]["quantization"]["name"]
    build_tiny_model(model_arch, tmp_path / raw["model"]["model_path"], num_layers=2)
    if "dataset" in raw:
        # The config as shipped (256 samples of up to 4096 tokens); the data a few short records,
        # which is what keeps this test fast.
        data = tmp_path / raw["dataset"]["data_path"]
        data.parent.mkdir(parents=True)
        data.write_text("".join(CALIB_FILE.read_text().splitlines(keepends=True)[:6]))
    monkeypatch.chdir(tmp_path)
    assert main(["quantize", "-c", str(REPO / config), "-q"]) == 0
    out = tmp_path / raw["global"]["save_path"]
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == quant_method and qc.get("format") == fmt
    fmt_obj, spec, ignored = parse_quantization_config(qc)
    assert spec == job.scheme.spec and "lm_head" in ignored
    if "smooth" in config:  # the norms were rescaled
        src, written = read_tensors(tmp_path / raw["model"]["model_path"]), read_tensors(out)
        name = "model.layers.0.input_layernorm.weight"
        assert not torch.equal(src[name], written[name])
    assert os.path.isfile(out / "model.safetensors.index.json")


def test_int4_gptq_config_runs_unchanged(tmp_path, monkeypatch):
    """The shipped AngelSlim-style int4_gptq config (group_size 128, the fp8_static dataset
    section) parses and runs as it is, on a tiny MoE whose input sizes 128 divides."""
    import yaml

    from streamq.config import load_config
    from streamq.formats import parse_quantization_config

    config = REPO / "configs/qwen3/int4_gptq/qwen3-a22b_int4_gptq.yaml"
    raw = yaml.safe_load(config.read_text())
    job = load_config(config)
    assert (job.scheme.name, job.scheme.group_size, job.scheme.propagate) == ("int4_gptq", 128, "quantized")
    assert job.quant.ignore_layers == ["lm_head", "model.embed_tokens"]
    sizes = {"hidden_size": 128, "num_attention_heads": 8, "moe_intermediate_size": 128, "intermediate_size": 256}
    build_tiny_model("qwen3_moe", tmp_path / raw["model"]["model_path"], num_layers=2, overrides=sizes)
    data = tmp_path / raw["dataset"]["data_path"]
    data.parent.mkdir(parents=True)
    # The config's 256 samples of up to 4096 tokens; the data the six shortest records (fast).
    data.write_text("".join(sorted(CALIB_FILE.read_text().splitlines(keepends=True), key=len)[:6]))
    monkeypatch.chdir(tmp_path)
    assert main(["quantize", "-c", str(config), "-q"]) == 0
    out = tmp_path / raw["global"]["save_path"]
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["config_groups"]["group_0"]["weights"]["group_size"] == 128
    _, spec, ignored = parse_quantization_config(qc)
    assert spec == job.scheme.spec and "lm_head" in ignored
    written = read_tensors(out)
    assert written["model.layers.1.mlp.experts.11.down_proj.weight_packed"].shape == (128, 128 // 8)
    assert os.path.isfile(out / "model.safetensors.index.json")
