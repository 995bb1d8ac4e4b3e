"""scripts/eval_table.py (`make eval-table`) end to end, small: the dense fixture, CPU, 8 eval samples.

Both quantize runs and both evals really happen; the test checks the files the script writes
(the table's three rows with finite numbers, FP8 within 1% of bf16) and its header.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
DENSE = ROOT / "tests" / "fixtures" / "trained" / "dense"
SAMPLES = 8


@pytest.fixture(scope="module")
def table_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("eval_table")
    out = workdir / "results"
    threads = torch.get_num_threads()
    printed = io.StringIO()
    try:
        # Tiny matmuls: one thread is faster than two on a busy shared machine.
        with contextlib.redirect_stdout(printed):
            rc = load_script("eval_table").main(["--models", str(DENSE), "--device", "cpu",
                                                 "--num-samples", str(SAMPLES), "--threads", "1",
                                                 "--workdir", str(workdir), "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    return workdir, out, printed.getvalue()


def test_table_rows_and_quality(table_run):
    workdir, out, printed = table_run
    result = json.loads((out / "eval_table.json").read_text())
    rows = result["rows"]
    assert [(r["model"], r["scheme"]) for r in rows] == [("dense", "bf16"), ("dense", "fp8_dynamic"),
                                                        ("dense", "fp8_static")]
    bf16 = rows[0]
    assert math.isfinite(bf16["perplexity"]) and 1 < bf16["perplexity"] < 100  # trained (uniform: 2048)
    for r in rows[1:]:
        for key in ("perplexity", "ppl_change", "kl", "top1_agreement"):
            assert isinstance(r[key], float) and math.isfinite(r[key]), (r["scheme"], key, r[key])
        assert abs(r["ppl_change"]) < 0.01, r
        assert r["perplexity"] / bf16["perplexity"] - 1 == pytest.approx(r["ppl_change"], abs=1e-12)
        assert 0 < r["kl"] < 0.01 and 0.9 < r["top1_agreement"] <= 1.0, r
        assert len(r["layer_rel_errors"]) == 4 and all(0 < e < 0.1 for e in r["layer_rel_errors"]), r
        assert r["samples"] == SAMPLES and r["tokens"] > SAMPLES * 100
        assert r["scaled_mm"] is False  # CPU: simulated
        assert (workdir / f"dense-{r['scheme']}" / "config.json").is_file()
        assert (out / "reports" / f"dense-{r['scheme']}.json").is_file()
    assert result["machine"]["device"] == "cpu"
    assert result["machine"]["torch"] == torch.__version__
    assert result["notes"] == []


def test_markdown_header_and_command(table_run):
    _, out, printed = table_run
    md = (out / "eval_table.md").read_text()
    assert md in printed
    assert "FP8 matmuls: simulated" in md
    assert f"torch {torch.__version__}" in md and "transformers " in md
    assert "| dense | fp8_static |" in md and "| dense | fp8_dynamic |" in md and "| dense | bf16 |" in md
    command = next(line for line in md.splitlines() if line.startswith("- reproduce: "))
    assert "--models tests/fixtures/trained/dense" in command and f"--num-samples {SAMPLES}" in command
    assert "--device cpu" in command
