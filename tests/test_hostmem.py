"""Host memory flat in depth on the CPU (streamq.hostmem): oneDNN's per-shape caches are
bounded unless the user set them, and a static MoE run's peak at 32 layers stays within 10%
of its peak at 4 (it grew 2x with the default caches, since MoE experts see a new GEMM shape
in nearly every batch). Speed against the default caches: `make bench-host-depth`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import write_yaml

from streamq.hostmem import CPU_KERNEL_CACHE_ENTRIES, bound_cpu_kernel_caches, trim_heap
from streamq.testing.synthetic import write_synthetic

REPO = Path(__file__).resolve().parents[1]
CLI = "import sys; from streamq.cli import main; sys.exit(main(sys.argv[1:]))"


def test_caches_are_bounded_unless_the_user_set_them(monkeypatch):
    monkeypatch.delenv("LRU_CACHE_CAPACITY", raising=False)
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "512")
    bound_cpu_kernel_caches()
    assert os.environ["LRU_CACHE_CAPACITY"] == str(CPU_KERNEL_CACHE_ENTRIES)
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "512"  # the user's value stays
    trim_heap()  # callable wherever it runs (a no-op without glibc)


def _peak(model: Path, out: Path, cfg_path: Path) -> int:
    cfg = {"global": {"save_path": str(out), "device": "cpu"}, "model": {"model_path": str(model)},
           "compression": {"name": "PTQ", "quantization": {"name": "fp8_static", "bits": 8}},
           "dataset": {"name": "RandomTokens", "num_samples": 16, "max_seq_length": 256, "batch_size": 4,
                       "seed": 0}}
    env = {k: v for k, v in os.environ.items() if k not in ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY")}
    subprocess.run([sys.executable, "-c", CLI, "quantize", "-c", str(write_yaml(cfg_path, cfg)), "-q"], cwd=REPO,
                   env=dict(env, PYTHONPATH=str(REPO)), check=True, capture_output=True, timeout=600)
    return json.loads((out / "streamq_report.json").read_text())["report"]["peak_host_bytes"]


def test_static_moe_peak_is_flat_in_depth(tmp_path):
    peaks = {}
    for layers in (4, 32):
        model = write_synthetic("tiny-moe", tmp_path / f"q{layers}", layers, seed=0)
        peaks[layers] = _peak(model, tmp_path / f"out{layers}", tmp_path / f"job{layers}.yaml")
    assert peaks[32] <= 1.10 * peaks[4], {k: v / 2**20 for k, v in peaks.items()}
