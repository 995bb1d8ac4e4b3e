"""Several processes under torchrun (gloo on CPU): the output is byte-identical to one
process, a rank killed mid-run stops the job, and one process resumes it to the same bytes."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_config, write_yaml

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cfg_path: Path, nproc: int, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "streamq", "quantize", "-c", str(cfg_path), "-q"]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-port", str(_free_port()), "-m", "streamq", "quantize", "-c", str(cfg_path), "-q"]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _digests(out: Path) -> dict[str, str]:
    files = sorted(out.glob("*.safetensors")) + [out / "config.json", out / "model.safetensors.index.json"]
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


@pytest.fixture(scope="module")
def single(tiny_models, tmp_path_factory):
    """One-process fp8_dynamic outputs of the tiny dense and MoE models."""
    root = tmp_path_factory.mktemp("dist_single")
    outs = {}
    for arch in ("qwen3", "qwen3_moe"):
        out = root / arch
        r = _run(write_yaml(root / f"{arch}.yaml", make_config(tiny_models[arch], out)), 1)
        assert r.returncode == 0, r.stderr
        outs[arch] = out
    return outs


@pytest.mark.parametrize("arch", ["qwen3", "qwen3_moe"])
def test_two_processes_write_the_same_bytes(tiny_models, single, tmp_path, arch):
    out = tmp_path / "out"
    r = _run(write_yaml(tmp_path / "job.yaml", make_config(tiny_models[arch], out)), 2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _digests(out) == _digests(single[arch])
    assert not list(out.glob("streamq_run.rank*.json"))  # merged into streamq_run.json by rank 0
    assert sum(line.startswith("wrote /") for line in r.stdout.splitlines()) == 1  # rank 0 reports


def test_killed_rank_stops_the_job_and_one_process_resumes(tiny_models, single, tmp_path):
    out = tmp_path / "out"
    cfg = write_yaml(tmp_path / "job.yaml", make_config(tiny_models["qwen3_moe"], out))
    r = _run(cfg, 2, {"STREAMQ_KILL_AT": "layer-recorded:1", "STREAMQ_KILL_RANK": "1"})
    assert r.returncode != 0
    assert not (out / "config.json").exists()  # nothing looks finished
    r = _run(cfg, 1)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _digests(out) == _digests(single["qwen3_moe"])


def test_calibrated_scheme_is_refused_with_several_processes(tiny_models, tmp_path):
    out = tmp_path / "out"
    cfg = make_config(tiny_models["qwen3"], out, algorithm="fp8_static")
    r = _run(write_yaml(tmp_path / "job.yaml", cfg), 2)
    assert r.returncode != 0
    assert "one process" in r.stderr
    assert not out.exists()
