"""Non-finite or floor-level activation statistics stop the run before the layer is written,
naming layer, module, value and a remedy."""

from __future__ import annotations

import pytest
import torch
from conftest import make_config, run_job
from safetensors.torch import load_file, save_file

from streamq.calib.checks import check_activation_stats
from streamq.errors import CheckpointError
from streamq.testing.arch_matrix import build_arch_model


@pytest.mark.parametrize("value,match", [
    (float("inf"), r"layer 3: .*'model\.layers\.3\.mlp\.down_proj' has absmax inf.*not finite.*ignore_layers"),
    (float("nan"), r"'model\.layers\.3\.mlp\.down_proj' has absmax nan"),
    (0.0, r"'model\.layers\.3\.mlp\.down_proj' has absmax 0: it received only zeros.*calibration data"),
])
def test_bad_statistic_is_named(value, match):
    stats = {"model.layers.3.self_attn.q_proj": torch.tensor(2.5),
             "model.layers.3.mlp.down_proj": torch.tensor(value)}
    with pytest.raises(CheckpointError, match=match):
        check_activation_stats(3, stats)


def test_float16_overflow_names_the_dtype():
    with pytest.raises(CheckpointError, match="float16 overflows.*bfloat16"):
        check_activation_stats(0, {"q": torch.tensor(float("inf"), dtype=torch.float16)}, torch.float16)


def test_healthy_statistics_pass():
    check_activation_stats(0, {"q": torch.tensor(1e-3), "k": torch.tensor(300.0)})
    check_activation_stats(0, {})
    check_activation_stats(0, None)


@pytest.mark.parametrize("edit,match", [
    (lambda e: e.fill_(float("inf")), r"layer 0: .*'model\.layers\.0\.[a-z_.]+' has absmax nan"),
    (lambda e: e.zero_(), r"layer 0: .*'model\.layers\.0\.[a-z_.]+' has absmax 0: it received only zeros"),
])
def test_run_stops_before_writing_the_layer(tmp_path, edit, match):
    model = build_arch_model("llama", tmp_path / "m")
    tensors = load_file(model / "model.safetensors")
    edit(tensors["model.embed_tokens.weight"])
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=match):
        run_job(make_config(model, out, algorithm="fp8_static", num_samples=2, max_seq_length=16, batch_size=2))
    assert not (out / "config.json").exists()
    assert not list(out.glob("model-00001-*.safetensors"))
