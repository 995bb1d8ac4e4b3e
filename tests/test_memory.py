"""Host memory stays at about one layer, not the model: fp8_dynamic over a 24-layer
synthetic checkpoint, measured in a fresh process against a baseline process that only
imports what the engine imports.

Sizing: hidden 512 / intermediate 2048 gives 8.4 MB layers and a 203 MB model, so the
allowed growth (4 x largest layer + 64 MiB = 100 MB) is half the model size: holding the
whole model, or even half of it, fails. (hidden 256 / intermediate 1024 would give a
51 MB model, below the 64 MiB allowance, and the test could not fail.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_config, write_yaml
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
MiB = 2**20

LAYERS, HIDDEN, INTERMEDIATE, HEADS, VOCAB = 24, 512, 2048, 8, 1024
LAYERS_PER_SHARD = 12  # two shards, each holding many layers, as in real releases


def _llama_config() -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "num_key_value_heads": HEADS, "head_dim": HIDDEN // HEADS, "vocab_size": VOCAB,
        "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
    }


def _layer_specs(i: int) -> list[tuple[str, tuple[int, ...]]]:
    p = f"model.layers.{i}."
    return [(p + f"self_attn.{x}_proj.weight", (HIDDEN, HIDDEN)) for x in "qkvo"] + [
        (p + "mlp.gate_proj.weight", (INTERMEDIATE, HIDDEN)), (p + "mlp.up_proj.weight", (INTERMEDIATE, HIDDEN)),
        (p + "mlp.down_proj.weight", (HIDDEN, INTERMEDIATE)),
        (p + "input_layernorm.weight", (HIDDEN,)), (p + "post_attention_layernorm.weight", (HIDDEN,))]


def write_synthetic_llama(out: Path) -> tuple[int, int]:
    """Write the checkpoint shard by shard; returns (model bytes, largest layer bytes)."""
    out.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[("model.embed_tokens.weight", (VOCAB, HIDDEN))]]
    for i in range(LAYERS):
        if i and i % LAYERS_PER_SHARD == 0:
            shards.append([])
        shards[-1] += _layer_specs(i)
    shards[-1] += [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]
    weight_map, total = {}, 0
    for k, specs in enumerate(shards, 1):
        name = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: (torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16) for n, s in specs}
        save_file(tensors, out / name, metadata={"format": "pt"})
        weight_map.update({n: name for n in tensors})
        total += sum(t.numel() * 2 for t in tensors.values())
        del tensors
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(_llama_config()))
    largest = max(sum(2 * torch.Size(s).numel() for _, s in _layer_specs(i)) for i in range(LAYERS))
    return total, largest


# The same measurement the engine reports (peak_host_rss: VmHWM on Linux, which, unlike
# ru_maxrss, does not inherit the RSS of the pytest process that starts the subprocess).
BASELINE = """
import torch, transformers, streamq, streamq.cli, streamq.engine.run
import transformers.models.llama.modeling_llama
from streamq.engine.progress import peak_host_rss
print(peak_host_rss())
"""


@pytest.mark.slow
def test_peak_host_memory_is_about_one_layer(tmp_path):
    model_bytes, layer_bytes = write_synthetic_llama(tmp_path / "model")
    out = tmp_path / "out"
    cfg = write_yaml(tmp_path / "job.yaml", make_config(tmp_path / "model", out))
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # glibc raises its mmap threshold every time a large buffer is freed; layer-sized
    # temporaries then come from heap arenas (one per thread: main, prefetch, writer) that keep
    # freed memory. That slack varied from 35 to 70 MiB between identical runs here and would
    # make this test flaky; a fixed threshold returns freed buffers to the OS, so what is left
    # is what the engine keeps alive. (Default allocator, same job: growth 68-111 MiB.)
    env["MALLOC_MMAP_THRESHOLD_"] = str(1 * MiB)
    base = subprocess.run([sys.executable, "-c", BASELINE], env=env, capture_output=True, text=True, timeout=300)
    assert base.returncode == 0, base.stderr
    baseline = int(base.stdout.strip().splitlines()[-1])
    run = subprocess.run([sys.executable, "-m", "streamq", "quantize", "-c", str(cfg), "-q"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    report = json.loads((out / "streamq_report.json").read_text())["report"]
    peak = report["peak_host_bytes"]
    growth = peak - baseline
    allowed = 4 * layer_bytes + 64 * MiB
    print(f"\nmemory: peak {peak / MiB:.1f} MiB, baseline {baseline / MiB:.1f} MiB, growth {growth / MiB:.1f} MiB; "
          f"model {model_bytes / MiB:.1f} MiB, largest layer {layer_bytes / MiB:.1f} MiB, "
          f"allowed growth {allowed / MiB:.1f} MiB")
    assert report["layers"] == LAYERS and (out / "config.json").is_file()
    assert allowed < model_bytes / 2  # the bound can tell one layer from the whole model
    assert growth <= allowed, (peak, baseline, growth, allowed)
    assert growth < model_bytes / 2
