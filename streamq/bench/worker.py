"""One measured job in its own process (`run_isolated`, or `python -m streamq.bench.worker MODE PARAMS RESULT`).

Peak host RSS (`ru_maxrss`) and the CUDA caching allocator are per process, so each
`quantize` run, the compute floor and the synthetic checkpoint writer each get a fresh
process: no run inherits another's peaks, allocations or CUDA context.

Modes (PARAMS.json holds the arguments):
  synth     {"geometry", "out_dir", "layers", "seed", "device", "vocab_size", "shard_size_gb"}
  quantize  {"config": <config dict>, "rss_interval_s": 0.05}
  compute   {"config": <config dict of the fp8_static job>}
RESULT.json gets the outcome, plus the process's peak RSS and the device it ran on.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


class RssSampler:
    """Samples this process's RSS every `interval` seconds in a daemon thread."""

    def __init__(self, interval: float = 0.05):
        import psutil

        self.proc, self.interval = psutil.Process(), interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-rss", daemon=True)
        self.t0 = 0.0

    def _run(self) -> None:
        while True:
            self.samples.append((time.monotonic() - self.t0, self.proc.memory_info().rss))
            if self._stop.wait(self.interval):
                break

    def __enter__(self) -> RssSampler:
        self.t0 = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append((time.monotonic() - self.t0, self.proc.memory_info().rss))


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _machine(device_name: str | None) -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "device": device_name,
            "gpu": None, "cuda": torch.version.cuda}
    if device_name and device_name.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device_name))
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    return info


def _finite(obj):
    """JSON has no inf/nan; write them as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def preimport_model_code(model_path: str, trust_remote_code: bool = False) -> float:
    """Import the architecture's modeling module now; returns the seconds it took.

    transformers imports modeling code lazily, on the first `from_config`, which costs
    seconds of one-off Python imports (more on a cold page cache). That is constant per
    process and has nothing to do with streaming, so it is kept out of the measured wall
    time and reported on its own.
    """
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    t0 = time.monotonic()
    cfg = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    try:
        MODEL_FOR_CAUSAL_LM_MAPPING[type(cfg)]
    except KeyError:  # remote code or unknown architecture: quantize() will say so
        pass
    return time.monotonic() - t0


def run(mode: str, params: dict) -> dict:
    from streamq.engine.progress import peak_host_rss

    if mode == "synth":
        import torch

        from streamq.testing.synthetic import write_synthetic

        device = params.get("device", "cpu")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        t0 = time.monotonic()
        write_synthetic(params["geometry"], params["out_dir"], params["layers"], seed=params.get("seed", 0),
                        device=device, shard_size_gb=params.get("shard_size_gb", 4.0),
                        vocab_size=params.get("vocab_size"), log=lambda msg: print(msg, file=sys.stderr))
        return {"seconds": time.monotonic() - t0}

    from streamq.config import parse_config

    config = parse_config(params["config"], f"bench {mode}")
    if mode == "quantize":
        from streamq.engine.job import resolve_device
        from streamq.engine.run import quantize

        import_s = preimport_model_code(config.model.model_path, config.model.trust_remote_code)
        with RssSampler(params.get("rss_interval_s", 0.05)) as sampler:
            report = quantize(config, overwrite=True, show_progress=False)
        saved = json.loads((Path(config.save_path) / "streamq_report.json").read_text())
        return {"report": dict(report.__dict__), "rss_samples": sampler.samples, "import_s": import_s,
                "peak_host_rss_bytes": peak_host_rss(), "machine": _machine(str(resolve_device(config.device))),
                "plan": {k: saved["plan"].get(k) for k in ("predicted_peak_gpu_bytes", "predicted_peak_host_bytes",
                                                          "estimated_seconds", "cache_location")}}
    if mode == "compute":
        from streamq.bench.floors import compute_floor

        result = compute_floor(config)
        result["peak_host_rss_bytes"] = peak_host_rss()
        result["machine"] = _machine(result["device"])
        return result
    raise SystemExit(f"unknown mode {mode!r}; use synth, quantize or compute")


def _setup_logging() -> None:
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    logging.getLogger("transformers").setLevel(logging.ERROR)


def _child(mode: str, params: dict, result_path: str, log_path: str) -> None:
    """Body of a forked worker: output to the log file, result to JSON."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    _setup_logging()
    result = run(mode, params)
    Path(result_path).write_text(json.dumps(_finite(result), indent=1) + "\n")


def run_isolated(mode: str, params: dict, log_path: Path, preload: list[str] | tuple[str, ...] = (),
                 forkserver: bool = False) -> dict:
    """Run one job in a fresh process; return its result dict (RuntimeError with the log tail on failure).

    Default: a plain `python -m streamq.bench.worker` subprocess. With `forkserver`
    (CPU-only runs), workers are forked from a multiprocessing forkserver that imported
    torch, transformers, streamq and `preload` once, so each job still gets its own
    process and RSS peak without paying seconds of imports again. Not for CUDA: an import
    that probes CUDA in the server would break CUDA in every forked worker.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    root = str(Path(__file__).resolve().parents[2])
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if root not in paths:  # the server and plain workers must import streamq from this checkout
        os.environ["PYTHONPATH"] = os.pathsep.join([root, *filter(None, paths)])
    with tempfile.TemporaryDirectory(prefix="streamq-bench-") as tmp:
        result_path = Path(tmp) / "result.json"
        if forkserver and "forkserver" in multiprocessing.get_all_start_methods():
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(["streamq.bench.worker", "streamq.bench.floors", "streamq.engine.run",
                                        *preload])
            proc = ctx.Process(target=_child, args=(mode, params, str(result_path), str(log_path)),
                               name=f"bench-{mode}")
            proc.start()
            proc.join()
            rc = proc.exitcode
        else:
            params_path = Path(tmp) / "params.json"
            params_path.write_text(json.dumps(params))
            with open(log_path, "w") as log:
                rc = subprocess.run([sys.executable, "-m", "streamq.bench.worker", mode, str(params_path),
                                     str(result_path)], stdout=log, stderr=subprocess.STDOUT).returncode
        if rc != 0 or not result_path.is_file():
            tail = log_path.read_text()[-4000:] if log_path.is_file() else ""
            raise RuntimeError(f"the {mode} worker failed (exit {rc}); log {log_path}:\n{tail}")
        return json.loads(result_path.read_text())


def main(argv: list[str] | None = None) -> int:
    _setup_logging()
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    mode, params_path, result_path = argv
    result = run(mode, json.loads(Path(params_path).read_text()))
    Path(result_path).write_text(json.dumps(_finite(result), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
