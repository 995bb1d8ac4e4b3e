"""CUDA path: the same job on the GPU gives the CPU's scales within float rounding, and
peak GPU memory is one layer's worth, flat in depth. Skipped without a CUDA device."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_config, run_job
from safetensors.torch import load_file

from streamq.testing.synthetic import write_synthetic

pytestmark = pytest.mark.gpu
REPO = Path(__file__).resolve().parents[1]


def _tensors(out: Path) -> dict[str, torch.Tensor]:
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    result: dict[str, torch.Tensor] = {}
    for file in sorted(set(weight_map.values())):
        result.update(load_file(str(out / file)))
    return result


@pytest.mark.parametrize("arch", ["qwen3", "qwen3_moe"])
def test_gpu_scales_match_cpu(tiny_models, tmp_path, arch):
    outs = {}
    for device in ("cpu", "cuda"):
        outs[device] = tmp_path / device
        run_job(make_config(tiny_models[arch], outs[device], algorithm="fp8_static", device=device,
                            num_samples=16, max_seq_length=128))
    cpu, gpu = _tensors(outs["cpu"]), _tensors(outs["cuda"])
    assert sorted(cpu) == sorted(gpu)
    worst = 0.0
    for name in cpu:
        if name.endswith("weight_scale"):  # weights never pass through a matmul: exact
            assert torch.equal(cpu[name], gpu[name]), name
        elif name.endswith("input_scale"):
            rel = abs(float(gpu[name]) - float(cpu[name])) / float(cpu[name])
            worst = max(worst, rel)
    print(f"{arch}: worst relative input_scale difference GPU vs CPU: {worst:.2e}")
    # bf16 activations: GPU and CPU kernels round differently, compounding over layers.
    assert worst < 2e-2


def _peak_gpu(model: Path, out: Path) -> int:
    cfg = make_config(model, out, algorithm="fp8_static", device="cuda", num_samples=8, max_seq_length=256,
                      batch_size=2)
    cfg["dataset"] = {"name": "RandomTokens", "num_samples": 8, "max_seq_length": 256, "batch_size": 2}
    cfg["compression"]["quantization"]["hidden_cache"] = "host"
    script = (f"import sys, json; sys.path.insert(0, {str(REPO / 'tests')!r}); from conftest import run_job; "
              "r = run_job(json.loads(sys.argv[1])); print(r.peak_gpu_bytes)")
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(cfg)], capture_output=True, text=True,
                          cwd=REPO, check=True)
    return int(proc.stdout.strip().splitlines()[-1])


def test_peak_gpu_memory_is_flat_in_depth(tmp_path):
    peaks = {}
    for layers in (2, 6):
        model = write_synthetic("tiny-moe", tmp_path / f"m{layers}", layers, log=lambda *_: None)
        peaks[layers] = _peak_gpu(model, tmp_path / f"o{layers}")
    print(f"peak GPU bytes: 2 layers {peaks[2]}, 6 layers {peaks[6]}")
    assert abs(peaks[6] - peaks[2]) <= 0.02 * peaks[2]


@pytest.mark.parametrize("implementation", ["grouped_mm", "batched_mm", "eager"])
def test_captured_expert_statistics_on_cuda(tiny_models, implementation, monkeypatch):
    """The row order of transformers' grouped forward on CUDA (its torch.sort) is the one
    streamq assumes when it reads the gated intermediate's statistics."""
    from test_static_streaming import check_captured_expert_statistics

    check_captured_expert_statistics(tiny_models["qwen3_moe"], implementation, monkeypatch, torch.device("cuda"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("algorithm", ["int4_awq", "int4_gptq"])
def test_calibrated_int4_gpu_peak_is_planned(tmp_path, algorithm):
    """Qwen3-30B-A3B geometry, 2 layers: the plan's GPU peak holds the run's (AWQ: the
    recorded blocks and the float32 rescaled weights; GPTQ: Hessians and the solve), and is
    not more than a third above it."""
    model = write_synthetic("qwen3-30b-a3b", tmp_path / "m", 2, device="cuda", vocab_size=32768,
                            log=lambda *_: None)
    cfg = {"global": {"save_path": str(tmp_path / "out"), "device": "cuda"}, "model": {"model_path": str(model)},
           "compression": {"name": "PTQ", "quantization": {"name": algorithm, "bits": 4}},
           "dataset": {"name": "RandomTokens", "num_samples": 32, "max_seq_length": 1024, "batch_size": 4}}
    report = run_job(cfg)
    print(f"{algorithm}: peak GPU {report.peak_gpu_bytes / 2**30:.2f} GiB, "
          f"plan {report.planned_gpu_bytes / 2**30:.2f} GiB")
    assert report.peak_gpu_bytes <= report.planned_gpu_bytes
    assert report.planned_gpu_bytes <= 1.35 * report.peak_gpu_bytes
