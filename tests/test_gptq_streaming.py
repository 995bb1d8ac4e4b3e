"""int4_gptq end to end on the tiny models: the streaming engine against a whole-model GPTQ
reference byte for byte, experts no token reached, resume after kill -9, loading the output
in transformers, the GPTQ layout, and config validation.

Every job here uses group_size 32: it divides every input size of the tiny models (64, 128,
and the MoE experts' 32).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import read_tensors, write_yaml
from reference_gptq import reference_gptq
from safetensors.torch import load_file, save_file
from test_static_streaming import assert_bytes_equal, reference_batches

from streamq.cli import main as cli_main
from streamq.config import load_config, parse_config
from streamq.engine.run import quantize
from streamq.formats.int4_packing import from_compressed_tensors, from_gptq, to_compressed_tensors
from streamq.quant import int4
from streamq.testing.tiny_models import CALIB_FILE, build_tiny_model

REPO = Path(__file__).resolve().parents[1]
GROUP = 32
BATCH, SAMPLES, SEQ = 2, 4, 96  # batch 0 holds padding (71 real tokens of 96)


def gptq_config(model: Path, out: Path, *, propagate: str = "quantized", save_name: str = "compressed-tensors",
                extra: dict | None = None, dataset: dict | None = None, **global_) -> dict:
    return {
        "global": {"save_path": str(out), "device": "cpu", **global_},
        "model": {"model_path": str(model)},
        "compression": {"name": "PTQ", "quantization": {
            "name": "int4_gptq", "bits": 4, "save_name": save_name, "propagate": propagate,
            "quant_method": {"weight": "per-group", "group_size": GROUP}, "ignore_layers": ["lm_head"],
            **(extra or {})}},
        "dataset": dataset or {"name": "TextDataset", "data_path": str(CALIB_FILE), "max_seq_length": SEQ,
                               "num_samples": SAMPLES, "batch_size": BATCH},
    }


@pytest.fixture(scope="module")
def runs(tiny_models, tmp_path_factory):
    """runs(arch, propagate, save_name, all_experts, asym_actorder) -> (output dir, JobConfig, Report);
    each job once. `asym_actorder`: asymmetric weights (zero points) and actorder: static."""
    root = tmp_path_factory.mktemp("gptq-runs")
    cache: dict[tuple, tuple] = {}

    def get(arch: str, propagate: str = "quantized", save_name: str = "compressed-tensors",
            all_experts: bool = False, asym_actorder: bool = False) -> tuple:
        key = (arch, propagate, save_name, all_experts, asym_actorder)
        if key not in cache:
            out = root / "-".join(str(k) for k in key)
            extra = {"moe_calibrate_all_experts": True} if all_experts else {}
            if asym_actorder:
                extra |= {"sym": False, "actorder": "static"}
            job = parse_config(gptq_config(tiny_models[arch], out, propagate=propagate, save_name=save_name,
                                           extra=extra))
            cache[key] = (out, job, quantize(job, show_progress=False))
        return cache[key]

    return get


# ----------------------------------------------------------------------------- the reference


@pytest.mark.parametrize("arch,propagate,all_experts,asym_actorder", [
    ("qwen3", "quantized", False, False), ("qwen3_moe", "quantized", False, False),
    ("qwen3", "original", False, False), ("qwen3_moe", "quantized", True, False),
    ("qwen3", "quantized", False, True)])
def test_streaming_matches_whole_model_gptq_reference(tiny_models, runs, arch, propagate, all_experts,
                                                      asym_actorder):
    """Layer by layer: Hessians from a full-model forward (earlier layers holding their
    dequantized weights when propagating quantized), then the same solve and pack."""
    out, job, report = runs(arch, propagate, all_experts=all_experts, asym_actorder=asym_actorder)
    batches = reference_batches(tiny_models[arch], BATCH, SAMPLES, SEQ)
    assert any((b.attention_mask == 0).any() for b in batches), "the batches must hold padding"
    expected = reference_gptq(tiny_models[arch], batches, job.scheme, "compressed-tensors",
                              tuple(job.quant.ignore_layers), all_experts=all_experts)
    assert_bytes_equal(read_tensors(out), expected)
    assert report.rtn_fallbacks == []  # every module and expert was solved
    assert report.uncovered_experts == 0
    assert any(n.endswith("weight_zero_point") for n in expected) == asym_actorder


def test_propagation_reaches_the_next_layer(runs):
    """Layer 0 sees the same inputs either way; layer 1's Hessians see layer 0 quantized or not."""
    quantized, original = (read_tensors(runs("qwen3", p)[0]) for p in ("quantized", "original"))
    for name in quantized:
        same = torch.equal(quantized[name], original[name])
        if name.startswith("model.layers.1.") and name.endswith("weight_packed"):
            assert not same, name
        elif not name.startswith("model.layers.1."):
            assert same, name


