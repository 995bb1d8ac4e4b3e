"""Memory budgets on `quantize`: refused up front with exit 3, nothing written."""

from __future__ import annotations

from conftest import make_config, write_yaml

from streamq.cli import main


def test_quantize_refuses_a_budget_that_cannot_fit(tiny_models, tmp_path, capsys):
    out = tmp_path / "out"
    config = write_yaml(tmp_path / "job.yaml", make_config(tiny_models["qwen3_moe"], out, algorithm="fp8_static"))
    code = main(["quantize", "-c", str(config), "--max-cpu-memory", "64MiB", "-q"])
    err = capsys.readouterr().err
    assert code == 3
    assert "needs at least" in err and "64.0 MiB" in err
    assert not out.exists()


def test_quantize_within_budget_records_plan_next_to_measurement(tiny_models, tmp_path):
    import json

    out = tmp_path / "out"
    config = write_yaml(tmp_path / "job.yaml", make_config(tiny_models["llama"], out))
    assert main(["quantize", "-c", str(config), "--max-cpu-memory", "64GiB", "-q"]) == 0
    saved = json.loads((out / "streamq_report.json").read_text())
    assert saved["plan"]["predicted_peak_host_bytes"] > 0
    assert saved["report"]["peak_host_bytes"] > 0
