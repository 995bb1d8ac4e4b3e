"""Architecture matrix: every architecture people quantize, tiny, saved by transformers itself.

For each architecture in `streamq.testing.arch_matrix.MATRIX`: quantize fp8_dynamic and
fp8_static and compare byte for byte with the whole-model reference; load the
compressed-tensors output back in transformers; check the captured layer-0 inputs against
a full transformers forward. An architecture that does not work yet is an explicit xfail
naming the reason (XFAIL below), never a silent pass.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import make_config, read_tensors, run_job
from reference import reference_static
from test_static_streaming import assert_bytes_equal, reference_batches
from transformers import AutoModelForCausalLM

from streamq.checkpoint.reader import CheckpointReader
from streamq.config import parse_config
from streamq.errors import CheckpointError
from streamq.model.capture import capture
from streamq.model.skeleton import (
    attention_implementation,
    build_skeleton,
    load_model_config,
    materialize_outside_layers,
)
from streamq.testing.arch_matrix import MATRIX, build_arch_model, matrix_config
from streamq.verify import verify_checkpoint

ARCHS = tuple(MATRIX)
# arch or (arch, algorithm) -> why it does not work yet (strict: an xfail that starts passing fails).
_FUSED_ON_DISK = "refused with a clear error: experts stored fused on disk (3D tensors)"
XFAIL: dict = {
    "granitemoe": _FUSED_ON_DISK + ": block_sparse_moe.input_linear/output_linear",
    "llama4_text": _FUSED_ON_DISK + ": feed_forward.experts.gate_up_proj/down_proj",
}
# Each job runs once: dynamic in the compressed-tensors format (which transformers loads back),
# static in vLLM's fp8 format.
FORMAT = {"fp8_dynamic": "compressed-tensors", "fp8_static": "fp8"}
ALGS = tuple(FORMAT)
NUM_SAMPLES, SEQ_LEN, BATCH = 4, 32, 2


def _param(arch: str, *rest):
    reason = XFAIL.get((arch, *rest)) or XFAIL.get(arch)
    marks = [pytest.mark.xfail(reason=reason, strict=True, raises=CheckpointError)] if reason else []
    return pytest.param(arch, *rest, marks=marks, id="-".join([arch, *rest]))


def ignore_list(out: Path) -> list[str]:
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    return qc["ignored_layers"] if "ignored_layers" in qc else qc["ignore"]


@pytest.fixture(scope="session")
def arch_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("arch_matrix")
    return {arch: build_arch_model(arch, root / arch) for arch in ARCHS}


@pytest.fixture(scope="session")
def arch_outputs(arch_models, tmp_path_factory):
    """(arch, algorithm, save_name) -> (job config, output dir); each job runs once per session."""
    root = tmp_path_factory.mktemp("arch_out")
    cache: dict[tuple[str, str, str], tuple] = {}

    def get(arch: str, algorithm: str):
        save_name = FORMAT[algorithm]
        key = (arch, algorithm, save_name)
        if key not in cache:
            out = root / "-".join(key)
            cfg = make_config(arch_models[arch], out, algorithm=algorithm, save_name=save_name,
                              num_samples=NUM_SAMPLES, max_seq_length=SEQ_LEN, batch_size=BATCH)
            run_job(cfg)
            cache[key] = (parse_config(cfg, "test-config"), out)
        return cache[key]

    return get


@pytest.mark.parametrize("arch,algorithm", [_param(a, alg) for a in ARCHS for alg in ALGS])
def test_matches_whole_model_reference(arch_models, arch_outputs, arch, algorithm):
    job, out = arch_outputs(arch, algorithm)
    batches = reference_batches(arch_models[arch], BATCH, NUM_SAMPLES, SEQ_LEN)
    expected = reference_static(arch_models[arch], batches, job.scheme, FORMAT[algorithm],
                                tuple(job.quant.ignore_layers))
    assert_bytes_equal(read_tensors(out), expected)
    assert "lm_head" in ignore_list(out)
    result = verify_checkpoint(out, arch_models[arch])
    assert result.ok, result.problems


@pytest.mark.parametrize("arch", ARCHS)
def test_captured_layer0_inputs_equal_full_forward(arch_models, arch):
    """The stem streamq materializes (embedding, computed buffers, rotary tables, masks) gives
    layer 0 exactly what a full transformers forward gives it."""
    model_dir = arch_models[arch]
    reader = CheckpointReader(model_dir)
    config = load_model_config(model_dir)
    skeleton = build_skeleton(config, torch.bfloat16)
    materialize_outside_layers(skeleton, reader.read([n for n in reader.other if n.startswith("model.")]),
                               torch.device("cpu"))
    ids = torch.tensor([[0, 17, 250, 33, 99, 7, 1, 1], [0, 5, 6, 7, 8, 9, 10, 11]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0], [1] * 8])
    hidden, kwargs = capture(skeleton, input_ids=ids, attention_mask=mask)

    full = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16,
                                                attn_implementation=attention_implementation(config)).eval()
    seen = {}

    def hook(_module, args, kw):
        seen["hidden"], seen["kwargs"] = (args[0] if args else kw["hidden_states"]), kw

    full.model.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        full(input_ids=ids, attention_mask=mask, use_cache=False)
    assert torch.equal(hidden, seen["hidden"])
    for key in ("position_embeddings", "position_embeddings_global", "position_embeddings_local"):
        if key in seen["kwargs"] and seen["kwargs"][key] is not None:
            for a, b in zip(kwargs[0][key], seen["kwargs"][key], strict=True):
                assert torch.equal(a, b), key
    for name, buf in skeleton.named_buffers():
        if not buf.is_meta:
            assert torch.equal(buf, full.get_buffer(name)), name


def test_attention_implementation_follows_model_support(monkeypatch):
    from transformers import LlamaForCausalLM

    config = matrix_config("llama")
    assert attention_implementation(config) == "sdpa"
    assert build_skeleton(config, torch.bfloat16).config._attn_implementation == "sdpa"
    monkeypatch.setattr(LlamaForCausalLM, "_supports_sdpa", False)
    assert attention_implementation(config) == "eager"
    assert build_skeleton(config, torch.bfloat16).config._attn_implementation == "eager"


@pytest.mark.parametrize("arch,carried", [("deepseek_v3", "model.layers.2"), ("glm4_moe", "model.layers.2"),
                                          ("qwen3_next", "mtp")])
def test_prediction_layers_carried_listed_and_reported(arch_models, arch_outputs, arch, carried):
    """Layers past num_hidden_layers and separate `mtp.*` stacks: never merged into the
    decoder, never refused; copied bit for bit, every Linear of them in the ignore list,
    named in the report; the output passes verify against its source."""
    _, out = arch_outputs(arch, "fp8_static")
    source, written = read_tensors(arch_models[arch]), read_tensors(out)
    mine = [n for n in source if n.startswith(carried + ".")]
    assert len(mine) > 10
    for name in mine:
        assert torch.equal(written[name].view(torch.uint8), source[name].view(torch.uint8)), name
    ignored = ignore_list(out)
    linears = {n[: -len(".weight")] for n in mine if n.endswith("proj.weight") or n.endswith("head.weight")}
    assert linears and linears <= set(ignored)
    assert not [n for n in ignored if "norm" in n.rpartition(".")[2]]
    notes = json.loads((out / "streamq_report.json").read_text())["report"]["notes"]
    assert any(carried in note for note in notes), notes
    result = verify_checkpoint(out, arch_models[arch])
    assert result.ok, result.problems


MOE_ROUTERS = {  # arch -> (layer, router modules on disk) for one MoE layer
    "mixtral": (0, ["block_sparse_moe.gate"]),
    "qwen2_moe": (0, ["mlp.gate", "mlp.shared_expert_gate"]),
    "qwen3_moe": (0, ["mlp.gate"]),
    "qwen3_next": (0, ["mlp.gate", "mlp.shared_expert_gate"]),
    "deepseek_v2": (1, ["mlp.gate"]),
    "deepseek_v3": (1, ["mlp.gate"]),
    "glm4_moe": (1, ["mlp.gate"]),
    "olmoe": (0, ["mlp.gate"]),
}


@pytest.mark.parametrize("arch", sorted(MOE_ROUTERS))
def test_routers_found_by_structure_kept_and_listed(arch_models, arch_outputs, arch):
    """Routers (whatever their name) and shared-expert gates stay in high precision, bit for
    bit, and every one is in the ignore list; no expert or MLP projection is taken for one."""
    _, out = arch_outputs(arch, "fp8_dynamic")
    layer, routers = MOE_ROUTERS[arch]
    source, written = read_tensors(arch_models[arch]), read_tensors(out)
    ignored = ignore_list(out)
    for router in routers:
        name = f"model.layers.{layer}.{router}"
        assert name in ignored, (name, ignored)
        assert torch.equal(written[name + ".weight"], source[name + ".weight"])
        assert name + ".weight_scale" not in written
    listed = [n for n in ignored if n.startswith(("model.layers.0.", "model.layers.1."))]  # decoder only
    assert not [n for n in listed if n.endswith(("_proj", ".w1", ".w2", ".w3"))], listed
    experts = [n for n in written if n.startswith(f"model.layers.{layer}.") and ".experts." in n
               and n.endswith(".weight")]
    assert len(experts) >= 12 and all(written[n].dtype == torch.float8_e4m3fn for n in experts)


@pytest.mark.parametrize("arch,members", [
    ("deepseek_v3", ["model.layers.0.self_attn.q_a_proj", "model.layers.0.self_attn.kv_a_proj_with_mqa"]),
    ("mixtral", ["model.layers.1.block_sparse_moe.experts.2.w1", "model.layers.1.block_sparse_moe.experts.2.w3"]),
    ("llama", [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]),
    ("qwen3_moe", ["model.layers.0.mlp.experts.5.gate_proj", "model.layers.0.mlp.experts.5.up_proj"]),
])
def test_modules_vllm_fuses_share_one_weight_scale(arch_outputs, arch, members):
    _, out = arch_outputs(arch, "fp8_dynamic")
    written = read_tensors(out)
    scales = [written[m + ".weight_scale"] for m in members]
    assert all(torch.equal(s, scales[0]) for s in scales), scales


@pytest.mark.parametrize("arch,disk", [("granitemoe", "block_sparse_moe.input_linear.weight"),
                                       ("llama4_text", "feed_forward.experts.down_proj")])
def test_experts_fused_on_disk_refused_naming_the_layout(arch_models, tmp_path, arch, disk):
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=rf"stored fused on disk as 'model\.layers\.0\.{re.escape(disk)}'"):
        run_job(make_config(arch_models[arch], out))
    assert not out.exists()


# Relative logit error of FP8 through 2 tiny layers is 4-5% (see test_compressed_tensors_load);
# Gemma-3 measures 13% (its sqrt(hidden) embedding scale and four norms per layer; not investigated
# further: its bytes match the reference exactly).
MAX_LOAD_ERR = {"gemma3_text": 0.2}
# Architectures whose compressed-tensors output transformers cannot load back yet, and why.
LOAD_XFAIL: dict[str, str] = {}


@pytest.mark.parametrize("arch", [pytest.param(a, marks=[pytest.mark.xfail(reason=LOAD_XFAIL[a], strict=True)]
                                               if a in LOAD_XFAIL else []) for a in ARCHS if a not in XFAIL])
def test_compressed_tensors_output_loads_in_transformers(arch_models, arch_outputs, arch):
    """transformers (compressed-tensors) loads the output and computes about what bf16 does."""
    _, out = arch_outputs(arch, "fp8_dynamic")
    ids = torch.tensor([[0, 17, 250, 33, 99, 7, 11, 42, 5, 300, 12, 64]])
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(arch_models[arch], dtype=torch.bfloat16)(input_ids=ids).logits
        got = AutoModelForCausalLM.from_pretrained(out)(input_ids=ids).logits
    err = float((got.float() - ref.float()).norm() / ref.float().norm())
    assert torch.isfinite(got).all() and 1e-4 < err < MAX_LOAD_ERR.get(arch, 0.1), err
