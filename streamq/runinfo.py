"""Reading a run's manifest without torch: is this job already finished?

`streamq quantize` asks this before importing the engine, so rerunning a finished job
answers after checksumming its shards, without importing torch or building the model
skeleton. Anything short of complete and intact goes through `streamq.engine.state`,
which redoes what does not match.
"""

from __future__ import annotations

import json
from pathlib import Path

from streamq.config import JobConfig
from streamq.payload import sha256_file

MANIFEST = "streamq_run.json"  # streamq.engine.state.MANIFEST (that module imports torch)
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def read_manifest(out_dir: Path) -> dict | None:
    """The manifest as a dict, or None when there is none or it is not valid JSON."""
    try:
        data = json.loads((out_dir / MANIFEST).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def source_fingerprint(model_path: Path) -> dict | None:
    """What `CheckpointReader.fingerprint` computes (file names and sizes), without torch."""
    try:
        if (model_path / INDEX_FILE).is_file():
            files = sorted(set(json.loads((model_path / INDEX_FILE).read_text())["weight_map"].values()))
        else:
            files = [SINGLE_FILE]
        return {f: (model_path / f).stat().st_size for f in files} | {
            "config.json": (model_path / "config.json").stat().st_size}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # let the engine report what is wrong with the source


def finished_run(config: JobConfig) -> str | None:
    """A short description when save_path holds this exact job, complete; else None.

    Complete means: the manifest says so, its job hash and source fingerprint match this
    job, config.json exists, and every recorded shard is there with its recorded size and
    sha256.
    """
    out = Path(config.save_path)
    manifest = read_manifest(out)
    if manifest is None or manifest.get("status") != "complete" or not (out / "config.json").is_file():
        return None
    if manifest.get("job_hash") != config.job_hash():
        return None
    if manifest.get("source") != source_fingerprint(Path(config.model.model_path)):
        return None
    shards = manifest.get("shards") or {}
    for info in shards.values():
        path = out / str(info.get("file", ""))
        if not path.is_file() or path.stat().st_size != info.get("bytes"):
            return None
    # Checksums too (hashlib streams at disk speed): a shard damaged after the run must be
    # redone by the engine, not reported complete.
    for info in shards.values():
        if sha256_file(out / str(info["file"])) != info.get("sha256"):
            return None
    return f"{len(shards)} shards, sizes and sha256 as recorded in {MANIFEST}"
