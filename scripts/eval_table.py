"""The quantization quality table (issues #6, #10): bf16 vs every scheme on the trained fixtures.

For each model directory (default: the two trained fixtures, tests/fixtures/trained/dense and
moe), quantize it with streamq once per scheme into --workdir:

- fp8_dynamic, fp8_static: `save_name: fp8`, per-tensor weights and activations;
- int8_dynamic: W8A8 INT8, compressed-tensors `int-quantized` (per-channel weights, dynamic
  per-token inputs); int8_dynamic+smooth: the same after SmoothQuant
  (`quant_helpers: [smooth]`, `smooth_alpha: 0.5`);
- fp8_blockwise: vLLM fp8 with 128x128 weight blocks, inputs per token in groups of 128;
- only when named in --schemes: int4_rtn and int4_gptq, W4A16 compressed-tensors
  `pack-quantized` (symmetric, groups of 128);

(the calibrated ones, fp8_static, int8_dynamic+smooth and int4_gptq, on the 16 records of
tests/fixtures/trained/calib.jsonl, 128 tokens, batch 4, as tests/fixtures/trained/README.md
states); then run `streamq eval` on each quantized copy against its original
(tests/fixtures/trained/eval.jsonl, --num-samples records of 128 tokens, batch 1) and
collect perplexity of both models, KL(bf16 || quantized), top-1 agreement and the per-layer
relative errors. `--device` goes to both quantize (global.device) and eval.

Writes OUT/eval_table.md and OUT/eval_table.json (plus each eval's own report under
OUT/reports/) and prints the Markdown table, headed by the machine, the software versions,
how the quantized matmuls ran (real `torch._scaled_mm` / `torch._int_mm`, or simulated), and
the command that reproduces it.

Usage (from the repository root):
  python scripts/eval_table.py [--models DIR [DIR ...]] [--schemes S [S ...]]
      [--device auto|cpu|cuda|cuda:N] [--num-samples 32] [--threads N]
      [--workdir build/eval_table] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing the package

from streamq.bench import worker  # noqa: E402
from streamq.errors import StreamqError  # noqa: E402

TRAINED = ROOT / "tests" / "fixtures" / "trained"
DEFAULT_MODELS = (TRAINED / "dense", TRAINED / "moe")
CALIB, EVAL_DATA = TRAINED / "calib.jsonl", TRAINED / "eval.jsonl"
# Row label -> compression.quantization of its quantize run (and whether it calibrates).
SCHEME_CONFIGS = {
    "fp8_dynamic": ({"name": "fp8_dynamic", "bits": 8, "save_name": "fp8",
                     "quant_method": {"weight": "per-tensor", "activation": "per-tensor"}}, False),
    "fp8_static": ({"name": "fp8_static", "bits": 8, "save_name": "fp8",
                    "quant_method": {"weight": "per-tensor", "activation": "per-tensor"}}, True),
    "int8_dynamic": ({"name": "int8_dynamic", "bits": 8, "quant_method": {}}, False),
    "int8_dynamic+smooth": ({"name": "int8_dynamic", "bits": 8, "quant_method": {}, "quant_helpers": ["smooth"],
                             "smooth_alpha": 0.5}, True),
    "fp8_blockwise": ({"name": "fp8_blockwise", "bits": 8, "save_name": "fp8"}, False),
    # W4A16 (compressed-tensors pack-quantized, symmetric, groups of 128): only with --schemes.
    "int4_rtn": ({"name": "int4_rtn", "bits": 4, "quant_method": {"weight": "per-group", "group_size": 128}}, False),
    "int4_gptq": ({"name": "int4_gptq", "bits": 4, "quant_method": {"weight": "per-group", "group_size": 128}},
                  True),
    "int4_gptq+actorder": ({"name": "int4_gptq", "bits": 4, "actorder": "static",
                            "quant_method": {"weight": "per-group", "group_size": 128}}, True),
    "int4_awq": ({"name": "int4_awq", "bits": 4,
                  "quant_method": {"weight": "per-group", "group_size": 128, "zero_point": True}}, True),
}
SCHEMES = tuple(SCHEME_CONFIGS)
DEFAULT_SCHEMES = ("fp8_dynamic", "fp8_static", "int8_dynamic", "int8_dynamic+smooth", "fp8_blockwise")
# What tests/fixtures/trained/README.md says its CPU table used.
CALIB_SAMPLES, CALIB_BATCH, SEQ_LEN = 16, 4, 128
EVAL_BATCH = 1  # streamq eval's default: dynamic scales per sequence, no padding


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eval_table.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", type=Path, default=list(DEFAULT_MODELS), metavar="DIR",
                   help="bf16 checkpoints to quantize and evaluate (default: the trained fixtures dense, moe)")
    p.add_argument("--peer", nargs="+", default=[], metavar="LABEL=DIR",
                   help="also evaluate checkpoints another tool made (not quantized here); DIR may hold "
                        "{model} (the model directory's name), e.g. llmc-gptq=build/peer/{model}-gptq "
                        "from scripts/peer_llmcompressor.py")
    p.add_argument("--schemes", nargs="+", default=list(DEFAULT_SCHEMES), choices=SCHEMES, metavar="SCHEME",
                   help=f"rows to produce, in this order, of: {' '.join(SCHEMES)} "
                        f"(default: {' '.join(DEFAULT_SCHEMES)})")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (quantize and eval)")
    p.add_argument("--num-samples", type=int, default=32, help="eval records (of eval.jsonl's 32), 128 tokens each")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's own choice)")
    p.add_argument("--workdir", type=Path, default=Path("build/eval_table"),
                   help="quantized checkpoints go here (MODEL-SCHEME/), replaced on every run")
    p.add_argument("--out", type=Path, default=None, help="eval_table.md/.json and reports/ (default: WORKDIR)")
    return p


def _shown(path: Path) -> str:
    """A path as the reproduce command shows it: relative to the repository root when inside it."""
    resolved = path.resolve()
    try:
        return str(resolved.relative_to(ROOT))
    except ValueError:
        return str(resolved)


def reproduce_command(args: argparse.Namespace, device: str) -> str:
    """The command line, run from the repository root; `--device auto` shown as what it resolved to."""
    cmd = ["python", "scripts/eval_table.py"]
    if [m.resolve() for m in args.models] != [m.resolve() for m in DEFAULT_MODELS]:
        cmd += ["--models", *(_shown(m) for m in args.models)]
    if list(args.schemes) != list(DEFAULT_SCHEMES):
        cmd += ["--schemes", *args.schemes]
    if args.peer:
        cmd += ["--peer", *args.peer]
    cmd += ["--device", device if args.device == "auto" else args.device, "--num-samples", str(args.num_samples)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    cmd += ["--workdir", _shown(args.workdir), "--out", _shown(args.out)]
    return shlex.join(cmd)


def machine_info(device) -> dict:
    import torch
    import transformers

    cpu = worker.cpu_name()
    gpu, capability = None, None
    if device.type == "cuda":
        gpu = torch.cuda.get_device_name(device)
        capability = "{}.{}".format(*torch.cuda.get_device_capability(device))
    elif torch.cuda.is_available():
        gpu = f"{torch.cuda.get_device_name(0)} (not used)"
    return {"hostname": platform.node(), "cpu": cpu, "cpu_count": os.cpu_count(), "gpu": gpu,
            "compute_capability": capability, "cuda": torch.version.cuda, "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "device": str(device),
            "torch_threads": torch.get_num_threads()}


def job_config(model: Path, save: Path, scheme: str, device: str) -> dict:
    """The AngelSlim-style config dict (what a YAML file parses to) of one quantize run."""
    quantization, calibrated = SCHEME_CONFIGS[scheme]
    cfg = {"global": {"save_path": str(save.resolve()), "device": device},
           "model": {"name": model.name, "model_path": str(model.resolve())},
           "compression": {"name": "PTQ", "quantization": json.loads(json.dumps(quantization))}}
    if calibrated:
        cfg["dataset"] = {"name": "TextDataset", "data_path": str(CALIB), "num_samples": CALIB_SAMPLES,
                          "max_seq_length": SEQ_LEN, "batch_size": CALIB_BATCH}
    return cfg


def _names(models: list[Path]) -> list[str]:
    """Row labels: the directory names, made unique."""
    names: list[str] = []
    for m in models:
        name = m.resolve().name
        names.append(name if name not in names else f"{name}-{len(names)}")
    return names


def _log(msg: str) -> None:
    print(f"eval_table: {msg}", file=sys.stderr, flush=True)


def run_table(args: argparse.Namespace) -> dict:
    from streamq.config import check_device, parse_config
    from streamq.engine.job import resolve_device
    from streamq.engine.run import quantize
    from streamq.eval.runner import EvalOptions, evaluate

    check_device(args.device, "--device")
    device = resolve_device(args.device)
    machine = machine_info(device)
    reports_dir = args.out / "reports"
    reports_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    notes: list[str] = []
    schemes = list(args.schemes)

    def eval_one(model: Path, save: Path, label: str) -> tuple[Path, dict]:
        """`streamq eval` of one quantized checkpoint against its model; (report path, report)."""
        report = evaluate(EvalOptions(str(model.resolve()), str(save.resolve()), str(EVAL_DATA),
                                      num_samples=args.num_samples, max_seq_length=SEQ_LEN,
                                      batch_size=EVAL_BATCH, device=args.device))
        report_path = reports_dir / f"{label}.json"
        report.write_json(report_path)
        return report_path, json.loads(report_path.read_text())

    for model, name in zip(args.models, _names(args.models), strict=True):
        evals = {}
        for scheme in schemes:
            save = args.workdir / f"{name}-{_slug(scheme)}"
            _log(f"quantize {name} {scheme} -> {save}")
            qrep = quantize(parse_config(job_config(model, save, scheme, args.device), f"eval_table {name} {scheme}"),
                            overwrite=True, show_progress=False)
            _log(f"eval {name} {scheme} ({args.num_samples} samples, device {device})")
            evals[scheme] = (*eval_one(model, save, f"{name}-{_slug(scheme)}"), qrep)
        for peer in args.peer:
            label, _, pattern = peer.partition("=")
            save = Path(pattern.format(model=name))
            _log(f"eval {name} {label} ({save}, made elsewhere)")
            evals[label] = (*eval_one(model, save, f"{name}-{_slug(label)}"), None)
        schemes_here = schemes + [p.partition("=")[0] for p in args.peer]
        first = evals[schemes[0]][1]
        for scheme in schemes_here[1:]:
            other = evals[scheme][1]["ppl_original"]
            if other != first["ppl_original"]:
                notes.append(f"{name}: bf16 perplexity differs between evals: {first['ppl_original']!r} "
                             f"({schemes[0]}) vs {other!r} ({scheme}); the table shows the first")
        rows.append({"model": name, "model_path": str(model.resolve()), "scheme": "bf16",
                     "perplexity": first["ppl_original"], "ppl_change": None, "kl": None, "top1_agreement": None,
                     "layer_rel_errors": None, "tokens": first["tokens"], "samples": first["samples"]})
        for scheme in schemes_here:
            path, d, qrep = evals[scheme]
            rows.append({"model": name, "model_path": str(model.resolve()), "scheme": scheme,
                         "perplexity": d["ppl_quantized"], "ppl_change": d["ppl_change"], "kl": d["kl"],
                         "top1_agreement": d["top1_agreement"],
                         "layer_rel_errors": [r["rel_error"] for r in d["layers"]],
                         "layer_stream_errors": [r["stream_error"] for r in d["layers"]],
                         "outliers": [o["message"] for o in d["outliers"]],
                         "tokens": d["tokens"], "samples": d["samples"], "scaled_mm": d["scaled_mm"],
                         "matmul": d.get("matmul", ""),
                         "quant_format": d["quant_format"], "checkpoint": str(Path(d["quantized"])),
                         "eval_report": str(path), "eval_wall_s": d["wall_s"],
                         "quantize_wall_s": qrep.wall_s if qrep else None,
                         "uncovered_experts": qrep.uncovered_experts if qrep else None})
            notes += [f"{name} {scheme}: outlier {o['message']}" for o in d["outliers"]]
    mm = {r["scaled_mm"] for r in rows if "scaled_mm" in r}
    kinds = list(dict.fromkeys(r["matmul"] for r in rows if r.get("matmul")))  # in row order
    matmuls = "; ".join(kinds) if kinds else ("real" if mm == {True} else "simulated")
    return {
        "command": reproduce_command(args, str(device)),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine,
        "matmuls": matmuls,
        "quantize": {"schemes": {s: SCHEME_CONFIGS[s][0] for s in schemes},
                     "calibrated": [s for s in schemes if SCHEME_CONFIGS[s][1]],
                     "calibration": {"name": "TextDataset", "data_path": _shown(CALIB), "num_samples": CALIB_SAMPLES,
                                     "max_seq_length": SEQ_LEN, "batch_size": CALIB_BATCH}},
        "eval": {"data": _shown(EVAL_DATA), "num_samples": args.num_samples, "max_seq_length": SEQ_LEN,
                 "batch_size": EVAL_BATCH},
        "rows": rows,
        "notes": notes,
    }


def _slug(scheme: str) -> str:
    """A row label as a directory name: int8_dynamic+smooth -> int8_dynamic-smooth."""
    return scheme.replace("+", "-")


def _sci(x: float) -> str:
    """1.59e-3 rather than 1.59e-03, as the fixtures README writes it."""
    if not math.isfinite(x) or x == 0:
        return str(x)
    mantissa, exp = f"{x:.2e}".split("e")
    return f"{mantissa}e{int(exp)}"


SCHEME_NOTES = {
    "fp8_dynamic": "fp8_dynamic: vLLM fp8, per-tensor weights and activations",
    "fp8_static": "fp8_static: the same with static input scales",
    "int8_dynamic": "int8_dynamic: compressed-tensors int-quantized, per-channel weights, dynamic per-token inputs",
    "int8_dynamic+smooth": "int8_dynamic+smooth: the same after SmoothQuant (alpha 0.5)",
    "fp8_blockwise": "fp8_blockwise: vLLM fp8, 128x128 weight blocks, inputs per token in groups of 128",
    "int4_rtn": "int4_rtn: W4A16 round-to-nearest, compressed-tensors pack-quantized, symmetric, groups of 128",
    "int4_gptq": "int4_gptq: W4A16 GPTQ, the same layout",
    "int4_gptq+actorder": "int4_gptq+actorder: the same with actorder: static (llm-compressor's default)",
    "int4_awq": "int4_awq: W4A16 AWQ (duo scaling, 20 grid points), asymmetric (zero point), the same layout",
}


def markdown(result: dict) -> str:
    m = result["machine"]
    gpu = m["gpu"] or "none"
    if m["compute_capability"]:
        gpu += f" (compute capability {m['compute_capability']}, CUDA {m['cuda']})"
    ev, cal = result["eval"], result["quantize"]["calibration"]
    tokens = sorted({r["tokens"] for r in result["rows"]})
    schemes = list(result["quantize"]["schemes"])
    calibrated = result["quantize"]["calibrated"]
    described = [SCHEME_NOTES[s] for s in schemes if s in SCHEME_NOTES]
    lines = [
        f"# Quantization quality: bf16 vs {' vs '.join(schemes)}",
        "",
        f"- machine: {m['cpu']} ({m['cpu_count']} CPUs, torch threads {m['torch_threads']}); GPU: {gpu}",
        f"- software: python {m['python']}, torch {m['torch']}, transformers {m['transformers']}",
        f"- device: {m['device']} (quantize and eval); quantized matmuls: {result['matmuls']}",
        f"- quantize: {'; '.join(described)}"
        + (f"; {' and '.join(calibrated)} calibrated on {cal['data_path']} ({cal['num_samples']} samples, "
           f"{cal['max_seq_length']} tokens, batch {cal['batch_size']})" if calibrated else ""),
        f"- eval: {ev['data']}, {ev['num_samples']} samples x {ev['max_seq_length']} tokens, batch {ev['batch_size']} "
        f"({'/'.join(map(str, tokens))} predicted tokens per model)",
        f"- reproduce: `{result['command']}`",
        "",
        "| model | scheme | perplexity | change | KL(bf16 \\|\\| quantized), nats/token | top-1 agreement "
        "| per-layer relative error |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["rows"]:
        if r["scheme"] == "bf16":
            lines.append(f"| {r['model']} | bf16 | {r['perplexity']:.3f} | | | | |")
            continue
        errors = ", ".join(f"{e:.3f}" for e in r["layer_rel_errors"])
        lines.append(f"| {r['model']} | {r['scheme']} | {r['perplexity']:.3f} | {100 * r['ppl_change']:+.2f}% "
                     f"| {_sci(r['kl'])} | {100 * r['top1_agreement']:.1f}% | {errors} |")
    if result["notes"]:
        lines += ["", "Notes:", *(f"- {n}" for n in result["notes"])]
    return "\n".join(lines) + "\n"


def _finite(obj):
    """JSON has no inf/nan: write them as null (the reports/ files keep eval's own encoding)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.num_samples < 1:
        parser.error("--num-samples must be at least 1")
    if args.threads < 0:
        parser.error("--threads must be at least 1 (or 0: torch's default)")
    for m in args.models:
        if not (m / "config.json").is_file():
            parser.error(f"--models: {m} has no config.json")
    args.out = args.out if args.out is not None else args.workdir
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        result = run_table(args)
    except StreamqError as e:
        print(f"eval_table: error: {e}", file=sys.stderr)
        return e.exit_code
    args.out.mkdir(parents=True, exist_ok=True)
    table = markdown(result)
    (args.out / "eval_table.json").write_text(json.dumps(_finite(result), indent=1) + "\n")
    (args.out / "eval_table.md").write_text(table)
    print(table, end="")
    print(f"\nresults: {args.out / 'eval_table.md'}, {args.out / 'eval_table.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
