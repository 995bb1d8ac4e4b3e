"""fp8_static: the streaming engine against the whole-model reference, byte for byte."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from reference import reference_static
from safetensors.torch import load_file
from transformers import AutoTokenizer

from streamq.calib.dataset import load_text_dataset, make_batches
from streamq.config import parse_config
from streamq.engine.run import quantize
from streamq.testing.tiny_models import build_tiny_model

REPO = Path(__file__).resolve().parents[1]
CALIB = REPO / "data" / "calib" / "tiny_chat.jsonl"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("static-models")
    return {arch: build_tiny_model(arch, root / arch, num_layers=2) for arch in ("qwen2", "qwen3", "qwen3_moe")}


def static_config(model: Path, out: Path, *, batch_size: int, fmt: str = "fp8", num_samples: int = 6,
                  max_seq_length: int = 48, extra: dict | None = None) -> dict:
    return {
        "global": {"save_path": str(out), "device": "cpu"},
        "model": {"model_path": str(model)},
        "compression": {"name": "PTQ", "quantization": {
            "name": "fp8_static", "bits": 8, "save_name": fmt,
            "quant_method": {"weight": "per-tensor", "activation": "per-tensor"},
            "ignore_layers": ["lm_head"], **(extra or {})}},
        "dataset": {"name": "TextDataset", "data_path": str(CALIB), "max_seq_length": max_seq_length,
                    "num_samples": num_samples, "batch_size": batch_size},
    }


def read_output(out: Path) -> dict[str, torch.Tensor]:
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(set(weight_map.values())):
        tensors.update(load_file(str(out / file)))
    assert set(tensors) == set(weight_map)
    return tensors


def reference_batches(model: Path, batch_size: int, num_samples: int = 6, max_seq_length: int = 48) -> list:
    tok = AutoTokenizer.from_pretrained(str(model))
    samples = load_text_dataset(CALIB, tok, max_seq_length=max_seq_length, num_samples=num_samples)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return make_batches(samples, batch_size, pad)


def assert_bytes_equal(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for name in expected:
        a, e = actual[name], expected[name]
        assert a.dtype == e.dtype and a.shape == e.shape, (name, a.dtype, e.dtype, a.shape, e.shape)
        assert torch.equal(a.reshape(-1).view(torch.uint8), e.contiguous().reshape(-1).view(torch.uint8)), name


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "qwen3_moe"])
@pytest.mark.parametrize("batch_size", [1, 4])
def test_streaming_matches_whole_model_reference(models, tmp_path, arch, batch_size):
    out = tmp_path / "out"
    job = parse_config(static_config(models[arch], out, batch_size=batch_size))
    report = quantize(job, show_progress=False)
    expected = reference_static(models[arch], reference_batches(models[arch], batch_size), job.scheme, "fp8",
                                tuple(job.quant.ignore_layers))
    assert_bytes_equal(read_output(out), expected)
    assert report.cache_location in ("device", "host", "disk")
    scales = [t for n, t in expected.items() if n.endswith("input_scale")]
    assert scales and all(float(s) > 0 for s in scales)


def test_compressed_tensors_format_matches_reference(models, tmp_path):
    out = tmp_path / "out"
    job = parse_config(static_config(models["qwen3_moe"], out, batch_size=2, fmt="compressed-tensors"))
    quantize(job, show_progress=False)
    expected = reference_static(models["qwen3_moe"], reference_batches(models["qwen3_moe"], 2), job.scheme,
                                "compressed-tensors", tuple(job.quant.ignore_layers))
    assert_bytes_equal(read_output(out), expected)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_0"]["input_activations"]["dynamic"] is False


@pytest.mark.parametrize("location", ["device", "host", "disk"])
def test_cache_location_does_not_change_output(models, tmp_path, location):
    outs = []
    for loc in ("host", location):
        out = tmp_path / f"out-{loc}-{len(outs)}"
        cfg = static_config(models["qwen3"], out, batch_size=2, extra={"hidden_cache": loc})
        quantize(parse_config(cfg), show_progress=False)
        outs.append(read_output(out))
    assert_bytes_equal(outs[1], outs[0])
    assert not (tmp_path / f"out-{location}-1" / ".streamq_cache").exists()


def test_padding_never_reaches_statistics(models, tmp_path):
    """Padded slots holding enormous activations must not move any scale.

    A copy of the model gets a pad-token embedding with all its energy in one channel, so
    padded positions carry activations far outside the real tokens' range even after
    the layers' RMSNorm. Were they observed, input scales would more than double. The
    runs are compared at 1%, not bitwise: a bitwise version of this test failed about one
    run in four on a layer-0 gate_proj scale (last-bit differences, cause not found).
    """
    from safetensors.torch import load_file, save_file

    model = models["qwen3"]
    loud = tmp_path / "loud-pad"
    shutil.copytree(model, loud)
    pad_id = AutoTokenizer.from_pretrained(str(model)).pad_token_id
    weights = load_file(str(loud / "model.safetensors"))
    spike = torch.zeros_like(weights["model.embed_tokens.weight"][pad_id])
    spike[0] = 1000.0  # all energy in one channel: still extreme after RMSNorm (sqrt(hidden) x)
    weights["model.embed_tokens.weight"][pad_id] = spike
    save_file(weights, str(loud / "model.safetensors"), metadata={"format": "pt"})
    batches = reference_batches(model, 6, max_seq_length=256)
    assert (batches[0].attention_mask == 0).any(), "the test needs padding in the batch"
    assert not any((b.input_ids[b.attention_mask.bool()] == pad_id).any() for b in batches)

    results = []
    for variant in (model, loud):
        out = tmp_path / f"out-{len(results)}"
        quantize(parse_config(static_config(variant, out, batch_size=6, max_seq_length=256)), show_progress=False)
        results.append(read_output(out))
    scales = [n for n in results[0] if n.endswith("input_scale")]
    assert scales
    for n in scales:
        assert torch.allclose(results[0][n], results[1][n], rtol=1e-2, atol=0), n


def test_uncovered_experts_get_the_layers_largest_scale(models, tmp_path):
    out = tmp_path / "out"
    cfg = static_config(models["qwen3_moe"], out, batch_size=1, num_samples=1, max_seq_length=3)
    report = quantize(parse_config(cfg), show_progress=False)
    assert report.uncovered_experts > 0  # 3 tokens x top-2 cannot reach 12 experts
    tensors = read_output(out)
    for layer in range(2):
        gate = [tensors[f"model.layers.{layer}.mlp.experts.{e}.gate_proj.input_scale"] for e in range(12)]
        up = [tensors[f"model.layers.{layer}.mlp.experts.{e}.up_proj.input_scale"] for e in range(12)]
        assert all(torch.equal(g, u) for g, u in zip(gate, up, strict=True))
        largest = max(float(g) for g in gate)
        assert sum(float(g) == largest for g in gate) > 1  # the uncovered ones share the max
    saved = json.loads((out / "streamq_report.json").read_text())["report"]
    assert saved["uncovered_experts"] == report.uncovered_experts


def test_calibrate_all_experts_covers_every_expert(models, tmp_path):
    out = tmp_path / "out"
    cfg = static_config(models["qwen3_moe"], out, batch_size=1, num_samples=1, max_seq_length=3,
                        extra={"moe_calibrate_all_experts": True})
    report = quantize(parse_config(cfg), show_progress=False)
    assert report.uncovered_experts == 0
    tensors = read_output(out)
    gate = {float(tensors[f"model.layers.0.mlp.experts.{e}.gate_proj.input_scale"]) for e in range(12)}
    assert len(gate) == 1  # every expert saw every token: one shared input range
    downs = {float(tensors[f"model.layers.0.mlp.experts.{e}.down_proj.input_scale"]) for e in range(12)}
    assert len(downs) > 1  # each expert's own intermediate activations


def test_observed_experts_forward_equals_transformers(models):
    """The instrumented experts loop must compute exactly what transformers computes."""
    from transformers import AutoModelForCausalLM

    from streamq.calib.observers import LayerObserver
    from streamq.model.moe import instrument_experts, restore_experts

    model = AutoModelForCausalLM.from_pretrained(str(models["qwen3_moe"]), dtype=torch.bfloat16).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
        experts = model.model.layers[0].mlp.experts
        obs = LayerObserver()
        instrument_experts(experts, "mlp.experts", obs, all_experts=False)
        actual = model(ids).logits
        restore_experts(experts)
    assert torch.equal(actual, expected)
    assert obs.absmax["mlp.experts.gate_up"].shape == (12,)
    assert "forward" not in experts.__dict__


@pytest.mark.parametrize("implementation", ["grouped_mm", "batched_mm", "eager"])
def test_expert_statistics_captured_in_the_forward_match_a_recomputation(models, implementation, monkeypatch):
    """grouped_mm / batched_mm: the down projection's input absmax comes from transformers'
    own `_apply_gate` call; it must equal the statistics pass that recomputes the
    intermediate expert by expert, padding excluded. eager: that recomputation is used."""
    check_captured_expert_statistics(models["qwen3_moe"], implementation, monkeypatch, torch.device("cpu"))


def check_captured_expert_statistics(model_path: Path, implementation: str, monkeypatch, device: torch.device) -> None:
    from transformers import AutoModelForCausalLM

    from streamq.calib.observers import LayerObserver
    from streamq.model import moe

    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.bfloat16).eval()
    experts = model.model.layers[0].mlp.experts.to(device)
    experts.config._experts_implementation = implementation
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 23, experts.gate_up_proj.shape[-1], generator=g).to(torch.bfloat16)
    hidden[1, 15:] *= 50  # loud padding: it must not reach the statistics
    mask = torch.ones(2, 23, dtype=torch.bool)
    mask[1, 15:] = False
    top_k = model.config.num_experts_per_tok
    index = torch.stack([torch.randperm(12, generator=g)[:top_k] for _ in range(46)])
    weights = torch.rand(46, top_k, generator=g).to(torch.bfloat16)
    flat, index, weights, mask = (t.to(device) for t in (hidden.reshape(-1, hidden.shape[-1]), index, weights, mask))

    recompute = LayerObserver()
    recompute.token_mask = mask
    with torch.no_grad():
        moe._observe_routed(experts, flat, index, recompute, "e")

    calls = []
    real_routed = moe._observe_routed
    monkeypatch.setattr(moe, "_observe_routed", lambda *a: calls.append(1) or real_routed(*a))
    obs = LayerObserver()
    obs.token_mask = mask
    moe.instrument_experts(experts, "e", obs, all_experts=False)
    with torch.no_grad():
        out = experts(flat, index, weights)
    moe.restore_experts(experts)
    with torch.no_grad():
        expected = experts(flat, index, weights)
    assert torch.equal(out, expected)  # outputs untouched
    assert calls == ([1] if implementation == "eager" else [])  # which path computed the statistics
    assert torch.equal(obs.absmax["e.gate_up"], recompute.absmax["e.gate_up"])
    # Same values up to bf16 rounding of differently ordered GEMMs; padding would be ~50x off.
    torch.testing.assert_close(obs.absmax["e.down"], recompute.absmax["e.down"], rtol=2e-2, atol=0)
    assert (obs.absmax["e.down"] > 0).all()


def _observe_experts(experts, flat, index, weights, mask, kind: str, all_experts: bool = False,
                     outputs_used: bool = True):
    """One instrumented forward of `experts` ("e") with `kind` statistics: (output, observer)."""
    from streamq.calib.observers import LayerObserver
    from streamq.model import moe

    obs = LayerObserver()
    obs.expert_kind = kind
    obs.token_mask = mask
    moe.instrument_experts(experts, "e", obs, all_experts, outputs_used=outputs_used)
    try:
        with torch.no_grad():
            out = experts(flat, index, weights)
    finally:
        moe.restore_experts(experts)
    return out, obs


def _expert_hessians(experts, flat, index, weights, mask, all_experts: bool, outputs_used: bool):
    out, obs = _observe_experts(experts, flat, index, weights, mask, "hessian", all_experts, outputs_used)
    return out, {k: (a.result(), a.count) for k, a in obs.expert_hessians.items()}


def _routing(experts, rows: int, top_k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    flat = torch.randn(rows, experts.gate_up_proj.shape[-1], generator=g).to(torch.bfloat16) * 3
    mask = torch.ones(rows, dtype=torch.bool)
    mask[rows - 6:] = False
    num = experts.gate_up_proj.shape[0]
    index = torch.stack([torch.randperm(num, generator=g)[:top_k] for _ in range(rows)])
    return flat, index, torch.rand(rows, top_k, generator=g).to(torch.bfloat16), mask


def _qwen3_moe_experts(models):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(models["qwen3_moe"]), dtype=torch.bfloat16).eval()
    return model.model.layers[0].mlp.experts, model.config.num_experts_per_tok


def _deepseek_v4_experts(_models):
    """A family whose `_apply_gate` clamps gate and up (swiglu_limit): weights large enough
    that the clamp bites."""
    mod = pytest.importorskip("transformers.models.deepseek_v4.modeling_deepseek_v4")
    cfg = mod.DeepseekV4Config()
    for key, value in dict(num_local_experts=8, hidden_size=64, intermediate_size=32, moe_intermediate_size=32,
                           swiglu_limit=1.0, hidden_act="silu").items():
        setattr(cfg, key, value)
    torch.manual_seed(0)
    experts = mod.DeepseekV4Experts(cfg).to(torch.bfloat16)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, 2.0)
        experts.down_proj.normal_(0, 0.1)
    return experts, 2


@pytest.mark.parametrize("family", [_qwen3_moe_experts, _deepseek_v4_experts], ids=["qwen3_moe", "deepseek_v4"])
@pytest.mark.parametrize("implementation", ["grouped_mm", "batched_mm"])
@pytest.mark.parametrize("all_experts", [False, True])
def test_statistics_only_experts_forward_gives_the_hessians_of_the_full_forward(models, family, implementation,
                                                                                 all_experts, monkeypatch):
    """A replay whose outputs are dropped (GPTQ's statistics pass) skips the experts' down
    projections and weighted sum: the Hessians and token counts are those of the full
    forward, whose down inputs come from transformers' own `_apply_gate` (to float32
    rounding: another grouping of rows), and the experts return zeros. DeepSeek-V4 clamps
    in its `_apply_gate`, which the statistics-only path must apply too."""
    experts, top_k = family(models)
    experts.config._experts_implementation = implementation
    flat, index, weights, mask = _routing(experts, 46, top_k, seed=2)
    out_full, full = _expert_hessians(experts, flat, index, weights, mask, all_experts, True)
    out_stats, stats_only = _expert_hessians(experts, flat, index, weights, mask, all_experts, False)
    assert not torch.equal(out_full, torch.zeros_like(flat))
    assert torch.equal(out_stats, torch.zeros_like(flat))
    assert set(full) == set(stats_only) == {"e.gate_up", "e.down"}
    for key, (h, count) in full.items():
        assert torch.equal(count, stats_only[key][1]), key
        assert h.abs().max() > 0
        torch.testing.assert_close(stats_only[key][0], h, rtol=1e-5, atol=1e-5 * float(h.abs().max()))
    if family is _deepseek_v4_experts:  # not vacuous: an unclamped intermediate gives other Hessians
        def unclamped_gate(self, gate_up):
            gate, up = gate_up.chunk(2, dim=-1)
            return torch.nn.functional.silu(gate) * up

        monkeypatch.setattr(type(experts), "_apply_gate", unclamped_gate)
        _, unclamped = _expert_hessians(experts, flat, index, weights, mask, all_experts, False)
        assert not torch.allclose(unclamped["e.down"][0], full["e.down"][0], rtol=1e-2)


def test_recomputed_expert_ranges_apply_the_familys_gate(models):
    """Under the eager implementation streamq recomputes the down projection's input for
    its range (`_observe_routed`); for DeepSeek-V4, which clamps gate and up in its
    `_apply_gate`, that range must be the one grouped_mm's own `_apply_gate` call gives
    (unclamped, it would be several times larger with these weights)."""
    experts, top_k = _deepseek_v4_experts(models)
    flat, index, weights, mask = _routing(experts, 46, top_k, seed=4)
    absmax = {}
    for implementation in ("grouped_mm", "eager"):
        experts.config._experts_implementation = implementation
        absmax[implementation] = _observe_experts(experts, flat, index, weights, mask, "absmax")[1].absmax["e.down"]
    assert absmax["grouped_mm"].max() > 0
    torch.testing.assert_close(absmax["eager"], absmax["grouped_mm"], rtol=1e-2, atol=0.0)


def test_captured_expert_inputs_give_the_replays_bytes_and_skip_what_a_process_does_not_own(models, monkeypatch):
    """The split replay (several processes): the experts' inputs captured on the process
    that ran the batch (`capture_experts`) and observed on another (`observe_expert_hessians`)
    give the Hessians of a local replay bit for bit; a process owning some experts' down
    projections holds exactly theirs; one owning none skips the gate/up GEMM and the gather
    but keeps every expert's token count."""
    from streamq.calib.observers import LayerObserver
    from streamq.model import moe

    experts, top_k = _qwen3_moe_experts(models)
    flat, index, weights, mask = _routing(experts, 46, top_k, seed=5)
    _, local = _expert_hessians(experts, flat, index, weights, mask, False, False)
    sink: list = []
    moe.capture_experts(experts, "e", sink, outputs_used=False)
    try:
        with torch.no_grad():
            assert torch.equal(experts(flat, index, weights), torch.zeros_like(flat))
    finally:
        moe.restore_experts(experts)
    (hidden, version, top), = sink
    assert version == hidden._version and torch.equal(top, index)

    def observed(owned: dict[str, set[int]]) -> dict:
        obs = LayerObserver()
        obs.expert_kind, obs.token_mask, obs.owned_experts = "hessian", mask, owned
        moe.observe_expert_hessians(experts, hidden, top, obs, "e", False)
        return {k: (a.result(), a.count) for k, a in obs.expert_hessians.items()}

    for key, (h, count) in observed({}).items():
        assert torch.equal(h, local[key][0]) and torch.equal(count, local[key][1]), key
    some = observed({"e.gate_up": {1, 3}, "e.down": {0, 3}})
    assert torch.equal(some["e.gate_up"][0], local["e.gate_up"][0][[1, 3]])
    assert torch.equal(some["e.down"][0], local["e.down"][0][[0, 3]])

    def no_gemm(*_args, **_kwargs):
        raise AssertionError("a process owning no down projection ran their gate/up GEMM")

    monkeypatch.setattr(moe, "_expert_gate_up", no_gemm)
    none = observed({"e.gate_up": set(), "e.down": set()})
    assert none["e.down"][0].shape[0] == 0 == none["e.gate_up"][0].shape[0]
    for key in ("e.gate_up", "e.down"):
        assert torch.equal(none[key][1], local[key][1]), key
