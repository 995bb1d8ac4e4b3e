"""Synthetic checkpoints match what transformers builds for the same config."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

from streamq.testing.synthetic import GEOMETRIES, build_config, tensor_specs, write_synthetic


def _hf_config(cfg: dict):
    """The transformers config object for our config.json dict."""
    kwargs = {k: v for k, v in cfg.items() if k != "model_type"}
    return AutoConfig.for_model(cfg["model_type"], **kwargs)


def _meta_disk_layout(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Names and shapes transformers expects on disk, from a model built on the meta device.

    transformers v5 fuses the experts in memory (gate_up_proj [E, 2I, H], down_proj [E, H, I]);
    checkpoints store one tensor per expert and projection, so unfuse the names here.
    """
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(_hf_config(cfg))
    layout: dict[str, tuple[int, ...]] = {}
    for name, param in model.state_dict().items():
        shape = tuple(param.shape)
        prefix = name.rsplit(".", 1)[0]
        if name.endswith("mlp.experts.gate_up_proj"):
            experts, two_inter, hidden = shape
            for e in range(experts):
                layout[f"{prefix}.{e}.gate_proj.weight"] = (two_inter // 2, hidden)
                layout[f"{prefix}.{e}.up_proj.weight"] = (two_inter // 2, hidden)
        elif name.endswith("mlp.experts.down_proj"):
            experts, hidden, inter = shape
            for e in range(experts):
                layout[f"{prefix}.{e}.down_proj.weight"] = (hidden, inter)
        else:
            layout[name] = shape
    return layout


@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_names_and_shapes_match_transformers(geometry: str) -> None:
    cfg = build_config(geometry, layers=2)
    ours = dict(tensor_specs(cfg))
    assert len(ours) == len(tensor_specs(cfg)), "duplicate tensor names"
    theirs = _meta_disk_layout(cfg)
    assert sorted(set(ours) ^ set(theirs)) == []
    assert {n: s for n, s in ours.items() if theirs[n] != s} == {}


@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_config_reads_back_as_the_real_model(geometry: str) -> None:
    cfg = build_config(geometry, layers=2)
    hf = _hf_config(cfg)
    assert hf.num_hidden_layers == 2
    assert hf.architectures == cfg["architectures"]
    for key in ("hidden_size", "num_attention_heads", "num_key_value_heads", "vocab_size",
                "intermediate_size", "rms_norm_eps", "tie_word_embeddings"):
        assert getattr(hf, key) == cfg[key], key
    assert hf.rope_parameters["rope_theta"] == cfg["rope_theta"]
    if "num_experts" in cfg:
        assert (hf.num_experts, hf.num_experts_per_tok) == (cfg["num_experts"], cfg["num_experts_per_tok"])
        assert hf.moe_intermediate_size == cfg["moe_intermediate_size"]
    assert all(i < cfg["vocab_size"] for i in (cfg["bos_token_id"], cfg["eos_token_id"]))


# The published dimensions the geometries must keep.
REAL = {
    "qwen3-235b-a22b": dict(hidden_size=4096, num_hidden_layers=94, num_attention_heads=64,
                            num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
                            moe_intermediate_size=1536, intermediate_size=12288, vocab_size=151936),
    "qwen3-30b-a3b": dict(hidden_size=2048, num_hidden_layers=48, num_attention_heads=32,
                          num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
                          moe_intermediate_size=768, intermediate_size=6144, vocab_size=151936),
    "qwen2.5-7b": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, intermediate_size=18944, vocab_size=152064),
    "tiny-moe": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                     head_dim=32, num_experts=16, num_experts_per_tok=4, moe_intermediate_size=128,
                     vocab_size=1024, model_type="qwen3_moe"),
    "tiny-dense": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                       head_dim=32, vocab_size=1024, model_type="qwen3"),
}


@pytest.mark.parametrize("geometry", sorted(REAL))
def test_geometries_keep_published_dimensions(geometry: str) -> None:
    cfg = GEOMETRIES[geometry]
    assert {k: cfg[k] for k in REAL[geometry]} == REAL[geometry]
    assert cfg["tie_word_embeddings"] is False and cfg["torch_dtype"] == "bfloat16"


def test_vocab_override_keeps_token_ids_inside() -> None:
    cfg = build_config("qwen3-235b-a22b", layers=1, vocab_size=4096)
    assert cfg["vocab_size"] == 4096
    assert cfg["bos_token_id"] != cfg["eos_token_id"]
    assert max(cfg["bos_token_id"], cfg["eos_token_id"]) < 4096
    assert dict(tensor_specs(cfg))["model.embed_tokens.weight"] == (4096, 4096)


def test_tiny_moe_loads_and_runs(tmp_path) -> None:
    # A ~2 MB shard limit forces several shards, as real checkpoints have.
    out = write_synthetic("tiny-moe", tmp_path / "ckpt", layers=2, seed=3, shard_size_gb=0.002,
                          log=lambda _: None)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    specs = dict(tensor_specs(json.loads((out / "config.json").read_text())))
    assert set(index["weight_map"]) == set(specs)
    assert index["metadata"]["total_size"] == sum(math.prod(s) * 2 for s in specs.values())
    with safe_open(out / files[0], framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        weight = f.get_tensor(next(iter(f.keys())))
    assert weight.dtype == torch.bfloat16 and weight.float().std() > 0

    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    assert model.dtype == torch.bfloat16
    experts = model.model.layers[1].mlp.experts
    with safe_open(out / index["weight_map"]["model.layers.1.mlp.experts.5.up_proj.weight"], "pt") as f:
        up = f.get_tensor("model.layers.1.mlp.experts.5.up_proj.weight")
    assert torch.equal(experts.gate_up_proj[5, up.shape[0]:], up)  # unfused disk -> fused memory

    with torch.no_grad():
        logits = model(torch.arange(16).unsqueeze(0)).logits
    assert logits.shape == (1, 16, 1024) and torch.isfinite(logits).all()


def test_same_seed_same_bytes_and_scales(tmp_path) -> None:
    a = write_synthetic("tiny-dense", tmp_path / "a", layers=1, seed=7, log=lambda _: None)
    b = write_synthetic("tiny-dense", tmp_path / "b", layers=1, seed=7, log=lambda _: None)
    c = write_synthetic("tiny-dense", tmp_path / "c", layers=1, seed=8, log=lambda _: None)
    shard = "model-00001-of-00001.safetensors"
    assert (a / shard).read_bytes() == (b / shard).read_bytes()
    assert (a / shard).read_bytes() != (c / shard).read_bytes()
    with safe_open(a / shard, framework="pt") as f:
        q = f.get_tensor("model.layers.0.self_attn.q_proj.weight").float()
        norm = f.get_tensor("model.layers.0.input_layernorm.weight").float()
    assert q.std().item() == pytest.approx(1 / math.sqrt(256), rel=0.1)
    assert norm.mean().item() == pytest.approx(1.0, abs=0.02) and norm.std() > 0
    assert not torch.equal(q[0], q[1])  # tiling must not repeat rows
