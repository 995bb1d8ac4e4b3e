"""The output directory: never clobber what streamq did not write, resume the same job,
refuse a different one and say what changed."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from conftest import NUM_LAYERS, make_config, run_job, write_yaml

from streamq.cli import main as cli_main
from streamq.errors import OutputError
from streamq.testing.tiny_models import CALIB_FILE


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


@pytest.mark.parametrize("overwrite", [False, True])
def test_foreign_directory_refused_untouched(job, capsys, overwrite):
    """No manifest: refused with or without --overwrite, and the error suggests a new directory."""
    _, cfg_path, out = job
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"somebody else's weights")
    (out / "config.json").write_text("{}")
    (out / "notes.txt").write_text("do not lose me")
    (out / "subdir").mkdir()
    (out / "subdir" / "run.log").write_text("precious")
    before = snapshot(out)
    rc, err = cli(capsys, cfg_path, *(["--overwrite"] if overwrite else []))
    assert rc == 1
    assert "not empty and was not created by streamq" in err and str(out) in err, err
    assert "new (or empty) directory" in err and "pass --overwrite" not in err and "Rerun with" not in err, err
    assert snapshot(out) == before  # nothing written, deleted or touched


def test_manifest_impostor_is_not_ours(job, capsys):
    """A streamq_run.json that streamq did not write does not make a directory clearable."""
    _, cfg_path, out = job
    out.mkdir()
    (out / "streamq_run.json").write_text('["not a manifest"]')
    (out / "notes.txt").write_text("do not lose me")
    before = snapshot(out)
    rc, err = cli(capsys, cfg_path, "--overwrite")
    assert rc == 1 and "was not created by streamq" in err, err
    assert snapshot(out) == before


def test_overwrite_removes_only_what_the_manifest_lists(job, capsys):
    cfg, cfg_path, out = job
    assert cli(capsys, cfg_path)[0] == 0
    manifest = json.loads((out / "streamq_run.json").read_text())
    listed = set(manifest["files"])
    written = {p.name for p in out.iterdir()}
    assert written <= listed, f"written but not recorded: {written - listed}"
    assert {"config.json", "model.safetensors.index.json", "streamq_report.json", "streamq_run.json"} <= listed
    # The user's files, one with a name a checkpoint could have, one in a subdirectory.
    (out / "notes.txt").write_text("do not lose me")
    (out / "tokenizer_extra.json").write_text("{}")
    (out / "logs").mkdir()
    (out / "logs" / "run.log").write_text("precious")
    mine = {k: v for k, v in snapshot(out).items() if k in ("notes.txt", "tokenizer_extra.json", "logs/run.log")}
    rc, err = cli(capsys, cfg_path, "--overwrite")
    assert rc == 0, err
    assert (out / "config.json").is_file()
    assert {k: v for k, v in snapshot(out).items() if k in mine} == mine


def _user_tree(tmp_path: Path, tiny_models) -> tuple[Path, Path]:
    """A copy of a source checkpoint inside a work directory that also holds notes.txt."""
    work = tmp_path / "work"
    model = work / "model"
    shutil.copytree(tiny_models["llama"], model)
    (work / "notes.txt").write_text("do not lose me")
    (model / "notes.txt").write_text("do not lose me either")
    return work, model


SAVE_PATHS = {
    # id -> save path (given work dir, model dir), whether a run may happen there
    "equal": (lambda w, m: m, False),
    "inside": (lambda w, m: m / "out", False),
    "contains": (lambda w, m: w, False),
    "symlink-to-model": (lambda w, m: w / "link", False),
    "inside-symlink": (lambda w, m: w / "link" / "out", False),
    "relative-dots": (lambda w, m: m / "out" / "..", False),
    "sibling": (lambda w, m: w / "out", True),
}


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("where", sorted(SAVE_PATHS))
def test_source_and_user_files_survive_every_save_path(tiny_models, tmp_path, capsys, where, overwrite):
    work, model = _user_tree(tmp_path, tiny_models)
    (work / "link").symlink_to(model, target_is_directory=True)
    make_path, allowed = SAVE_PATHS[where]
    save = make_path(work, model)
    cfg_path = write_yaml(tmp_path / "job.yaml", make_config(model, save))
    before = snapshot(work)
    extra = ["--overwrite"] if overwrite else []
    for _ in range(2):  # a second run finds the first one's output (or the same refusal)
        rc, err = cli(capsys, cfg_path, *extra)
        if allowed:
            assert rc == 0, err
        else:
            assert rc == 1 and "model.model_path" in err and "choose a save_path outside it" in err, err
    after = snapshot(work)
    kept = {k: v for k, v in after.items() if k in before}
    assert kept == before, "a file that was there before the run changed or vanished"
    if not allowed:
        assert after == before  # refused before anything was written


@pytest.mark.parametrize("overwrite", [False, True])
def test_save_path_holding_the_calibration_file_is_refused(tiny_models, tmp_path, capsys, overwrite):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    data = data_dir / "calib.jsonl"
    shutil.copyfile(CALIB_FILE, data)
    cfg = make_config(tiny_models["llama"], data_dir, algorithm="fp8_static")
    cfg["dataset"]["data_path"] = str(data)
    rc, err = cli(capsys, write_yaml(tmp_path / "job.yaml", cfg), *(["--overwrite"] if overwrite else []))
    assert rc == 1 and "dataset.data_path" in err, err
    assert [p.name for p in data_dir.iterdir()] == ["calib.jsonl"]
    assert data.read_bytes() == CALIB_FILE.read_bytes()


def test_api_refuses_save_path_inside_model(tiny_models, tmp_path):
    """quantize() itself (not only the CLI) refuses, before anything is written."""
    model = tmp_path / "model"
    shutil.copytree(tiny_models["llama"], model)
    before = snapshot(model)
    with pytest.raises(OutputError, match="is inside model.model_path"):
        run_job(make_config(model, model / "out"), overwrite=True)
    assert snapshot(model) == before


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


def test_rerun_via_cli_finished_and_resumed(job, capsys, caplog):
    """A finished job: 'already complete', exit 0, nothing rewritten. An unfinished one:
    the resume says how many layers are done before it starts."""
    _, cfg_path, out = job
    assert cli(capsys, cfg_path)[0] == 0
    times = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    rc = cli_main(["quantize", "-c", str(cfg_path), "-q"])
    stdout = capsys.readouterr().out
    assert rc == 0 and "already complete" in stdout and str(out) in stdout, stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == times

    shards = sorted(out.glob("model-*.safetensors"))
    shards[1].unlink()  # layer 1 lost
    (out / "config.json").unlink()
    with caplog.at_level("INFO", logger="streamq"):
        rc = cli_main(["quantize", "-c", str(cfg_path), "-q"])
    stdout = capsys.readouterr().out
    assert rc == 0 and f"({NUM_LAYERS - 1} resumed)" in stdout, stdout
    assert f"resuming {out}: {NUM_LAYERS - 1} of {NUM_LAYERS} layers already done" in caplog.text, caplog.text
    assert f"shard '{shards[1].name}' (layer-1) is missing; redoing it" in caplog.text, caplog.text


def test_checksum_failure_is_named(job, capsys, caplog):
    _, cfg_path, out = job
    assert cli(capsys, cfg_path)[0] == 0
    shard = sorted(out.glob("model-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes
    shard.write_bytes(bytes(data))
    (out / "config.json").unlink()
    with caplog.at_level("INFO", logger="streamq"):
        assert cli(capsys, cfg_path)[0] == 0
    assert f"shard '{shard.name}' (layer-0) does not match the sha256 recorded in streamq_run.json; redoing it" \
        in caplog.text, caplog.text


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
