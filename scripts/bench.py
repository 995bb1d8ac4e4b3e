"""Benchmark streamq against the I/O and compute floor on a synthetic checkpoint.

Writes (or reuses) a synthetic checkpoint of a real model's geometry under --workdir, then
measures in one run and one page-cache state: the I/O floor (plain sequential read of the
source files, plain write + fsync of as many bytes as each quantized output has), the
compute floor of fp8_static (the layers' forwards alone, weights already on the device),
and streamq's `quantize` per algorithm, each in its own process. Results go to --out as
bench.json, bench.md and bench.png; the Markdown table and the command that reproduces it
are printed. docs/benchmarks.md explains every column.

Usage:
  python scripts/bench.py [--geometry tiny-moe] [--layers 4] [--algos fp8_dynamic,fp8_static]
      [--samples 32] [--seq-len 256] [--batch-size 8] [--device auto|cpu|cuda] [--vocab-size V]
      [--workdir bench_out] [--out DIR] [--cache auto|cold|warm] [--hidden-cache auto] [--repeat 1] [--keep]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing the package

from streamq.bench import floors, render, worker  # noqa: E402
from streamq.config import CACHE_LOCATIONS  # noqa: E402
from streamq.schemes.base import get_scheme, scheme_names  # noqa: E402
from streamq.testing.synthetic import GEOMETRIES, build_config, write_synthetic  # noqa: E402

INDEX_FILE = "model.safetensors.index.json"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--geometry", default="tiny-moe", choices=sorted(GEOMETRIES))
    p.add_argument("--layers", type=int, default=4, help="decoder layers in the synthetic checkpoint")
    p.add_argument("--algos", default="fp8_dynamic,fp8_static",
                   help=f"comma-separated, from {', '.join(scheme_names())}")
    p.add_argument("--samples", type=int, default=32, help="calibration samples (fp8_static)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per calibration sample")
    p.add_argument("--batch-size", type=int, default=8, help="calibration batch size")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--vocab-size", type=int, default=None,
                   help="shrink the vocabulary (keeps the embedding/lm_head shard small for big geometries)")
    p.add_argument("--workdir", type=Path, default=Path("bench_out"),
                   help="synthetic checkpoint (reused when it matches), outputs, results")
    p.add_argument("--out", type=Path, default=None, help="results directory (default WORKDIR/results)")
    p.add_argument("--cache", default="auto", choices=("auto", "cold", "warm"),
                   help="page cache: cold drops it before every read measurement (root); warm reads the "
                        "source once first; auto tries cold, falls back to warm")
    p.add_argument("--hidden-cache", default="auto", choices=CACHE_LOCATIONS,
                   help="streamq's hidden-state cache location for fp8_static")
    p.add_argument("--repeat", type=int, default=1,
                   help="measure everything N times, interleaved, and report each number's minimum")
    p.add_argument("--keep", action="store_true",
                   help="keep the quantized outputs (WORKDIR/out-ALGO); the synthetic source is always kept")
    return p


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    algos = [a.strip() for a in args.algos.split(",") if a.strip()]
    bad = [a for a in algos if a not in scheme_names()]
    if not algos or bad:
        p.error(f"--algos: {bad or 'empty'}; choose from {', '.join(scheme_names())}")
    if len(set(algos)) != len(algos):
        p.error("--algos lists an algorithm twice")
    for name in ("layers", "samples", "seq_len", "batch_size", "repeat"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return algos


def reproduce_command(args: argparse.Namespace, algos: list[str]) -> str:
    cmd = ["python", "scripts/bench.py", "--geometry", args.geometry, "--layers", str(args.layers),
           "--algos", ",".join(algos), "--samples", str(args.samples), "--seq-len", str(args.seq_len),
           "--batch-size", str(args.batch_size), "--device", args.device]
    if args.vocab_size is not None:
        cmd += ["--vocab-size", str(args.vocab_size)]
    cmd += ["--workdir", str(args.workdir), "--out", str(args.out), "--cache", args.cache]
    if args.repeat != 1:
        cmd += ["--repeat", str(args.repeat)]
    if args.hidden_cache != "auto":
        cmd += ["--hidden-cache", args.hidden_cache]
    if args.keep:
        cmd.append("--keep")
    return shlex.join(cmd)


def run_worker(mode: str, params: dict, log_path: Path, preload: tuple[str, ...] = (), fork: bool = False) -> dict:
    """Run one measured job in a fresh process (see streamq/bench/worker.py)."""
    try:
        return worker.run_isolated(mode, params, log_path, preload, forkserver=fork)
    except RuntimeError as e:
        raise SystemExit(f"bench: {e}") from None


def cpu_only(device: str) -> bool:
    """True when no worker will use CUDA (this process only asks; it never creates a CUDA context)."""
    import torch

    return device == "cpu" or not torch.cuda.is_available()


def source_files(src: Path) -> list[Path]:
    weight_map = json.loads((src / INDEX_FILE).read_text())["weight_map"]
    return [src / f for f in sorted(set(weight_map.values()))]


def ensure_source(args: argparse.Namespace, logs: Path) -> tuple[Path, bool]:
    """The synthetic checkpoint for (geometry, layers, vocab); reused when complete and matching."""
    name = f"{args.geometry}-{args.layers}L" + (f"-v{args.vocab_size}" if args.vocab_size else "")
    src = (args.workdir / "src" / name).resolve()
    want = build_config(args.geometry, args.layers, args.vocab_size)
    try:  # write_synthetic writes config.json last: its presence means the checkpoint is complete
        if json.loads((src / "config.json").read_text()) == want and all(p.is_file() for p in source_files(src)):
            return src, True
    except (OSError, ValueError, KeyError):
        pass
    print(f"bench: writing synthetic {args.geometry} checkpoint with {args.layers} layers to {src}", flush=True)
    if cpu_only(args.device):
        write_synthetic(args.geometry, src, args.layers, seed=0, device="cpu", vocab_size=args.vocab_size,
                        log=lambda msg: None)
    else:  # drawn on the GPU, in a worker, so this process never holds a CUDA context
        run_worker("synth", {"geometry": args.geometry, "out_dir": str(src), "layers": args.layers, "seed": 0,
                             "device": "cuda", "vocab_size": args.vocab_size}, logs / "synth.log")
    return src, False


def set_cache_state(requested: str, files: list[Path]) -> tuple[str, str]:
    """Put the page cache in the state every measurement starts from; returns (state, note)."""
    if requested in ("auto", "cold"):
        why = floors.drop_page_cache()
        if why is None:
            return "cold", ("dropped (sync; echo 3 > /proc/sys/vm/drop_caches) before the I/O floor read "
                            "and before each quantize run")
        if requested == "cold":
            raise SystemExit(f"bench: --cache cold needs to drop the page cache, which failed: {why}")
        fallback = f"dropping it failed ({why}), so "
    else:
        fallback = ""
    warm = floors.read_files(files)
    note = (f"{fallback}the source was read once before any measurement ({warm['gbps']:.2f} GB/s), so every "
            "measured read comes from the page cache")
    try:
        import psutil

        available = psutil.virtual_memory().available
        if warm["bytes"] > 0.7 * available:
            note += (f"; WARNING: the source ({render.fmt_bytes(warm['bytes'])}) is close to or above available "
                     f"memory ({render.fmt_bytes(available)}), so part of it is read from disk")
    except ImportError:  # pragma: no cover
        pass
    return "warm", note


def before_read(state: str) -> None:
    if state == "cold" and floors.drop_page_cache() is not None:
        raise SystemExit("bench: dropping the page cache stopped working mid-run")


def job_config(args: argparse.Namespace, algo: str, src: Path, save: Path) -> dict:
    scheme = get_scheme(algo)
    quant = {"name": algo, "bits": scheme.bits, "hidden_cache": args.hidden_cache}
    cfg: dict = {
        "global": {"save_path": str(save), "device": args.device},
        "model": {"name": args.geometry, "model_path": str(src)},
        "compression": {"name": "PTQ", "quantization": quant},
    }
    if scheme.from_yaml(quant, "bench").needs_calibration:  # the scheme's defaults otherwise
        cfg["dataset"] = dataset(args)
    return cfg


def dataset(args: argparse.Namespace) -> dict:
    return {"name": "RandomTokens", "max_seq_length": args.seq_len, "num_samples": args.samples,
            "batch_size": args.batch_size, "seed": 0}


def host_info() -> dict:
    cpu = worker.cpu_name()
    info = {"hostname": platform.node(), "cpu": cpu, "cpu_count": os.cpu_count()}
    try:
        import psutil

        info["ram_bytes"] = psutil.virtual_memory().total
    except ImportError:  # pragma: no cover
        pass
    return info


def run_bench(args: argparse.Namespace, algos: list[str]) -> dict:
    workdir = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    src, reused = ensure_source(args, logs)
    files = source_files(src)
    src_bytes = sum(p.stat().st_size for p in files)
    print(f"bench: source {src} ({'reused' if reused else 'written'}), {len(files)} files, "
          f"{render.fmt_bytes(src_bytes)}", flush=True)

    state, note = set_cache_state(args.cache, files)
    print(f"bench: page cache {state}: {note}", flush=True)
    machine = host_info()
    model_type = build_config(args.geometry)["model_type"]
    preload = (f"transformers.models.{model_type}.modeling_{model_type}",)  # imported once, in the forkserver
    fork = cpu_only(args.device)  # CUDA workers are plain subprocesses (see worker.run_isolated)

    # Repeats are interleaved (read, each algo, compute; again), so a change in machine load
    # hits every measurement alike; each number is the minimum over its repeats.
    reads: list[dict] = []
    runs: dict[str, list[tuple[dict, int, dict]]] = {algo: [] for algo in algos}
    computes: list[dict] = []
    for r in range(args.repeat):
        tag = f" (repeat {r + 1}/{args.repeat})" if args.repeat > 1 else ""
        before_read(state)
        reads.append(floors.read_files(files))
        print(f"bench: I/O floor read{tag} {render.fmt_bytes(reads[-1]['bytes'])} in {reads[-1]['seconds']:.3f} s "
              f"({reads[-1]['gbps']:.2f} GB/s)", flush=True)
        for algo in algos:
            save = (workdir / f"out-{algo}").resolve()
            before_read(state)
            print(f"bench: quantize {algo}{tag} ...", flush=True)
            res = run_worker("quantize", {"config": job_config(args, algo, src, save)},
                             logs / f"quantize-{algo}.log", preload, fork)
            machine.update({k: v for k, v in res["machine"].items() if v is not None})
            output_bytes = sum(p.stat().st_size for p in save.glob("*.safetensors"))
            write = floors.write_bytes(workdir, output_bytes)
            runs[algo].append((res, output_bytes, write))
            print(f"bench:   wall {res['report']['wall_s']:.3f} s; I/O floor write {render.fmt_bytes(write['bytes'])} "
                  f"in {write['seconds']:.3f} s ({write['gbps']:.2f} GB/s)", flush=True)
            if not args.keep:  # the source, one output and the write-floor file are the most on disk at once
                shutil.rmtree(save, ignore_errors=True)
        if "fp8_static" in algos:
            print(f"bench: compute floor{tag} (fp8_static forwards, weights on the device) ...", flush=True)
            scratch = (workdir / "out-compute-floor").resolve()  # never written: prepare() touches no output
            computes.append(run_worker("compute", {"config": job_config(args, "fp8_static", src, scratch)},
                                       logs / "compute-floor.log", preload, fork))
            print(f"bench:   compute floor {computes[-1]['seconds']:.3f} s", flush=True)

    io_read = dict(min(reads, key=lambda m: m["seconds"]), all_seconds=[m["seconds"] for m in reads])
    compute = None
    if computes:
        compute = dict(min(computes, key=lambda m: m["seconds"]), all_seconds=[m["seconds"] for m in computes])
    algo_results: dict[str, dict] = {}
    for algo in algos:
        res, output_bytes, _ = min(runs[algo], key=lambda run: run[0]["report"]["wall_s"])
        writes = [w for _, _, w in runs[algo]]
        write = dict(min(writes, key=lambda w: w["seconds"]), all_seconds=[w["seconds"] for w in writes])
        rep = res["report"]
        algo_results[algo] = {
            "wall_s": rep["wall_s"], "all_wall_s": [run[0]["report"]["wall_s"] for run in runs[algo]],
            "bytes_read": rep["bytes_read"], "bytes_written": rep["bytes_written"],
            "output_dir": str((workdir / f"out-{algo}").resolve()), "output_bytes": output_bytes,
            "write_floor": write,
            "peak_gpu_bytes": rep["peak_gpu_bytes"], "peak_host_rss_bytes": res["peak_host_rss_bytes"],
            "cache_location": rep.get("cache_location", ""), "stages": rep["stages"],
            "stage_totals": render.stage_totals(rep["stages"]), "layer_gpu_bytes": rep["layer_gpu_bytes"],
            "rss_samples": res["rss_samples"], "import_s": res["import_s"],
            "uncovered_experts": rep.get("uncovered_experts", 0), "phases": rep.get("phases", {}),
            "plan": res.get("plan", {}),
        }

    for algo, a in algo_results.items():
        a["io_floor_s"] = io_read["seconds"] + a["write_floor"]["seconds"]
        a["io_floor_overlapped_s"] = max(io_read["seconds"], a["write_floor"]["seconds"])
        a["compute_floor_s"] = compute["seconds"] if algo == "fp8_static" else 0.0
        a["floor_s"] = a["io_floor_s"] + a["compute_floor_s"]
        a["ratio"] = a["wall_s"] / a["floor_s"] if a["floor_s"] > 0 else math.inf
        a["gbps"] = a["bytes_read"] / a["wall_s"] / 1e9 if a["wall_s"] > 0 else math.inf

    result = {
        "command": reproduce_command(args, algos),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "geometry": args.geometry, "layers": args.layers, "vocab_size": args.vocab_size,
        "machine": machine,
        "source": {"path": str(src), "files": len(files), "bytes": src_bytes, "reused": reused},
        "dataset": dataset(args) if any("dataset" in job_config(args, a, src, src) for a in algos) else None,
        "cache": {"state": state, "requested": args.cache, "note": note},
        "repeat": args.repeat,
        "io_floor": io_read,
        "compute_floor": compute,
        "algos": algo_results,
    }
    (out / "bench.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "bench.md").write_text(render.markdown(result))
    render.plot(result, out / "bench.png")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    algos = check_args(parser, args)
    args.out = args.out if args.out is not None else args.workdir / "results"
    result = run_bench(args, algos)
    print()
    print(render.markdown(result))
    print(f"results: {args.out / 'bench.json'}, {args.out / 'bench.md'}, {args.out / 'bench.png'}")
    print(f"reproduce: {result['command']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
