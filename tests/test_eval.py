"""`streamq eval` on small trained models: FP8 keeps quality, a broken layer is named.

The fixtures under tests/fixtures/trained/ are real (if small) language models trained on
Python source by scripts/train_tiny.py, so perplexity and KL mean something here; random
weights would give perplexities near the vocabulary size whatever the quantization did.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from streamq.cli import main as cli_main
from streamq.config import parse_config
from streamq.engine.run import quantize
from streamq.eval import fp8_linear as F
from streamq.eval.report import find_outliers
from streamq.eval.runner import EvalOptions, evaluate
from streamq.quant.fp8 import quantize_fp8, scale_from_absmax

TRAINED = Path(__file__).resolve().parent / "fixtures" / "trained"
CALIB, EVAL = TRAINED / "calib.jsonl", TRAINED / "eval.jsonl"
ARCHS = ("dense", "moe")
SAMPLES, SEQ = 12, 128
# Bounds for FP8 per-tensor W8A8 on these models (measured values are in tests/fixtures/trained/README.md).
MAX_PPL_CHANGE = 0.01
MAX_KL = 0.01  # nats per token
MIN_TOP1 = 0.9
BROKEN_LAYER = 2


pytestmark = pytest.mark.usefixtures("one_thread")


def _job(arch: str, out: Path, algorithm: str, **quant) -> dict:
    cfg = {"global": {"save_path": str(out), "device": "cpu"},
           "model": {"model_path": str(TRAINED / arch)},
           "compression": {"name": "PTQ", "quantization": {"name": algorithm, "bits": 8, **quant}}}
    if algorithm == "fp8_static":
        cfg["dataset"] = {"name": "TextDataset", "data_path": str(CALIB), "num_samples": 16, "max_seq_length": SEQ,
                          "batch_size": 4}
    return cfg


@pytest.fixture(scope="module")
def quantized(tmp_path_factory) -> dict[tuple[str, str], Path]:
    root = tmp_path_factory.mktemp("trained-fp8")
    out = {}
    for arch in ARCHS:
        for algorithm in ("fp8_static", "fp8_dynamic"):
            out[arch, algorithm] = root / f"{arch}-{algorithm}"
            quantize(parse_config(_job(arch, out[arch, algorithm], algorithm)), show_progress=False)
    return out


def _eval(original: Path, quantized: Path, **kw):
    return evaluate(EvalOptions(str(original), str(quantized), str(EVAL), num_samples=SAMPLES, max_seq_length=SEQ,
                                device="cpu", **kw))


@pytest.mark.parametrize("algorithm", ["fp8_static", "fp8_dynamic"])
@pytest.mark.parametrize("arch", ARCHS)
def test_fp8_keeps_quality(quantized, arch, algorithm):
    report = _eval(TRAINED / arch, quantized[arch, algorithm])
    assert report.ppl_original < 60, "the fixture should be a trained model (uniform would be 2048)"
    assert abs(report.ppl_change) < MAX_PPL_CHANGE, report.table()
    assert 0 < report.kl < MAX_KL, report.table()
    assert report.top1_agreement > MIN_TOP1, report.table()
    assert not report.outliers, report.table()
    assert all(0 < r.rel_error < 0.1 for r in report.layers), report.table()
    assert report.tokens > SAMPLES * 100 and report.samples == SAMPLES


@pytest.mark.parametrize("arch", ARCHS)
def test_original_against_itself_is_exact(arch):
    report = _eval(TRAINED / arch, TRAINED / arch)
    assert [r.rel_error for r in report.layers] == [0.0] * 4
    assert [r.stream_error for r in report.layers] == [0.0] * 4
    assert report.kl == 0.0 and report.top1_agreement == 1.0
    assert report.ppl_quantized == report.ppl_original


def _break_layer(src: Path, dst: Path, layer: int, factor: float = 16.0) -> Path:
    """Copy a quantized checkpoint with every weight_scale of one layer multiplied by `factor`."""
    shutil.copytree(src, dst)
    weight_map = json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"]
    file = weight_map[f"model.layers.{layer}.self_attn.q_proj.weight"]
    tensors = load_file(dst / file)
    scaled = {n: t * factor if n.startswith(f"model.layers.{layer}.") and n.endswith(".weight_scale") else t
              for n, t in tensors.items()}
    assert sum(n.endswith(".weight_scale") for n in scaled) > 0
    save_file(scaled, dst / file, metadata={"format": "pt"})
    return dst


def test_wrong_scale_is_flagged_by_name(quantized, tmp_path, capsys):
    broken = _break_layer(quantized["moe", "fp8_static"], tmp_path / "broken", BROKEN_LAYER)
    argv = ["eval", "--original", str(TRAINED / "moe"), "--quantized", str(broken), "--data", str(EVAL),
            "--num-samples", "4", "--max-seq-length", str(SEQ), "--device", "cpu", "--json", str(tmp_path / "r.json")]
    assert cli_main(argv) == 0  # flagged, but only --fail-on-outlier turns that into an exit code
    out = capsys.readouterr().out
    assert f"layer {BROKEN_LAYER}: relative error" in out and "x the median" in out
    assert f"wrote the JSON report to {tmp_path / 'r.json'}" in out
    data = json.loads((tmp_path / "r.json").read_text())
    assert [o["layer"] for o in data["outliers"]] == [BROKEN_LAYER]
    assert data["layers"][BROKEN_LAYER]["rel_error"] > 1.0
    assert cli_main([*argv, "--fail-on-outlier"]) == 4


def test_plot_is_written(quantized, tmp_path):
    # matplotlib is in the test extra: this test runs, it does not skip.
    report = _eval(TRAINED / "dense", quantized["dense", "fp8_dynamic"], batch_size=4)
    report.plot(tmp_path / "errors.png")
    assert (tmp_path / "errors.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("arch,algorithm,method,mode", [
    ("dense", "fp8_dynamic", {"weight": "per-channel", "activation": "per-token"}, "dynamic-token"),
    ("moe", "fp8_static", {"weight": "per-tensor", "activation": "per-tensor"}, "static"),
])
def test_compressed_tensors_format(tmp_path, arch, algorithm, method, mode):
    out = tmp_path / "ct"
    quantize(parse_config(_job(arch, out, algorithm, save_name="compressed-tensors", quant_method=method)),
             show_progress=False)
    report = _eval(TRAINED / arch, out)
    assert report.quant_format == f"compressed-tensors, activations {mode}"
    assert abs(report.ppl_change) < MAX_PPL_CHANGE and report.kl < MAX_KL, report.table()
    if mode == "dynamic-token":
        # The same weights without activation quantization (W8A16): closer still.
        config = json.loads((out / "config.json").read_text())
        config["quantization_config"]["config_groups"]["group_0"]["input_activations"] = None
        (out / "config.json").write_text(json.dumps(config))
        weight_only = _eval(TRAINED / arch, out)
        assert weight_only.quant_format == "compressed-tensors, activations none"
        assert 0 < weight_only.kl < report.kl, (weight_only.table(), report.table())


def test_different_models_fail_with_a_clear_error(capsys):
    argv = ["eval", "--original", str(TRAINED / "dense"), "--quantized", str(TRAINED / "moe"), "--device", "cpu"]
    assert cli_main(argv) == 1
    err = capsys.readouterr().err
    assert "different models" in err and "model_type" in err


def test_outlier_rule():
    assert find_outliers([0.02, 0.021, 0.3, 0.019])[0].layer == 2
    assert [o.layer for o in find_outliers([0.02, 0.5])] == [1]  # the others' median, not one's own
    assert find_outliers([0.0, 0.0, 0.0]) == []
    assert find_outliers([0.01, 0.03, 0.01]) == []  # 3x the median but under the floor
    assert [o.layer for o in find_outliers([0.02, math.nan, 0.02])] == [1]
    assert "12x the median" in find_outliers([0.025, 0.3, 0.025, 0.025])[0].describe()


def _fp8_linear(w: torch.Tensor, mode: str, per_channel: bool, input_scale: float | None) -> F.FP8Linear:
    amax = w.abs().amax(dim=1, keepdim=True) if per_channel else w.abs().amax()
    scale = scale_from_absmax(amax.float())
    lin = F.FP8Linear(w.shape[1], w.shape[0], tuple(scale.shape), mode, () if input_scale else None).to(w.device)
    lin.weight.copy_(quantize_fp8(w, scale))
    lin.weight_scale.copy_(scale)
    if input_scale:
        lin.input_scale.fill_(input_scale)
    return lin


@pytest.mark.parametrize("mode", [F.STATIC, F.DYNAMIC_TENSOR, F.DYNAMIC_TOKEN])
def test_simulated_matmul_is_the_dequantized_product(mode):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(37, 64, generator=g).bfloat16(), torch.randn(48, 64, generator=g)
    lin = _fp8_linear(w, mode, per_channel=mode == F.DYNAMIC_TOKEN, input_scale=4.0 / 448)
    xq, sx = F.quantize_activation(x, mode, lin.input_scale)
    expected = (xq.float() * sx) @ (lin.weight.float() * lin.weight_scale).t()
    torch.testing.assert_close(lin(x).float(), expected, rtol=2**-7, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", [F.STATIC, F.DYNAMIC_TENSOR, F.DYNAMIC_TOKEN])
@pytest.mark.parametrize("per_channel", [False, True])
def test_scaled_mm_matches_simulation(mode, per_channel):
    device = torch.device("cuda")
    if not F.scaled_mm_supported(device):
        pytest.skip("torch._scaled_mm needs compute capability >= 8.9")
    g = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(300, 512, generator=g, device=device) * 2).bfloat16()
    w = torch.randn(256, 512, generator=g, device=device) * 0.05
    lin = _fp8_linear(w, mode, per_channel, input_scale=x.abs().amax().float().item() / 448)
    xq, sx = F.quantize_activation(x, mode, lin.input_scale)
    # Scale of the sum's terms: the tensor-wise FP8 GEMM on Hopper accumulates with limited
    # precision (about 1e-4 of this on an H100); the row-wise one and the simulation in float32.
    w_scale = lin.weight_scale.reshape(-1, 1) if per_channel else lin.weight_scale
    magnitude = (xq.float().abs() * sx) @ (lin.weight.float().abs() * w_scale).t()
    real = F.fp8_matmul(xq, sx, lin.weight, lin.weight_scale, torch.float32, use_scaled_mm=True)
    simulated = F.fp8_matmul(xq, sx, lin.weight, lin.weight_scale, torch.float32, use_scaled_mm=False)
    assert ((real - simulated).abs() <= 2**-12 * magnitude).all()
    # Through the module, in bf16: the same plus one bf16 rounding step (2^-7 relative).
    lin.use_scaled_mm = True
    real = lin(x).float()
    lin.use_scaled_mm = False
    simulated = lin(x).float()
    bound = 2**-7 * torch.maximum(real.abs(), simulated.abs()) + 2**-12 * magnitude
    assert ((real - simulated).abs() <= bound).all()
    assert (real == simulated).float().mean() > 0.9  # most outputs round to the same bf16
