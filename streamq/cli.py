"""`python -m streamq quantize -c CONFIG [...]`: the command line."""

from __future__ import annotations

import argparse
import logging
import sys

from streamq.errors import StreamqError

log = logging.getLogger("streamq")


def _quantize(args: argparse.Namespace) -> int:
    from streamq.config import load_config
    from streamq.engine.run import quantize

    config = load_config(args.config, {"model_path": args.model_path, "save_path": args.save_path,
                                       "device": args.device, "max_gpu_memory": args.max_gpu_memory,
                                       "max_cpu_memory": args.max_cpu_memory})
    for note in config.notes:
        log.info("note: %s", note)
    report = quantize(config, overwrite=args.overwrite, show_progress=not args.quiet)
    print(report.summary())
    print(f"wrote {config.save_path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamq", description="Layer-streaming FP8 quantization of LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize", help="quantize a checkpoint as a YAML config describes")
    q.add_argument("-c", "--config", required=True, help="AngelSlim-style YAML config")
    q.add_argument("--model-path", help="override model.model_path")
    q.add_argument("--save-path", help="override global.save_path")
    q.add_argument("--device", help="override global.device (auto, cpu, cuda, cuda:N)")
    q.add_argument("--max-gpu-memory", help="GPU memory budget, e.g. 8GiB")
    q.add_argument("--max-cpu-memory", help="host memory budget, e.g. 32GiB")
    q.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    q.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    q.set_defaults(func=_quantize)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    args = build_parser().parse_args(argv)
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
