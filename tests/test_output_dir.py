"""The output directory: never clobber what streamq did not write, resume the same job,
refuse a different one and say what changed."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from conftest import NUM_LAYERS, make_config, run_job, write_yaml

from streamq.cli import main as cli_main
from streamq.errors import OutputError


def snapshot(d: Path) -> dict[str, tuple[str, int]]:
    """Relative path -> (sha256, mtime_ns) of every file below d (directories recursed)."""
    return {p.relative_to(d).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(d.rglob("*")) if p.is_file()}


def outputs(d: Path) -> dict[str, str]:
    """Checksums of what a loader reads (the manifest and report are streamq's own)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())
            if p.is_file() and p.name not in ("streamq_run.json", "streamq_report.json")}


def cli(capsys, cfg_path: Path, *extra: str) -> tuple[int, str]:
    rc = cli_main(["quantize", "-c", str(cfg_path), "-q", *extra])
    return rc, capsys.readouterr().err


@pytest.fixture
def job(tiny_models, tmp_path):
    out = tmp_path / "out"
    cfg = make_config(tiny_models["llama"], out)
    return cfg, write_yaml(tmp_path / "job.yaml", cfg), out


def test_foreign_directory_refused_untouched(job, capsys):
    _, cfg_path, out = job
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"somebody else's weights")
    (out / "notes.txt").write_text("do not lose me")
    before = snapshot(out)
    rc, err = cli(capsys, cfg_path)
    assert rc == 1
    assert "not empty and was not created by streamq" in err and "--overwrite" in err and str(out) in err
    assert snapshot(out) == before  # nothing written, deleted or touched

    rc, err = cli(capsys, cfg_path, "--overwrite")  # only checkpoint-like files there: replaced
    assert rc == 0, err
    assert (out / "config.json").is_file() and not (out / "notes.txt").exists()
    assert (out / "model.safetensors").exists() is False


@pytest.mark.parametrize("intruder", ["notes.docx", "subdir", "a-symlink-free-binary"])
def test_overwrite_refuses_non_checkpoint_entries(job, capsys, intruder):
    _, cfg_path, out = job
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"old weights")
    (out / "config.json").write_text("{}")
    if intruder == "subdir":
        (out / intruder).mkdir()
        (out / intruder / "run.log").write_text("precious")
    else:
        (out / intruder).write_bytes(b"\x00precious")
    before = snapshot(out)
    rc, err = cli(capsys, cfg_path, "--overwrite")
    assert rc == 1
    assert f"'{intruder}' is not a checkpoint file" in err, err
    assert snapshot(out) == before  # refused before deleting anything


def test_overwrite_replaces_a_streamq_run_of_another_job(job, capsys, tmp_path):
    cfg, cfg_path, out = job
    assert cli(capsys, cfg_path)[0] == 0
    other = dict(cfg, compression={"name": "PTQ", "quantization": dict(cfg["compression"]["quantization"],
                                                                       save_name="compressed-tensors")})
    other_path = write_yaml(tmp_path / "other.yaml", other)
    rc, err = cli(capsys, other_path, "--overwrite")
    assert rc == 0, err
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors"


@pytest.mark.parametrize("algorithm", ["fp8_dynamic", "fp8_static"])
def test_rerun_same_job_resumes(tiny_models, tmp_path, algorithm):
    out = tmp_path / "out"
    cfg = make_config(tiny_models["qwen3"], out, algorithm=algorithm)
    first = run_job(cfg)
    assert first.layers_skipped == 0
    done = outputs(out)
    shard_times = {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")}

    again = run_job(cfg)  # complete run: every layer is skipped, no shard rewritten
    assert again.layers_skipped == NUM_LAYERS
    assert outputs(out) == done
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")} == shard_times

    # An interrupted run: layer 1's shard lost, layer 0's shard damaged, nothing marked complete.
    shards = sorted(out.glob("model-*.safetensors"))
    shards[1].unlink()
    (out / "config.json").unlink()
    (out / "model.safetensors.index.json").unlink()
    resumed = run_job(cfg)
    assert resumed.layers_skipped == NUM_LAYERS - 1
    assert outputs(out) == done

    data = bytearray(shards[0].read_bytes())
    data[-1] ^= 0xFF  # same size, different checksum: must be redone, not trusted
    shards[0].write_bytes(bytes(data))
    (out / "config.json").unlink()
    redone = run_job(cfg)
    assert redone.layers_skipped == NUM_LAYERS - 1
    assert outputs(out) == done


def test_rerun_via_cli_resumes(job, capsys):
    _, cfg_path, out = job
    assert cli(capsys, cfg_path)[0] == 0
    rc = cli_main(["quantize", "-c", str(cfg_path), "-q"])
    stdout = capsys.readouterr().out
    assert rc == 0 and f"({NUM_LAYERS} resumed)" in stdout, stdout


CHANGES = {
    # id -> (edit of the quantization section, substrings naming what changed)
    "save_name": (dict(save_name="compressed-tensors"), ["save_name", "fp8", "compressed-tensors"]),
    "ignore_layers": (dict(ignore_layers=["lm_head", "re:.*down_proj"]), ["ignore_layers", "down_proj"]),
    "algorithm": (dict(name="fp8_static"), ["compression.quantization.name", "fp8_dynamic", "fp8_static"]),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_different_job_refused_saying_what_changed(tiny_models, tmp_path, capsys, change):
    out = tmp_path / "out"
    cfg = make_config(tiny_models["llama"], out)
    run_job(cfg)
    before = snapshot(out)
    edit, needles = CHANGES[change]
    other = make_config(tiny_models["llama"], out, algorithm=edit.get("name", "fp8_dynamic"),
                        save_name=edit.get("save_name", "fp8"), ignore_layers=edit.get("ignore_layers"))
    rc, err = cli(capsys, write_yaml(tmp_path / "other.yaml", other))
    assert rc == 1
    line = err.strip().splitlines()[-1]
    assert line.startswith("streamq: error: ") and "different streamq job" in line and "--overwrite" in line, line
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    assert snapshot(out) == before


def test_different_source_refused(tiny_models, tmp_path):
    out = tmp_path / "out"
    run_job(make_config(tiny_models["llama"], out))
    with pytest.raises(OutputError, match="source checkpoint changed"):
        run_job(make_config(tiny_models["qwen2"], out))


def test_save_path_is_a_file(job, capsys):
    _, cfg_path, out = job
    out.write_text("not a directory")
    rc, err = cli(capsys, cfg_path)
    assert rc == 1 and "not a directory" in err
    assert out.read_text() == "not a directory"


def test_empty_existing_directory_is_used(job, capsys):
    _, cfg_path, out = job
    out.mkdir()
    rc, err = cli(capsys, cfg_path)
    assert rc == 0, err
    assert (out / "config.json").is_file()
