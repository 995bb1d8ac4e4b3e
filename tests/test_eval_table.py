"""scripts/eval_table.py (`make eval-table`) end to end, small: the dense fixture, CPU, 8 eval samples.

Every quantize run and eval really happens (fp8_dynamic, fp8_static, int8_dynamic with and
without SmoothQuant, fp8_blockwise); the test checks the files the script writes (a row per
scheme with finite numbers, each within 1% of bf16) and its header.
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
SCHEMES = ["fp8_dynamic", "fp8_static", "int8_dynamic", "int8_dynamic+smooth", "fp8_blockwise"]


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
    assert [(r["model"], r["scheme"]) for r in rows] == [("dense", s) for s in ["bf16", *SCHEMES]]
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
        assert r["scaled_mm"] is False and r["matmul"].startswith("simulated")  # CPU: simulated
        slug = r["scheme"].replace("+", "-")
        assert (workdir / f"dense-{slug}" / "config.json").is_file()
        assert (out / "reports" / f"dense-{slug}.json").is_file()
    formats = {r["scheme"]: r["quant_format"] for r in rows[1:]}
    assert formats["int8_dynamic"] == formats["int8_dynamic+smooth"] == \
        "compressed-tensors, INT8 weights, activations dynamic-token"
    assert formats["fp8_blockwise"] == "fp8, FP8 weights in 128x128 blocks, activations dynamic-token-group"
    assert formats["fp8_static"] == "fp8, activations static"
    # SmoothQuant changed the int8 checkpoint (rescaled norms and weights), so its numbers differ.
    by_scheme = {r["scheme"]: r for r in rows}
    assert by_scheme["int8_dynamic+smooth"]["kl"] != by_scheme["int8_dynamic"]["kl"]
    assert result["machine"]["device"] == "cpu"
    assert result["machine"]["torch"] == torch.__version__
    assert result["notes"] == []


def test_markdown_header_and_command(table_run):
    _, out, printed = table_run
    md = (out / "eval_table.md").read_text()
    assert md in printed
    assert "quantized matmuls: simulated FP8 matmuls; simulated INT8 matmuls (exact); simulated block-FP8 " \
        "matmuls" in md
    assert f"torch {torch.__version__}" in md and "transformers " in md
    for scheme in ["bf16", *SCHEMES]:
        assert f"| dense | {scheme} |" in md
    command = next(line for line in md.splitlines() if line.startswith("- reproduce: "))
    assert "--models tests/fixtures/trained/dense" in command and f"--num-samples {SAMPLES}" in command
    assert "--device cpu" in command
