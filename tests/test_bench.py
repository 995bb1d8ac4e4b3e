"""`make bench` end to end at CI size: tiny-dense, 2 layers, a few samples, CPU, warm page cache.

Checks that the whole benchmark runs (synthetic source, I/O floor, both quantize runs in
their own processes, compute floor, bench.json/md/png) and that its numbers are sane:
positive finite ratios, and byte counts that match the files on disk.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pytest
from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
LAYERS = 2
# Every registered scheme that runs without options: the plug-in ones go through the same path.
ALGOS = ("fp8_dynamic", "fp8_static", "int8_dynamic", "fp8_blockwise")


@pytest.fixture(scope="module")
def bench():
    return load_script("bench")


@pytest.fixture(scope="module")
def bench_run(bench, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("bench")
    argv = ["--geometry", "tiny-dense", "--layers", str(LAYERS), "--samples", "4", "--seq-len", "16",
            "--batch-size", "2", "--device", "cpu", "--cache", "warm", "--repeat", "2",
            "--workdir", str(workdir), "--keep", "--algos", ",".join(ALGOS)]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert bench.main(argv) == 0
    return workdir, argv, printed.getvalue()


def _sizes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


@pytest.mark.slow
def test_bench_end_to_end(bench_run):
    workdir, _, printed = bench_run
    results = workdir / "results"
    for name in ("bench.json", "bench.md", "bench.png"):
        assert (results / name).is_file() and (results / name).stat().st_size > 0, name
    assert (results / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads((results / "bench.json").read_text())

    src = Path(result["source"]["path"])
    assert result["io_floor"]["bytes"] == result["source"]["bytes"] == _sizes(src) > 0
    assert result["io_floor"]["seconds"] > 0 and math.isfinite(result["io_floor"]["gbps"])
    assert result["io_floor"]["seconds"] == min(result["io_floor"]["all_seconds"])
    assert len(result["io_floor"]["all_seconds"]) == result["repeat"] == 2
    assert result["cache"]["state"] == "warm"

    cf = result["compute_floor"]
    assert cf["seconds"] > 0 and len(cf["per_layer"]) == LAYERS and cf["tokens"] == 4 * 16

    assert set(result["algos"]) == set(ALGOS)
    for algo, a in result["algos"].items():
        out = Path(a["output_dir"])
        assert out.is_dir(), f"{algo}: --keep must keep the output"
        assert a["bytes_written"] == a["output_bytes"] == a["write_floor"]["bytes"] == _sizes(out) > 0
        # streamq reads tensor data (no headers); static reads the embedding twice (stem + copy).
        assert 0.9 * _sizes(src) < a["bytes_read"] <= 1.5 * _sizes(src)
        for key in ("wall_s", "io_floor_s", "floor_s", "ratio", "gbps"):
            assert math.isfinite(a[key]) and a[key] > 0, (algo, key, a[key])
        assert a["floor_s"] == pytest.approx(a["io_floor_s"] + a["compute_floor_s"])
        assert a["ratio"] == pytest.approx(a["wall_s"] / a["floor_s"])
        assert a["peak_host_rss_bytes"] > 0 and a["peak_gpu_bytes"] == 0
        assert len(a["all_wall_s"]) == 2 and a["wall_s"] == min(a["all_wall_s"])
        assert [s["layer"] for s in a["stages"]] == list(range(LAYERS))
        assert a["rss_samples"] and all(r > 0 for _, r in a["rss_samples"])
    assert result["algos"]["fp8_static"]["compute_floor_s"] == cf["seconds"]
    for algo in ("fp8_dynamic", "int8_dynamic", "fp8_blockwise"):  # nothing to calibrate
        assert result["algos"][algo]["compute_floor_s"] == 0
    # The outputs are what each scheme writes: INT8 compressed-tensors, block FP8 in vLLM's layout.
    for algo, method in (("int8_dynamic", "compressed-tensors"), ("fp8_blockwise", "fp8")):
        qc = json.loads((Path(result["algos"][algo]["output_dir"]) / "config.json").read_text())["quantization_config"]
        assert qc["quant_method"] == method, (algo, qc)
    assert "weight_block_size" in json.loads(
        (Path(result["algos"]["fp8_blockwise"]["output_dir"]) / "config.json").read_text())["quantization_config"]

    md = (results / "bench.md").read_text()
    assert all(f"| {algo} |" in md for algo in ALGOS) and "wall / floor" in md
    assert result["command"].startswith("python scripts/bench.py --geometry tiny-dense --layers 2")
    assert "--repeat 2" in result["command"] and "repeats: 2" in md
    assert "| fp8_static |" in printed and "reproduce: python scripts/bench.py" in printed


def test_bench_reuses_source(bench, bench_run):
    workdir, argv, _ = bench_run
    args = bench.build_parser().parse_args(argv)
    src, reused = bench.ensure_source(args, workdir / "logs")
    assert reused and (src / "config.json").is_file()


def test_bench_rejects_unknown_algorithm(bench, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--algos", "fp8_dynamic,int4_magic"])
    assert exc.value.code == 2
    assert "int4_magic" in capsys.readouterr().err
