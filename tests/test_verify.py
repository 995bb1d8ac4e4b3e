"""`streamq verify`: clean outputs pass; each kind of damage is reported, naming file and tensor."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from streamq.cli import main as cli_main
from streamq.config import parse_config
from streamq.engine.run import quantize
from streamq.testing.tiny_models import CALIB_FILE, build_tiny_model
from streamq.verify import verify_checkpoint

INDEX = "model.safetensors.index.json"
# (arch, algorithm, save_name, weight granularity): the formats and schemes streamq writes.
JOBS = {
    "llama-dynamic-fp8": ("llama", "fp8_dynamic", "fp8", "per-tensor"),
    "moe-static-fp8": ("qwen3_moe", "fp8_static", "fp8", "per-tensor"),
    "qwen3-static-ct": ("qwen3", "fp8_static", "compressed-tensors", "per-tensor"),
    "qwen2-dynamic-ct-channel": ("qwen2", "fp8_dynamic", "compressed-tensors", "per-channel"),
}
LAYER0_SHARD = "model-00001-of-00003.safetensors"


def job_config(model: Path, out: Path, algorithm: str, save_name: str, weight: str) -> dict:
    cfg = {
        "global": {"save_path": str(out), "device": "cpu"},
        "model": {"model_path": str(model)},
        "compression": {"name": "PTQ", "quantization": {
            "name": algorithm, "bits": 8, "save_name": save_name,
            "quant_method": {"weight": weight, "activation": "per-tensor"}}},
    }
    if algorithm == "fp8_static":
        cfg["dataset"] = {"name": "TextDataset", "data_path": str(CALIB_FILE), "max_seq_length": 32,
                          "num_samples": 4, "batch_size": 2}
    return cfg


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """job name -> (source checkpoint, quantized output); read-only for tests."""
    root = tmp_path_factory.mktemp("verify")
    models: dict[str, Path] = {}
    result = {}
    for name, (arch, algorithm, save_name, weight) in JOBS.items():
        if arch not in models:
            models[arch] = build_tiny_model(arch, root / f"model-{arch}")
        out = root / f"out-{name}"
        quantize(parse_config(job_config(models[arch], out, algorithm, save_name, weight)), show_progress=False)
        result[name] = (models[arch], out)
    return result


def damaged(outputs, name: str, tmp_path: Path) -> tuple[Path, Path]:
    source, out = outputs[name]
    copy = tmp_path / "damaged"
    shutil.copytree(out, copy)
    return source, copy


def rewrite_shard(out: Path, file: str, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(str(out / file))
    change(tensors)
    save_file(tensors, str(out / file), metadata={"format": "pt"})


def problems(out: Path, source: Path | None = None) -> list[str]:
    return [str(p) for p in verify_checkpoint(out, source).problems]


def assert_reported(lines: list[str], *needles: str) -> None:
    assert any(all(n in line for n in needles) for line in lines), f"no problem mentions {needles}: {lines}"


# ----------------------------------------------------------------------------- clean outputs


@pytest.mark.parametrize("name", sorted(JOBS))
def test_clean_output_passes(outputs, name, capsys):
    source, out = outputs[name]
    assert problems(out, source) == []
    assert cli_main(["verify", str(out), "--source", str(source)]) == 0
    assert "ok" in capsys.readouterr().out


def test_json_output(outputs, capsys):
    source, out = outputs["moe-static-fp8"]
    assert cli_main(["verify", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["ok"] is True and result["problems"] == []
    assert result["format"] == "fp8 float8 per-tensor (static)"
    # 2 layers x (4 attention + 12 experts x 3) Linears
    assert result["quantized_linears"] == 2 * (4 + 12 * 3)


# ----------------------------------------------------------------------------- damage


def test_tensor_deleted_from_shard(outputs, tmp_path, capsys):
    source, out = damaged(outputs, "llama-dynamic-fp8", tmp_path)
    name = "model.layers.0.mlp.down_proj.weight_scale"
    rewrite_shard(out, LAYER0_SHARD, lambda t: t.pop(name))
    lines = problems(out, source)
    assert_reported(lines, LAYER0_SHARD, name, "does not contain it")
    assert_reported(lines, "model.layers.0.mlp.down_proj.weight", "no weight_scale")
    assert cli_main(["verify", str(out)]) == 1
    assert name in capsys.readouterr().out


def test_source_tensor_missing_from_output_and_index(outputs, tmp_path):
    source, out = damaged(outputs, "llama-dynamic-fp8", tmp_path)
    name = "model.layers.1.post_attention_layernorm.weight"
    index = json.loads((out / INDEX).read_text())
    file = index["weight_map"].pop(name)
    (out / INDEX).write_text(json.dumps(index))
    rewrite_shard(out, file, lambda t: t.pop(name))
    # Index and shard agree, so only the recorded sizes give it away without the source.
    assert all("total_size" in p or "streamq_run.json" in p for p in problems(out))
    assert_reported(problems(out, source), name, "missing from the output")


@pytest.mark.parametrize("value", [float("nan"), 0.0, float("inf"), -1.0])
def test_bad_scale_value(outputs, tmp_path, value):
    source, out = damaged(outputs, "moe-static-fp8", tmp_path)
    name = "model.layers.0.mlp.experts.7.up_proj.input_scale"
    rewrite_shard(out, LAYER0_SHARD, lambda t: t.__setitem__(name, torch.full_like(t[name], value)))
    assert_reported(problems(out), LAYER0_SHARD, name, "finite and > 0")


def test_bad_per_channel_scale_row(outputs, tmp_path):
    source, out = damaged(outputs, "qwen2-dynamic-ct-channel", tmp_path)
    name = "model.layers.0.self_attn.q_proj.weight_scale"

    def poison(t):
        t[name] = t[name].clone()
        t[name][3, 0] = 0.0

    rewrite_shard(out, LAYER0_SHARD, poison)
    assert_reported(problems(out), name, "found 0.0", "1 of 64 values")


def test_truncated_shard(outputs, tmp_path):
    source, out = damaged(outputs, "llama-dynamic-fp8", tmp_path)
    path = out / LAYER0_SHARD
    path.write_bytes(path.read_bytes()[:-100])
    lines = problems(out, source)
    assert_reported(lines, LAYER0_SHARD, "truncated")
    assert not any("missing from the output" in line for line in lines), "a broken shard is reported once"


def test_missing_shard(outputs, tmp_path):
    source, out = damaged(outputs, "llama-dynamic-fp8", tmp_path)
    (out / LAYER0_SHARD).unlink()
    assert_reported(problems(out), LAYER0_SHARD, "but missing")


def test_index_entry_points_at_missing_file(outputs, tmp_path):
    source, out = damaged(outputs, "llama-dynamic-fp8", tmp_path)
    index = json.loads((out / INDEX).read_text())
    name = "model.layers.1.self_attn.q_proj.weight"
    index["weight_map"][name] = "model-00009-of-00003.safetensors"
    (out / INDEX).write_text(json.dumps(index))
    lines = problems(out)
    assert_reported(lines, "model-00009-of-00003.safetensors", "missing")
    assert_reported(lines, "model-00002-of-00003.safetensors", name, "maps it to 'model-00009")


def test_index_total_size_wrong(outputs, tmp_path):
    source, out = damaged(outputs, "llama-dynamic-fp8", tmp_path)
    index = json.loads((out / INDEX).read_text())
    index["metadata"]["total_size"] += 1
    (out / INDEX).write_text(json.dumps(index))
    assert_reported(problems(out), INDEX, "total_size")


def test_index_not_json(outputs, tmp_path):
    source, out = damaged(outputs, "llama-dynamic-fp8", tmp_path)
    (out / INDEX).write_text("{")
    assert_reported(problems(out), INDEX, "not a valid safetensors index")


def test_stray_shard(outputs, tmp_path):
    source, out = damaged(outputs, "llama-dynamic-fp8", tmp_path)
    shutil.copy(out / LAYER0_SHARD, out / "model-00001-of-00009.safetensors")
    assert_reported(problems(out), "model-00001-of-00009.safetensors", "not listed")


def test_unfinished_manifest(outputs, tmp_path):
    source, out = damaged(outputs, "llama-dynamic-fp8", tmp_path)
    manifest = json.loads((out / "streamq_run.json").read_text())
    manifest["status"] = "running"
    (out / "streamq_run.json").write_text(json.dumps(manifest))
    assert_reported(problems(out), "streamq_run.json", "run did not finish")


def test_missing_config(outputs, tmp_path):
    source, out = damaged(outputs, "llama-dynamic-fp8", tmp_path)
    (out / "config.json").unlink()
    assert_reported(problems(out), "config.json", "missing")


def edit_config(out, change) -> None:
    """Rewrite the output's config.json after `change(config_dict)`."""
    config = json.loads((out / "config.json").read_text())
    change(config)
    (out / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("change, needle", [
    (lambda qc: qc.pop("activation_scheme"), "activation_scheme"),
    (lambda qc: qc.update(activation_scheme="dynamic"), "dynamic activations, but an input_scale is stored"),
    (lambda qc: qc.update(quant_method="hqq"), "quant_method is 'hqq'"),
    (lambda qc: qc.update(ignored_layers="lm_head"), "ignored_layers must be a list"),
    (lambda qc: qc.update(ignored_layers=["model.layers.0.self_attn.q_proj"]), "lists it as ignored"),
])
def test_wrong_fp8_config_block(outputs, tmp_path, change, needle):
    source, out = damaged(outputs, "moe-static-fp8", tmp_path)
    edit_config(out, lambda config: change(config["quantization_config"]))
    assert_reported(problems(out), needle)


@pytest.mark.parametrize("change, needle", [
    (lambda qc: qc.update(format="pack-quantized"), "format is 'pack-quantized'"),
    (lambda qc: qc["config_groups"]["group_0"]["weights"].update(num_bits=4), "num_bits 8"),
    (lambda qc: qc["config_groups"]["group_0"]["input_activations"].update(dynamic=True),
     "dynamic activations, but an input_scale is stored"),
    (lambda qc: qc.update(config_groups={}), "config_groups must be a non-empty mapping"),
])
def test_wrong_compressed_tensors_block(outputs, tmp_path, change, needle):
    source, out = damaged(outputs, "qwen3-static-ct", tmp_path)
    edit_config(out, lambda config: change(config["quantization_config"]))
    assert_reported(problems(out), needle)


def test_no_quantization_config(outputs, tmp_path):
    source, out = damaged(outputs, "llama-dynamic-fp8", tmp_path)
    edit_config(out, lambda config: config.pop("quantization_config"))
    assert_reported(problems(out), "config.json", "no quantization_config")


def test_config_changed_against_source(outputs, tmp_path):
    source, out = damaged(outputs, "llama-dynamic-fp8", tmp_path)
    edit_config(out, lambda config: config.update(rope_theta=1.0))
    assert problems(out) == []
    assert_reported(problems(out, source), "config.json", "differs from the source", "rope_theta")


def test_static_linear_without_input_scale(outputs, tmp_path):
    source, out = damaged(outputs, "moe-static-fp8", tmp_path)
    name = "model.layers.0.self_attn.o_proj.input_scale"
    index = json.loads((out / INDEX).read_text())
    del index["weight_map"][name]
    (out / INDEX).write_text(json.dumps(index))
    rewrite_shard(out, LAYER0_SHARD, lambda t: t.pop(name))
    assert_reported(problems(out), "model.layers.0.self_attn.o_proj.weight", "no input_scale")


def test_scale_with_wrong_shape_and_dtype(outputs, tmp_path):
    source, out = damaged(outputs, "llama-dynamic-fp8", tmp_path)
    name = "model.layers.0.self_attn.k_proj.weight_scale"
    rewrite_shard(out, LAYER0_SHARD, lambda t: t.__setitem__(name, torch.ones(2, dtype=torch.float16)))
    assert_reported(problems(out), name, "is F16 [2]", "expected F32")


def test_quantized_weight_not_fp8(outputs, tmp_path):
    source, out = damaged(outputs, "llama-dynamic-fp8", tmp_path)
    name = "model.layers.1.mlp.up_proj.weight"
    rewrite_shard(out, "model-00002-of-00003.safetensors",
                  lambda t: t.__setitem__(name, t[name].to(torch.bfloat16)))
    assert_reported(problems(out), name, "BF16", "must be F8_E4M3")


def test_missing_expert(outputs, tmp_path):
    source, out = damaged(outputs, "moe-static-fp8", tmp_path)
    prefix = "model.layers.1.mlp.experts.5."
    index = json.loads((out / INDEX).read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if not k.startswith(prefix)}
    (out / INDEX).write_text(json.dumps(index))
    rewrite_shard(out, "model-00002-of-00003.safetensors",
                  lambda t: [t.pop(k) for k in list(t) if k.startswith(prefix)])
    lines = problems(out, source)
    assert_reported(lines, "1 of 12 experts missing", "model.layers.1.mlp.experts", ": 5")
    assert_reported(lines, f"{prefix}gate_proj.weight", "missing from the output")


def test_extra_and_changed_tensors_against_source(outputs, tmp_path):
    source, out = damaged(outputs, "llama-dynamic-fp8", tmp_path)
    index = json.loads((out / INDEX).read_text())
    index["weight_map"]["model.layers.0.extra.weight"] = LAYER0_SHARD
    (out / INDEX).write_text(json.dumps(index))
    norm = "model.layers.0.input_layernorm.weight"

    def change(t):
        t["model.layers.0.extra.weight"] = torch.zeros(3)
        t[norm] = t[norm].float()

    rewrite_shard(out, LAYER0_SHARD, change)
    lines = problems(out, source)
    assert_reported(lines, "model.layers.0.extra.weight", "extra tensor")
    assert_reported(lines, norm, "F32", "the source BF16")
    assert problems(out, source) != problems(out)  # the source comparison found more


def test_not_a_directory(tmp_path):
    assert_reported(problems(tmp_path / "nope"), "not a directory")
    assert cli_main(["verify", str(tmp_path / "nope")]) == 1
