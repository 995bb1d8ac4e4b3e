"""Crash safety: SIGKILL at any point, rerun, and the result is byte-identical."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from streamq.testing.tiny_models import build_tiny_model

REPO = Path(__file__).resolve().parents[1]
CALIB = REPO / "data" / "calib" / "tiny_chat.jsonl"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("resume-models")
    return {"dense": build_tiny_model("qwen3", root / "dense", num_layers=4),
            "moe": build_tiny_model("qwen3_moe", root / "moe", num_layers=4)}


def write_config(path: Path, model: Path, out: Path, algo: str, *, checkpoint_layers: int = 0) -> Path:
    cfg = {
        "global": {"save_path": str(out), "device": "cpu", "cache_checkpoint_layers": checkpoint_layers},
        "model": {"model_path": str(model)},
        "compression": {"name": "PTQ", "quantization": {"name": algo, "bits": 8, "ignore_layers": ["lm_head"]}},
    }
    if algo == "fp8_static":
        cfg["dataset"] = {"name": "TextDataset", "data_path": str(CALIB), "max_seq_length": 64,
                          "num_samples": 8, "batch_size": 2}
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_cli(config: Path, kill_at: str | None = None, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("STREAMQ_KILL_AT", None)
    if kill_at:
        env["STREAMQ_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, "-m", "streamq", "quantize", "-c", str(config), "-q", *extra],
                          env=env, capture_output=True, text=True, timeout=300)


def digest_dir(out: Path) -> dict[str, str]:
    """Checksums of everything a loader reads (the run manifest and report are ours)."""
    skip = {"streamq_run.json", "streamq_report.json"}
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.iterdir()) if p.is_file() and p.name not in skip}


def looks_complete(out: Path) -> bool:
    return (out / "config.json").is_file()


@pytest.fixture(scope="module")
def baselines(models, tmp_path_factory) -> dict[tuple[str, str], dict[str, str]]:
    root = tmp_path_factory.mktemp("baselines")
    result = {}
    for name, model in models.items():
        for algo in ("fp8_dynamic", "fp8_static"):
            out = root / f"{name}-{algo}"
            proc = run_cli(write_config(root / f"{name}-{algo}.yaml", model, out, algo))
            assert proc.returncode == 0, proc.stderr
            result[(name, algo)] = digest_dir(out)
    return result


KILL_POINTS = {
    "fp8_dynamic": ["shard-mid-write:2", "shard-tmp-written:2", "layer-recorded:1", "layer-recorded:3",
                    "before-config:1"],
    "fp8_static": ["calibrate-batch:3", "calibrate-batch:9", "shard-mid-write:3", "shard-tmp-written:2",
                   "layer-recorded:2",
                   "cache-checkpoint-batch:2", "before-config:1"],
}


@pytest.mark.parametrize("model_name", ["dense", "moe"])
@pytest.mark.parametrize("algo,kill_at", [(a, k) for a, ks in KILL_POINTS.items() for k in ks])
def test_kill_and_resume_is_byte_identical(models, baselines, tmp_path, model_name, algo, kill_at):
    out = tmp_path / "out"
    config = write_config(tmp_path / "job.yaml", models[model_name], out, algo, checkpoint_layers=1)
    killed = run_cli(config, kill_at)
    assert killed.returncode == -9, (killed.returncode, killed.stderr[-2000:])
    assert not looks_complete(out), "a killed run must not look like a finished checkpoint"
    manifest = json.loads((out / "streamq_run.json").read_text())
    assert manifest["status"] == "running"
    resumed = run_cli(config)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert digest_dir(out) == baselines[(model_name, algo)]
    assert json.loads((out / "streamq_run.json").read_text())["status"] == "complete"
    assert not (out / ".streamq_cache").exists()
    assert not list(out.glob(".*.tmp"))


def test_resume_uses_cache_checkpoint(models, baselines, tmp_path):
    """Killed once layer 2's shard is recorded (the 4th record: the non-layer shard is
    written first), before the cache checkpoint for layer 3: the resume restores the
    checkpoint taken after layer 1 and replays only layer 2, not 0-2."""
    out = tmp_path / "out"
    config = write_config(tmp_path / "job.yaml", models["dense"], out, "fp8_static", checkpoint_layers=1)
    assert run_cli(config, "layer-recorded:4").returncode == -9
    ckpts = sorted(p.name for p in (out / ".streamq_cache").glob("checkpoint-layer-*"))
    assert ckpts, "a cache checkpoint should exist"
    assert run_cli(config).returncode == 0
    report = json.loads((out / "streamq_report.json").read_text())["report"]
    replayed = [s["layer"] for s in report["stages"] if "calibrate" in s and "quantize" not in s]
    computed = [s["layer"] for s in report["stages"] if "quantize" in s]
    assert replayed == [2]
    assert computed == [3]
    assert digest_dir(out) == baselines[("dense", "fp8_static")]


def test_corrupted_finished_shard_is_redone(models, baselines, tmp_path):
    out = tmp_path / "out"
    config = write_config(tmp_path / "job.yaml", models["moe"], out, "fp8_dynamic")
    assert run_cli(config).returncode == 0
    shard = out / "model-00002-of-00005.safetensors"
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF  # flip bits inside tensor data: the header still parses
    shard.write_bytes(bytes(data))
    proc = run_cli(config)
    assert proc.returncode == 0, proc.stderr
    assert digest_dir(out) == baselines[("moe", "fp8_dynamic")]
    report = json.loads((out / "streamq_report.json").read_text())["report"]
    assert report["layers_skipped"] == 3  # the three intact layers


def test_changed_config_refuses_to_resume(models, tmp_path):
    out = tmp_path / "out"
    config = write_config(tmp_path / "job.yaml", models["dense"], out, "fp8_dynamic")
    assert run_cli(config, "layer-recorded:2").returncode == -9
    other = write_config(tmp_path / "other.yaml", models["dense"], out, "fp8_static")
    proc = run_cli(other)
    assert proc.returncode == 1
    assert "quantization config changed" in proc.stderr and "--overwrite" in proc.stderr
    assert run_cli(other, None, "--overwrite").returncode == 0


def test_disk_full_is_resumable(models, baselines, tmp_path, monkeypatch):
    """ENOSPC while writing a shard: a clear error, nothing looks finished, a rerun completes."""
    import errno

    from streamq.checkpoint import writer as writer_mod
    from streamq.config import load_config
    from streamq.engine import run as run_mod
    from streamq.errors import OutputError

    out = tmp_path / "out"
    config = write_config(tmp_path / "job.yaml", models["moe"], out, "fp8_static")
    real = writer_mod.atomic_save_tensors
    calls = {"n": 0}

    def full_disk(path, tensors):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, tensors)

    monkeypatch.setattr(run_mod, "atomic_save_tensors", full_disk)
    with pytest.raises(OutputError, match="No space left on device.*rerun the same command"):
        run_mod.quantize(load_config(config), show_progress=False)
    assert not looks_complete(out)
    monkeypatch.setattr(run_mod, "atomic_save_tensors", real)
    run_mod.quantize(load_config(config), show_progress=False)
    assert digest_dir(out) == baselines[("moe", "fp8_static")]
