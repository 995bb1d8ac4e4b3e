"""Profile one layer of a `streamq quantize` run (torch.profiler, CPU and CUDA), with each
stage of the layer marked: where a layer's seconds go, on one process or on each of several.

    python scripts/profile_layer.py --layer 2 --out prof [--trace] -- quantize -c CONFIG -q
    python -m torch.distributed.run --nproc-per-node 2 scripts/profile_layer.py --layer 2 --out prof \
        -- quantize -c CONFIG -q

Prints, per process, the marked stages' wall seconds and the busiest operators (also in
OUT/profile-rank<R>.txt); with --trace, a Chrome trace per process to OUT/trace-rank<R>.json
(open in https://ui.perfetto.dev; hundreds of MB for a large layer).
A development tool: it wraps the engine's functions from outside, the run is unchanged.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function


def _marked(owner, name: str, label, wall: dict[str, float]) -> None:
    """Wrap owner.name so its calls show as `label` (a string, or a function of the call's
    arguments) in the profile and add their wall seconds to `wall`."""
    fn = getattr(owner, name)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t0 = time.monotonic()
        tag = label(*args, **kwargs) if callable(label) else label
        with record_function(tag):
            try:
                return fn(*args, **kwargs)
            finally:
                wall[tag] = wall.get(tag, 0.0) + time.monotonic() - t0

    setattr(owner, name, wrapper)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layer", type=int, default=2, help="the layer to profile (not the first: it carries set-up)")
    ap.add_argument("--out", type=Path, default=Path("prof"))
    ap.add_argument("--rows", type=int, default=30, help="operators to list")
    ap.add_argument("--trace", action="store_true", help="also write a Chrome trace per process")
    ap.add_argument("cli", nargs=argparse.REMAINDER, help="-- then the streamq command line")
    args = ap.parse_args()
    cli = args.cli[1:] if args.cli[:1] == ["--"] else args.cli

    from streamq import cli as cli_mod
    from streamq.engine import dist as dist_mod
    from streamq.engine import run

    rank = int(os.environ.get("RANK", "0"))
    wall: dict[str, float] = {}
    # The stages of a layer, by the functions that run them.
    _marked(run._Calibrator, "run_layer",
            lambda *a, observe=True, **k: "stage: replay for the statistics" if observe else
            "stage: replay to propagate", wall)
    _marked(run, "materialize_layer", "stage: layer to the device", wall)
    _marked(run, "release_layer", "stage: release the layer", wall)
    _marked(run._Writer, "wait", "stage: wait for the writer", wall)
    _marked(run._Writer, "submit", "stage: hand the shard to the writer", wall)
    _marked(run._Writer, "join_packing", "stage: join the packing thread", wall)
    _marked(run.OutputArenas, "begin", "stage: output arena", wall)
    _marked(run._Calibrator, "share", "stage: assign work units", wall)
    _marked(run, "_recycle", "stage: recycle the read buffer", wall)
    _marked(run, "_exchange_quantized", "stage: exchange", wall)
    _marked(run, "timed_units", "stage: solves", wall)
    _marked(run, "_check_scales", "stage: scale check", wall)
    _marked(run, "_settle", "stage: settle (device synchronize)", wall)
    _marked(dist_mod.Dist, "broadcast", "stage: broadcast", wall)
    _marked(dist_mod.Dist, "exchange", "stage: Dist.exchange (solves' results, or a replay step's inputs)", wall)
    inner = run._process_layer

    def process_layer(job, i, *rest, **kw):
        if i != args.layer:
            return inner(job, i, *rest, **kw)
        fmt, scheme = job.config.format, job.config.scheme
        for obj, name, label in ((fmt, "pack", "stage: pack"), (scheme, "dequantize", "stage: dequantize")):
            owner = next(c for c in type(obj).__mro__ if name in vars(c))  # the class that defines it
            _marked(owner, name, label, wall)
        wall.clear()
        t0 = time.monotonic()
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available()
                                                          else [])) as prof:
            stages = inner(job, i, *rest, **kw)
        took = time.monotonic() - t0
        args.out.mkdir(parents=True, exist_ok=True)
        if args.trace:
            prof.export_chrome_trace(str(args.out / f"trace-rank{rank}.json"))
        lines = [f"== rank {rank}, layer {i}: {took:.3f} s under the profiler; stages {stages}"]
        lines += [f"   {k:45s} {v:7.3f} s" for k, v in sorted(wall.items(), key=lambda kv: -kv[1])]
        avg = prof.key_averages()
        lines.append(avg.table(sort_by="cpu_time_total", row_limit=args.rows, max_name_column_width=60))
        if torch.cuda.is_available():
            lines.append(avg.table(sort_by="self_cuda_time_total", row_limit=args.rows, max_name_column_width=60))
        (args.out / f"profile-rank{rank}.txt").write_text("\n".join(lines))
        print("\n".join(lines[: 2 + len(wall)]), file=sys.stderr)
        return stages

    run._process_layer = process_layer
    return cli_mod.main(cli)


if __name__ == "__main__":
    sys.exit(main())
