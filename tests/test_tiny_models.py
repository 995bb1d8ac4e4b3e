"""Tiny checkpoints: realistic on-disk layout, load back in transformers, deterministic."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from streamq.testing.tiny_models import ARCHS, build_tiny_model

NUM_EXPERTS = 12


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: build_tiny_model(arch, root / arch) for arch in ARCHS}


def disk_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def logits(model_dir: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    text = tok.apply_chat_template([{"role": "user", "content": "Sort a list."}], tokenize=False)
    ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
    with torch.no_grad():
        return model(input_ids=ids).logits


def file_digests(model_dir: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(model_dir.iterdir())}


@pytest.mark.parametrize("arch", ARCHS)
def test_loads_back_and_runs_forward(built, arch):
    model = AutoModelForCausalLM.from_pretrained(built[arch])
    assert model.config.model_type == arch
    assert model.dtype == torch.bfloat16
    out = logits(built[arch])
    assert out.shape[-1] == 512 and out.shape[1] > 5
    assert torch.isfinite(out).all() and out.float().std() > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_shapes_and_bf16_nontrivial_weights(built, arch):
    config = AutoConfig.from_pretrained(built[arch])
    assert (config.hidden_size, config.num_attention_heads, config.num_key_value_heads) == (64, 4, 2)
    assert config.num_hidden_layers == 2 and config.max_position_embeddings == 512
    assert config.hidden_size // config.num_attention_heads == getattr(config, "head_dim", 16) == 16
    for name, tensor in disk_tensors(built[arch]).items():
        assert tensor.dtype == torch.bfloat16, name
        values = tensor.float()
        assert values.std() > 0, f"{name} is constant"
        if name.endswith("norm.weight"):
            assert (values.mean() - 1).abs() < 0.05, name
        else:
            assert values.abs().mean() < 0.05 and values.abs().max() > 0, name


def test_attention_biases_only_in_qwen2(built):
    for arch in ARCHS:
        biases = [k for k in disk_tensors(built[arch]) if k.endswith(".bias")]
        if arch == "qwen2":
            assert sorted(biases) == sorted(
                f"model.layers.{i}.self_attn.{p}_proj.bias" for i in range(2) for p in "qkv"
            )
        else:
            assert biases == []


def test_embedding_tying(built):
    assert "lm_head.weight" not in disk_tensors(built["qwen3"])
    assert AutoConfig.from_pretrained(built["qwen3"]).tie_word_embeddings
    for arch in ("llama", "qwen2", "qwen3_moe"):
        assert "lm_head.weight" in disk_tensors(built[arch])
        assert not AutoConfig.from_pretrained(built[arch]).tie_word_embeddings


def test_moe_experts_are_unfused_on_disk(built):
    tensors = disk_tensors(built["qwen3_moe"])
    assert not [k for k in tensors if "gate_up_proj" in k or k.endswith("experts.down_proj")]
    for layer in range(2):
        prefix = f"model.layers.{layer}.mlp."
        experts = {k[len(prefix) :] for k in tensors if k.startswith(prefix + "experts.")}
        assert experts == {f"experts.{e}.{p}_proj.weight" for e in range(NUM_EXPERTS) for p in ("gate", "up", "down")}
        assert tensors[f"{prefix}experts.3.gate_proj.weight"].shape == (32, 64)
        assert tensors[f"{prefix}experts.3.down_proj.weight"].shape == (64, 32)
        assert tensors[f"{prefix}gate.weight"].shape == (NUM_EXPERTS, 64)
    config = AutoConfig.from_pretrained(built["qwen3_moe"])
    assert (config.num_experts, config.num_experts_per_tok, config.norm_topk_prob) == (12, 2, True)


def test_moe_fused_in_memory_matches_unfused_disk_order(built):
    """Expert e on disk is row e of the fused tensor (natural, not lexicographic order)."""
    tensors = disk_tensors(built["qwen3_moe"])
    state = AutoModelForCausalLM.from_pretrained(built["qwen3_moe"]).state_dict()
    gate_up = state["model.layers.1.mlp.experts.gate_up_proj"]
    down = state["model.layers.1.mlp.experts.down_proj"]
    for e in range(NUM_EXPERTS):
        prefix = f"model.layers.1.mlp.experts.{e}."
        fused = torch.cat([tensors[prefix + "gate_proj.weight"], tensors[prefix + "up_proj.weight"]])
        assert torch.equal(gate_up[e], fused)
        assert torch.equal(down[e], tensors[prefix + "down_proj.weight"])


@pytest.mark.parametrize("arch", ARCHS)
def test_tokenizer_and_generation_config_match_model_config(built, arch):
    config = AutoConfig.from_pretrained(built[arch])
    tok = AutoTokenizer.from_pretrained(built[arch])
    gen = GenerationConfig.from_pretrained(built[arch])
    assert len(tok) == config.vocab_size == 512
    ids = (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    assert ids == (config.bos_token_id, config.eos_token_id, config.pad_token_id)
    assert ids == (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id)
    assert len(set(ids)) == 3
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|begin_of_text|><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_same_seed_same_bytes_other_seed_other_weights(built, tmp_path):
    again = build_tiny_model("qwen3_moe", tmp_path / "again")
    assert file_digests(again) == file_digests(built["qwen3_moe"])
    other = build_tiny_model("qwen3_moe", tmp_path / "other", seed=1, with_tokenizer=False)
    assert not (other / "tokenizer.json").exists()
    assert file_digests(other)["model.safetensors"] != file_digests(again)["model.safetensors"]


def test_num_layers(tmp_path):
    model_dir = build_tiny_model("llama", tmp_path / "m", num_layers=3, with_tokenizer=False)
    layers = {int(m.group(1)) for k in disk_tensors(model_dir) if (m := re.match(r"model\.layers\.(\d+)\.", k))}
    assert layers == {0, 1, 2}
    assert AutoConfig.from_pretrained(model_dir).num_hidden_layers == 3


def test_unknown_arch_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown arch 'gpt2'"):
        build_tiny_model("gpt2", tmp_path / "m")


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe"])
def test_split_layer_across_shards(built, tmp_path, arch):
    model_dir = build_tiny_model(arch, tmp_path / "split", split_layer_across_shards=True)
    assert not (model_dir / "model.safetensors").exists()
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    files = sorted(set(weight_map.values()))
    assert len(files) >= 2

    layer_files: dict[int, set[str]] = {}
    for key, file in weight_map.items():
        if m := re.match(r"model\.layers\.(\d+)\.", key):
            layer_files.setdefault(int(m.group(1)), set()).add(file)
    assert any(len(fs) == 2 for fs in layer_files.values()), layer_files

    total = 0
    for file in files:
        with safe_open(model_dir / file, "pt") as f:
            assert f.metadata() == {"format": "pt"}
            assert set(f.keys()) == {k for k, v in weight_map.items() if v == file}
            total += sum(f.get_tensor(k).nbytes for k in f.keys())
    assert index["metadata"]["total_size"] == total

    assert disk_tensors(model_dir).keys() == disk_tensors(built[arch]).keys()
    assert torch.equal(logits(model_dir), logits(built[arch]))
