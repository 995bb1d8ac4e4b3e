"""Start-up promises: config and path errors before torch is imported, --data-path like
--model-path, clear messages for missing files and hub ids, plan without a calibration
file, --version, and the README's headline command on the demo model."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import make_config, write_yaml

from streamq import __version__
from streamq.cli import main
from streamq.config import load_config
from streamq.testing.tiny_models import CALIB_FILE, build_tiny_model

REPO = Path(__file__).resolve().parents[1]
A22B = "configs/qwen3/fp8_static/qwen3-a22b_fp8_static_low_memory.yaml"

# Runs the CLI in a fresh interpreter and reports whether torch/transformers got imported.
_PROBE = """
import sys
from streamq.cli import main
rc = main(sys.argv[1:])
print("IMPORTED", "torch" in sys.modules, "transformers" in sys.modules, flush=True)
sys.exit(rc)
"""


def _probe(args: list[str], cwd: Path) -> tuple[int, str, str, float]:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-c", _PROBE, *args], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=120)
    return p.returncode, p.stdout, p.stderr, time.monotonic() - t0


BAD = {
    # id -> (config edit, extra CLI args, exit code, substrings of the error)
    "unknown-key": (lambda c: c["global"].update(bogus=1), [], 2, ["unknown key 'global.bogus'"]),
    "missing-model": (lambda c: c["model"].update(model_path="nowhere/at-all/x"), [], 1,
                      ["model.model_path", "directory not found", "relative paths are taken from the current"]),
    "no-config-json": (lambda c: c["model"].update(model_path="empty_model"), [], 1,
                       ["model.model_path", "config.json: missing"]),
    "missing-data": (lambda c: c["dataset"].update(data_path="data/none.jsonl"), [], 1,
                     ["dataset.data_path", "calibration file not found", "none.jsonl",
                      "relative paths are taken from the current directory"]),
    "bad-data-override": (lambda c: None, ["--data-path", "other.jsonl"], 1, ["dataset.data_path", "other.jsonl"]),
    "save-inside-model": (lambda c: c["global"].update(save_path=c["model"]["model_path"] + "/out"), [], 1,
                          ["is inside model.model_path"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_errors_come_before_torch(tiny_models, tmp_path, case):
    edit, extra, code, needles = BAD[case]
    (tmp_path / "empty_model").mkdir()
    cfg = make_config(tiny_models["llama"], tmp_path / "out", algorithm="fp8_static")
    edit(cfg)
    path = write_yaml(tmp_path / "job.yaml", cfg)
    rc, out, err, seconds = _probe(["quantize", "-c", str(path), "-q", *extra], tmp_path)
    assert rc == code, err
    assert "IMPORTED False False" in out, (out, err)  # neither torch nor transformers was imported
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"
    if "relative paths" in " ".join(needles):
        assert str(tmp_path) in err  # the absolute path tried
    assert not (tmp_path / "out").exists()


def test_hub_id_gets_a_hint(tmp_path, capsys):
    rc = main(["quantize", "-c", str(REPO / A22B), "--save-path", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 1 and "'Qwen/Qwen3-235B-A22B' looks like a Hugging Face hub id" in err, err
    assert "local directories only" in err and "--model-path" in err, err


def test_data_path_overrides_like_model_path(tmp_path):
    data = tmp_path / "calib.jsonl"
    job = load_config(REPO / A22B, {"data_path": str(data), "model_path": str(tmp_path)})
    assert job.dataset.data_path == str(data) and job.model.model_path == str(tmp_path)
    dyn = load_config(REPO / "configs/qwen2_5/fp8_dynamic/qwen2_5-7b_instruct_fp8_dynamic.yaml",
                      {"data_path": str(data)})
    assert dyn.dataset is None and any("--data-path is not used" in n for n in dyn.notes)


def test_plan_needs_no_calibration_file(tiny_models, tmp_path, capsys):
    cfg = make_config(tiny_models["qwen3_moe"], tmp_path / "out", algorithm="fp8_static", num_samples=16,
                      max_seq_length=128)
    cfg["dataset"]["data_path"] = str(tmp_path / "not-here-yet.jsonl")
    rc = main(["plan", "-c", str(write_yaml(tmp_path / "job.yaml", cfg)), "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    plan = json.loads(captured.out)
    assert plan["calib_tokens"] == 16 * 128
    assert any("num_samples x dataset.max_seq_length (16 x 128" in n and "not read" in n for n in plan["notes"])


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"streamq {__version__}"


def _readme_demo_command() -> tuple[str, list[str]]:
    """The `make quantize` command the README prints for the demo model: (CONFIG, ARGS)."""
    text = (REPO / "README.md").read_text().replace("\\\n", " ")
    commands = re.findall(r'make quantize CONFIG=(\S+)\s+ARGS="([^"]*)"', text)
    demo = [(c, a) for c, a in commands if "build/demo/" in a]
    assert demo, "README.md shows no make quantize command for the demo model"
    assert commands[0][0] == demo[0][0], "the demo command should run the headline's config"
    return demo[0][0], shlex.split(demo[0][1])


def test_readme_headline_command_runs_on_the_demo_model(tmp_path, monkeypatch, capsys):
    config, args = _readme_demo_command()
    makefile = (REPO / "Makefile").read_text()
    assert "$(PY) -m streamq quantize -c $(CONFIG) $(ARGS)" in makefile  # what make quantize runs
    model = args[args.index("--model-path") + 1]
    data = args[args.index("--data-path") + 1]
    save = args[args.index("--save-path") + 1]
    build_tiny_model("qwen3_moe", tmp_path / model, num_layers=2)  # `make demo` builds it with 4
    (tmp_path / data).parent.mkdir(parents=True)
    shutil.copyfile(REPO / data, tmp_path / data)
    assert (REPO / data).read_bytes() == CALIB_FILE.read_bytes()
    raw = yaml.safe_load((REPO / config).read_text())
    monkeypatch.chdir(tmp_path)
    rc = main(["quantize", "-c", str(REPO / config), "-q", "--device", "cpu", *args])
    assert rc == 0, capsys.readouterr().err
    qc = json.loads((tmp_path / save / "config.json").read_text())["quantization_config"]
    assert qc["activation_scheme"] == "static" and raw["compression"]["quantization"]["name"] == "fp8_static"


@pytest.mark.parametrize("flag", ["--json", "--plot"])
@pytest.mark.parametrize("where", ["missing-dir", "a-directory"])
def test_eval_outputs_checked_before_it_starts(tmp_path, flag, where):
    target = tmp_path / "nope" / "r.out" if where == "missing-dir" else tmp_path
    # Checkpoints that only look like ones: the destination is checked before anything is loaded.
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    rc, out, err, _ = _probe(["eval", "--original", str(tmp_path / "a"), "--quantized", str(tmp_path / "b"),
                              flag, str(target)], tmp_path)
    assert rc == 2 and f"{flag} {target}" in err, err
    assert ("does not exist" if where == "missing-dir" else "is a directory") in err, err
    assert "IMPORTED False False" in out


@pytest.mark.parametrize("flag", ["--original", "--quantized"])
def test_eval_missing_checkpoint_before_torch(tiny_models, tmp_path, flag):
    paths = {"--original": str(tiny_models["llama"]), "--quantized": str(tiny_models["llama"])}
    paths[flag] = str(tmp_path / "absent")
    rc, out, err, _ = _probe(["eval", "--original", paths["--original"], "--quantized", paths["--quantized"]],
                             tmp_path)
    assert rc == 1 and f"{flag}: directory not found: {tmp_path / 'absent'}" in err, err
    assert "IMPORTED False False" in out
