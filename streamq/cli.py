"""`python -m streamq quantize -c CONFIG [...]`: the command line."""

from __future__ import annotations

import argparse
import logging
import sys

from streamq import __version__
from streamq.errors import StreamqError

log = logging.getLogger("streamq")


def _load_checked(args: argparse.Namespace, overrides: dict, need_data: bool = True):
    """The config and every path it names, checked before torch or transformers is imported.

    Wrong YAML, a missing model directory or calibration file fail here in well under a
    second (streamq.config, streamq.paths and streamq.errors import neither).
    """
    from streamq.config import load_config
    from streamq.paths import calibration_file, check_data_path, check_model_path

    config = load_config(args.config, overrides)
    for note in config.notes:
        log.info("note: %s", note)
    check_model_path(config.model.model_path)
    data = calibration_file(config)
    if need_data and data is not None:
        check_data_path(data)
    return config


def _quantize(args: argparse.Namespace) -> int:
    from streamq.paths import calibration_file, check_save_path

    config = _load_checked(args, {"model_path": args.model_path, "save_path": args.save_path,
                                  "data_path": args.data_path, "device": args.device,
                                  "max_gpu_memory": args.max_gpu_memory, "max_cpu_memory": args.max_cpu_memory})
    check_save_path(config.save_path, config.model.model_path, calibration_file(config))
    if not args.overwrite:
        from streamq.runinfo import finished_run

        done = finished_run(config)
        if done is not None:
            print(f"{config.save_path}: already complete ({done}); nothing to do. "
                  "Pass --overwrite to quantize again.")
            return 0
    from streamq.engine import dist as dist_mod
    from streamq.engine.run import quantize

    dist = dist_mod.from_env(config.device)  # None unless torchrun started several processes
    try:
        leader = dist is None or dist.leader
        report = quantize(config, overwrite=args.overwrite, show_progress=not args.quiet and leader, dist=dist)
    finally:
        if dist is not None:
            dist.close()
    if leader:
        print(report.summary())
        print(f"wrote {config.save_path}")
    else:  # each process's own time and peaks (memory is per process)
        print("\n".join(f"rank {dist.rank}: {line}" for line in report.summary().splitlines()[:2]
                        + [report.stage_line()]))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from streamq.paths import check_data_path, check_model_path, check_writable

    # Before torch is imported: both checkpoints and the data exist.
    check_model_path(args.original, "--original")
    check_model_path(args.quantized, "--quantized")
    if args.data:
        check_data_path(args.data, "--data")
    # Before the (long) evaluation: a run must not end in "cannot write the report".
    if args.json:
        check_writable(args.json, "--json")
    if args.plot:
        check_writable(args.plot, "--plot", needs_module="matplotlib")
    from streamq.eval.runner import EvalOptions, evaluate

    report = evaluate(EvalOptions(args.original, args.quantized, args.data, args.num_samples, args.max_seq_length,
                                  args.batch_size, args.device, args.outlier_factor, args.outlier_floor))
    print(report.table())
    if args.json:
        report.write_json(args.json)
        print(f"wrote the JSON report to {args.json}")
    if args.plot:
        report.plot(args.plot)
        print(f"wrote the plot to {args.plot}")
    return 4 if args.fail_on_outlier and report.outliers else 0


def _verify(args: argparse.Namespace) -> int:
    from streamq.verify import verify_command

    return verify_command(args.save_path, args.source, args.json, fast=args.fast)


def _plan(args: argparse.Namespace) -> int:
    # plan needs no calibration file: it sizes the cache from num_samples x max_seq_length.
    _load_checked(args, {"model_path": args.model_path, "data_path": args.data_path}, need_data=False)
    from streamq.engine.plan import plan_command

    return plan_command(args.config, {"model_path": args.model_path, "data_path": args.data_path,
                                      "device": args.device, "max_gpu_memory": args.max_gpu_memory,
                                      "max_cpu_memory": args.max_cpu_memory}, args.json)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamq", description="Layer-streaming FP8 quantization of LLMs.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize", help="quantize a checkpoint as a YAML config describes")
    q.add_argument("-c", "--config", required=True, help="AngelSlim-style YAML config")
    q.add_argument("--model-path", help="override model.model_path")
    q.add_argument("--save-path", help="override global.save_path")
    q.add_argument("--data-path", help="override dataset.data_path (the calibration JSONL)")
    q.add_argument("--device", help="override global.device (auto, cpu, cuda, cuda:N)")
    q.add_argument("--max-gpu-memory", help="GPU memory budget, e.g. 8GiB")
    q.add_argument("--max-cpu-memory", help="host memory budget, e.g. 32GiB")
    q.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    q.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    q.set_defaults(func=_quantize)
    e = sub.add_parser("eval", help="compare a quantized checkpoint with its original, layer by layer",
                       description="Run both checkpoints side by side, one layer of each in memory: per-layer "
                       "relative error, perplexity of both, KL and top-1 agreement. Exit code 4: --fail-on-outlier "
                       "and a layer's error is an outlier.")
    e.add_argument("--original", required=True, help="the source (bf16/fp16) checkpoint")
    e.add_argument("--quantized", required=True, help="its quantized copy (vLLM fp8 or compressed-tensors)")
    e.add_argument("--data", help="JSONL eval text (default: the bundled data/calib/tiny_chat.jsonl)")
    e.add_argument("--num-samples", type=int, default=32)
    e.add_argument("--max-seq-length", type=int, default=512)
    e.add_argument("--batch-size", type=int, default=1, help="1 keeps dynamic scales per sequence (default)")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    e.add_argument("--json", help="write the report as JSON here")
    e.add_argument("--plot", help="write a PNG of the per-layer errors here (needs matplotlib)")
    e.add_argument("--fail-on-outlier", action="store_true", help="exit 4 if any layer is flagged as an outlier")
    e.add_argument("--outlier-factor", type=float, default=4.0, help="flag layers above this x the others' median")
    e.add_argument("--outlier-floor", type=float, default=0.05, help="never flag a layer below this error")
    e.set_defaults(func=_eval)
    v = sub.add_parser("verify", help="check a finished checkpoint (CI gate): exit 1 on any problem",
                       description="Check config.json, the index, every shard header and every scale of a "
                       "streamq checkpoint without loading its weights; one line per problem.")
    v.add_argument("save_path", help="the quantized checkpoint directory")
    v.add_argument("--source", help="the source checkpoint: every tensor of it must be there, nothing else")
    v.add_argument("--fast", action="store_true", help="read no weight data: shard sizes against the manifest, "
                   "no sha256, no FP8 NaN scan")
    v.add_argument("--json", action="store_true", help="print the result as JSON")
    v.set_defaults(func=_verify)
    p = sub.add_parser("plan", help="predict memory, disk and time of a job without loading weights "
                       "(exit 3 if it does not fit the budget)")
    p.add_argument("-c", "--config", required=True, help="AngelSlim-style YAML config")
    p.add_argument("--model-path", help="override model.model_path")
    p.add_argument("--data-path", help="override dataset.data_path (plan does not read it)")
    p.add_argument("--device", help="override global.device (a cuda job can be planned without a GPU)")
    p.add_argument("--max-gpu-memory", help="GPU memory budget, e.g. 8GiB")
    p.add_argument("--max-cpu-memory", help="host memory budget, e.g. 32GiB")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=_plan)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    args = build_parser().parse_args(argv)
    from streamq.hostmem import bound_cpu_kernel_caches

    bound_cpu_kernel_caches()  # before torch runs a CPU GEMM
    try:
        return args.func(args)
    except StreamqError as e:
        print(f"streamq: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("streamq: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