@pytest.mark.parametrize("implementation,all_experts", [("grouped_mm", False), ("batched_mm", False),
                                                        ("eager", False), ("grouped_mm", True)])
def test_expert_hessians_equal_a_direct_computation(tiny_models, implementation, all_experts):
    """The per-expert Hessians the instrumented experts record, against 2 X^T X / n written
    out expert by expert: gate/up from the real tokens routed to the expert (every real
    token with all-experts calibration, one Hessian for all), down from its act(gate) * up."""
    from torch.nn import functional as F
    from transformers import AutoModelForCausalLM

    from streamq.calib.observers import LayerObserver
    from streamq.model import moe

    model = AutoModelForCausalLM.from_pretrained(str(tiny_models["qwen3_moe"]), dtype=torch.bfloat16).eval()
    experts = model.model.layers[0].mlp.experts
    experts.config._experts_implementation = implementation
    g = torch.Generator().manual_seed(3)
    num, top_k = experts.gate_up_proj.shape[0], model.config.num_experts_per_tok
    flat = torch.randn(46, experts.gate_up_proj.shape[-1], generator=g).to(torch.bfloat16)
    mask = torch.ones(46, dtype=torch.bool)
    mask[35:] = False
    flat[35:] *= 50  # loud padding: it must not reach the statistics
    index = torch.stack([torch.randperm(num, generator=g)[:top_k] for _ in range(46)])
    weights = torch.rand(46, top_k, generator=g).to(torch.bfloat16)
    obs = LayerObserver()
    obs.expert_kind, obs.token_mask = "hessian", mask
    moe.instrument_experts(experts, "e", obs, all_experts)
    with torch.no_grad():
        experts(flat, index, weights)
        moe.restore_experts(experts)
        real = flat[mask]
        for e in range(num):
            tokens = real if all_experts else flat[mask & (index == e).any(dim=1)]
            gate, up = F.linear(tokens, experts.gate_up_proj[e]).chunk(2, dim=-1)
            inter = (experts.act_fn(gate) * up).float()
            want_down = 2 * inter.T @ inter / max(inter.shape[0], 1)
            # bf16 intermediates from differently ordered GEMMs: close, not equal (padding or a
            # wrong routing would be off by far more than 1%)
            got_down = obs.expert_hessians["e.down"].result()[e]
            assert (got_down - want_down).norm() <= 1e-2 * want_down.norm(), e
            assert int(obs.expert_hessians["e.down"].count[e]) == tokens.shape[0]
            if not all_experts:
                x = tokens.float()
                torch.testing.assert_close(obs.expert_hessians["e.gate_up"].result()[e],
                                           2 * x.T @ x / max(x.shape[0], 1), rtol=1e-5, atol=1e-6)
                assert int(obs.expert_hessians["e.gate_up"].count[e]) == tokens.shape[0]
        if all_experts:
            x = real.float()
            torch.testing.assert_close(obs.expert_hessians["e.gate_up"].result(), 2 * x.T @ x / x.shape[0],
                                       rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- uncovered experts

BLOCKED = 5  # the expert no token reaches


def _blocked_expert_model(src: Path, dst: Path) -> Path:
    """A copy of the tiny MoE in which routing never picks expert BLOCKED.

    The router has no bias, so the copy makes one input channel positive for every token:
    embedding channel 0 becomes a constant 0.1 (5x the other channels' scale), which RMSNorm
    keeps positive and large at both layers' routers; expert BLOCKED's router row is -20 on
    that channel and 0 elsewhere, so its logit is far below every other expert's.
    """
    shutil.copytree(src, dst)
    weights = load_file(str(dst / "model.safetensors"))
    weights["model.embed_tokens.weight"][:, 0] = 0.1
    for layer in range(2):
        row = torch.zeros_like(weights[f"model.layers.{layer}.mlp.gate.weight"][BLOCKED])
        row[0] = -20.0
        weights[f"model.layers.{layer}.mlp.gate.weight"][BLOCKED] = row
    save_file(weights, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_expert_no_token_reached_is_round_to_nearest(tiny_models, tmp_path, caplog):
    model = _blocked_expert_model(tiny_models["qwen3_moe"], tmp_path / "blocked")
    job = parse_config(gptq_config(model, tmp_path / "out"))
    with caplog.at_level("WARNING", logger="streamq"):
        report = quantize(job, show_progress=False)
    why = "0 calibration tokens < min_expert_tokens 1, quantized round-to-nearest"
    expected = [f"layer {i}: model.layers.{i}.mlp.experts.{BLOCKED}: {why}" for i in range(2)]
    assert report.uncovered_experts == 2 and report.rtn_fallbacks == expected
    assert all(e.partition(": ")[2] in caplog.text for e in expected)
    assert json.loads((tmp_path / "out" / "streamq_report.json").read_text())["report"]["rtn_fallbacks"] == expected
    out, src = read_tensors(tmp_path / "out"), read_tensors(model)
    solved_differs = False
    for layer in range(2):
        for e in (BLOCKED, 0):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                p = f"model.layers.{layer}.mlp.experts.{e}.{proj}"
                w = src[f"{p}.weight"]
                codes, scale, zp = int4.quantize_rtn(w, GROUP, True, torch.bfloat16)
                rtn = to_compressed_tensors(codes, scale, zp, torch.bfloat16)
                got = {k: out[f"{p}.{k}"] for k in rtn}
                if e == BLOCKED:
                    assert all(torch.equal(got[k], rtn[k]) for k in rtn), p
                    deq = int4.dequantize(*from_compressed_tensors(got), GROUP)
                    assert (deq != 0).float().mean() > 0.8, p  # not the zeros plain GPTQ leaves
                else:
                    solved_differs |= not torch.equal(got["weight_packed"], rtn["weight_packed"])
    assert solved_differs  # the reached experts were solved, not rounded


def test_min_expert_tokens_rounds_rarely_reached_experts():
    """Experts with fewer calibration tokens than min_expert_tokens are quantized
    round-to-nearest (their Hessian is not trusted) and listed; the others are solved."""
    from streamq.model.layout import ExpertRef, LayerLayout
    from streamq.schemes.base import LayerStats
    from streamq.schemes.int4 import Int4Gptq

    g = torch.Generator().manual_seed(0)
    num, hidden, inter, prefix = 3, 64, 32, "model.layers.0."
    layout = LayerLayout(0, prefix)
    weights = {}
    shapes = {"gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
    for e in range(num):
        for proj, shape in shapes.items():
            name = f"{prefix}mlp.experts.{e}.{proj}"
            layout.quantized[name] = name + ".weight"
            layout.experts[name] = ExpertRef("mlp.experts", e, proj)
            weights[name] = (0.02 * torch.randn(*shape, generator=g)).to(torch.bfloat16)
    counts = torch.tensor([0, 3, 500])
    values = {}
    for kind, n in (("gate_up", hidden), ("down", inter)):
        x = torch.randn(num, 500, n, generator=g)
        x = x * (torch.arange(500) < counts[:, None])[..., None]  # each expert's own tokens only
        values[f"{prefix}mlp.experts.{kind}"] = 2 * x.transpose(1, 2) @ x / counts.clamp(min=1)[:, None, None]
        values[f"{prefix}mlp.experts.{kind}.count"] = counts
    scheme = Int4Gptq(group_size=GROUP, min_expert_tokens=5)
    out = dict(scheme.quantize(weights, LayerStats(values), layout))
    assert scheme.fallbacks == [f"{prefix}mlp.experts.{e}: {int(counts[e])} calibration tokens < min_expert_tokens 5, "
                                "quantized round-to-nearest" for e in (0, 1)]
    for e in range(num):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            name = f"{prefix}mlp.experts.{e}.{proj}"
            codes, scale, _ = int4.quantize_rtn(weights[name], GROUP, True, torch.bfloat16)
            assert torch.equal(out[name].weight_scale, scale.to(torch.bfloat16)), name
            assert torch.equal(out[name].weight, codes) == (e < 2), name


# ----------------------------------------------------------------------------- resume


def _run_cli(config: Path, kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("STREAMQ_KILL_AT", None)
    if kill_at:
        env["STREAMQ_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, "-m", "streamq", "quantize", "-c", str(config), "-q"],
                          env=env, capture_output=True, text=True, timeout=300)


def _digest(out: Path) -> dict[str, bytes]:
    skip = {"streamq_run.json", "streamq_report.json"}
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file() and p.name not in skip}


@pytest.fixture(scope="module")
def resume_case(tmp_path_factory):
    """A 3-layer tiny MoE and its uninterrupted int4_gptq output (in-process)."""
    root = tmp_path_factory.mktemp("gptq-resume")
    model = build_tiny_model("qwen3_moe", root / "moe3", num_layers=3)
    dataset = {"name": "TextDataset", "data_path": str(CALIB_FILE), "max_seq_length": 32, "num_samples": 4,
               "batch_size": 2}
    quantize(parse_config(gptq_config(model, root / "baseline", dataset=dataset)), show_progress=False)
    return model, dataset, _digest(root / "baseline")


@pytest.mark.parametrize("kill_at,checkpoint_layers,redone", [
    # rest shard, layer 0 recorded: the rerun recomputes layer 0 from the captured inputs (no cache checkpoint)
    ("layer-recorded:2", 0, [0]),
    # killed while the cache checkpoint after layer 1 is written: the rerun restores the one
    # after layer 0 and recomputes the finished layer 1 from it
    ("cache-checkpoint-batch:3", 1, [1]),
])
def test_kill_and_resume_is_byte_identical(resume_case, tmp_path, kill_at, checkpoint_layers, redone):
    """Finished layers are recomputed (nothing written) so that the next layer sees their
    quantized outputs; the result equals the uninterrupted run byte for byte."""
    model, dataset, baseline = resume_case
    out = tmp_path / "out"
    config = write_yaml(tmp_path / "job.yaml", gptq_config(model, out, dataset=dataset,
                                                           cache_checkpoint_layers=checkpoint_layers))
    killed = _run_cli(config, kill_at)
    assert killed.returncode == -9, (killed.returncode, killed.stderr[-2000:])
    assert not (out / "config.json").exists()
    # The rerun in this process (the kill needs a process of its own, the resume does not).
    report = quantize(load_config(str(config)), show_progress=False)
    assert _digest(out) == baseline
    assert json.loads((out / "streamq_run.json").read_text())["status"] == "complete"
    stages = report.stages
    # Redone layers are solved and propagated but never handed to the writer.
    assert [s["layer"] for s in stages if "propagate" in s and "wait_write" not in s] == redone
    assert [s["layer"] for s in stages if "wait_write" in s] == list(range(redone[-1] + 1, 3))


# ----------------------------------------------------------------------------- loading the output

# Tolerance. Symmetric 4-bit groups of 32 have a step of absmax / 7.5; on these Gaussian-like
# weights (absmax about 2.2 sigma) rounding alone moves each weight by about 8.5% of its scale
# (RMS), and GPTQ spends that error where the calibration inputs are weak. Through two
# decoder layers the logits of the tiny models move by 7-9% (relative Frobenius norm per
# sequence). 20% leaves a 2x margin and still fails for real breakage (a swapped nibble order,
# a transposed scale, an expert loaded into the wrong slot move the logits by 50% or more).
MAX_REL_ERR = 0.20
MIN_REL_ERR = 1e-3  # quantization had an effect: a loader that kept the bf16 weights would match


@pytest.mark.parametrize("arch", ["qwen3", "qwen3_moe"])
def test_transformers_loads_int4_gptq_output(tiny_models, runs, arch):
    """transformers (through compressed-tensors) reconstructs exactly our dequantized weights
    (Linears decompressed on the first forward, MoE experts into the fused bf16 parameters)."""
    from test_compressed_tensors_load import _logits, _sequences
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir, job, _ = runs(arch)
    out = read_tensors(out_dir)
    qc = json.loads((out_dir / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "pack-quantized"
    assert qc["config_groups"]["group_0"]["weights"]["group_size"] == GROUP
    ref = AutoModelForCausalLM.from_pretrained(str(tiny_models[arch]), dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(str(out_dir))
    seqs = _sequences(AutoTokenizer.from_pretrained(str(out_dir)))
    got, want = _logits(model, seqs), _logits(ref, seqs)

    def ours(module: str) -> torch.Tensor:
        tensors = {k[len(module) + 1:]: v for k, v in out.items() if k.startswith(module + ".")}
        return int4.dequantize(*from_compressed_tensors(tensors), GROUP, torch.bfloat16)

    for i in range(2):
        p = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert torch.equal(model.get_submodule(p + "self_attn." + proj).weight, ours(p + "self_attn." + proj))
        if arch == "qwen3":
            assert torch.equal(model.get_submodule(p + "mlp.down_proj").weight, ours(p + "mlp.down_proj"))
            continue
        experts = model.get_submodule(p + "mlp.experts")
        for e in range(12):
            gate_up = torch.cat([ours(f"{p}mlp.experts.{e}.gate_proj"), ours(f"{p}mlp.experts.{e}.up_proj")])
            assert torch.equal(experts.gate_up_proj[e], gate_up), (i, e)
            assert torch.equal(experts.down_proj[e], ours(f"{p}mlp.experts.{e}.down_proj")), (i, e)
    errs = [float((a - b).norm() / b.norm()) for a, b in zip(got, want, strict=True)]
    assert all(MIN_REL_ERR < e < MAX_REL_ERR for e in errs), errs


def test_gptq_layout_round_trips(runs):
    """save_name: gptq holds the same codes and scales as the compressed-tensors output
    (the solve does not depend on the layout), read back through `from_gptq`."""
    gptq_dir = runs("qwen3_moe", save_name="gptq")[0]
    gptq, ct = read_tensors(gptq_dir), read_tensors(runs("qwen3_moe")[0])
    qc = json.loads((gptq_dir / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["group_size"] == GROUP and qc["desc_act"] is False
    modules = [n[: -len(".qweight")] for n in gptq if n.endswith(".qweight")]
    assert len(modules) == 2 * (4 + 3 * 12)
    for m in modules:
        codes, scale = from_gptq({k: gptq[f"{m}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")})
        ct_codes, ct_scale, zp = from_compressed_tensors({k: ct[f"{m}.{k}"] for k in
                                                          ("weight_packed", "weight_scale", "weight_shape")})
        assert zp is None and torch.equal(codes, ct_codes), m
        assert torch.equal(scale, ct_scale), m  # bf16 scales of this size are exact in float16
    assert {n for n in gptq if n.rpartition(".")[0] not in modules} == \
        {n for n in ct if n.rpartition(".")[0] not in modules}


# ----------------------------------------------------------------------------- config validation

BAD = {
    "actorder-group": ("actorder", "group", ["'compression.quantization.actorder'", "group", "vLLM"]),
    "damp-percent": ("damp_percent", 2, ["'compression.quantization.damp_percent'", "(0, 1)"]),
    "group-size": ("quant_method.group_size", 100, ["'compression.quantization.quant_method.group_size'", "100",
                                                    "multiple of 8"]),
    "propagate": ("propagate", "maybe", ["'compression.quantization.propagate'", "maybe", "quantized, original"]),
    "unknown-key": ("damping", 0.1, ["unknown key 'compression.quantization.damping'", "damp_percent"]),
    "block-size": ("block_size", 0, ["'compression.quantization.block_size'", "positive"]),
    "min-expert-tokens": ("min_expert_tokens", -1, ["'compression.quantization.min_expert_tokens'"]),
    "activation-key": ("quant_method.activation", "per-token",
                       ["unknown key 'compression.quantization.quant_method.activation'", "group_size"]),
    "bits": ("bits", 8, ["'compression.quantization.bits'", "int4_gptq", "bits: 4"]),
}


def _set(cfg: dict, dotted: str, value) -> dict:
    node = cfg["compression"]["quantization"]
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return cfg


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_gptq_config_exits_2_naming_the_key(tmp_path, capsys, case):
    key, value, needles = BAD[case]
    cfg = _set(gptq_config(tmp_path / "no-model-here", tmp_path / "out"), key, value)
    rc = cli_main(["quantize", "-c", str(write_yaml(tmp_path / "job.yaml", cfg)), "-q"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("streamq: error: "), lines
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert not (tmp_path / "out").exists()


def test_gptq_settings_parse(tmp_path):
    cfg = gptq_config(tmp_path / "m", tmp_path / "out", extra={"dequant_to_bf16": True, "actorder": "static",
                                                              "damp_percent": 0.05, "min_expert_tokens": 4})
    job = parse_config(cfg)
    assert any("dequant_to_bf16 is accepted but not used" in n for n in job.notes)
    s = job.scheme
    assert (s.actorder, s.damp_percent, s.min_expert_tokens, s.group_size, s.propagate) == \
        (True, 0.05, 4, GROUP, "quantized")
    assert job.quant.save_name == "compressed-tensors"
    for null_key in ("damp_percent", "block_size", "min_expert_tokens", "sym", "actorder", "propagate"):
        s = parse_config(_set(gptq_config(tmp_path / "m", tmp_path / "out"), null_key, None)).scheme
        assert (s.damp_percent, s.block_size, s.min_expert_tokens, s.sym, s.actorder, s.propagate) == \
            (0.01, 128, 1, True, False, "quantized"), null_key
    default_group = _set(gptq_config(tmp_path / "m", tmp_path / "out"), "quant_method.group_size", -1)
    assert parse_config(default_group).scheme.group_size == 128  # AngelSlim's -1
