"""The seed's configs run unchanged: a model placed at their model_path, data at their data_path."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

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
