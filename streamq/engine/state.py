"""Run state in the output directory: which job it holds and which layers are finished.

`streamq_run.json` is written before any shard and updated (atomically) after each
one, so a rerun of the same command skips finished layers whose files still match
their checksums. A directory without it is never written into unless `--overwrite`.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from streamq.checkpoint.writer import atomic_write_json, sha256_file
from streamq.errors import OutputError

MANIFEST = "streamq_run.json"
CACHE_DIR = ".streamq_cache"
# What --overwrite may delete in a directory streamq did not create: checkpoint files only.
_OVERWRITABLE_SUFFIXES = (".safetensors", ".json", ".txt", ".model", ".jinja", ".tmp", ".md", ".png")


@dataclass
class RunState:
    out_dir: Path
    job_hash: str
    source: dict
    status: str = "running"
    shards: dict[str, dict] = field(default_factory=dict)  # shard key ("layer-3", "rest") -> file info
    resumed: bool = False
    job: dict | None = None  # JobConfig.job_identity(), so a refusal can say what changed

    @property
    def path(self) -> Path:
        return self.out_dir / MANIFEST

    def save(self) -> None:
        atomic_write_json(self.path, {"streamq_manifest": 1, "job_hash": self.job_hash, "source": self.source,
                                      "status": self.status, "shards": self.shards, "job": self.job})

    def shard_ok(self, key: str) -> bool:
        """A finished shard counts only if its file is there with the recorded size and checksum."""
        info = self.shards.get(key)
        if info is None:
            return False
        path = self.out_dir / info["file"]
        if not path.is_file() or path.stat().st_size != info["bytes"] or sha256_file(path) != info["sha256"]:
            del self.shards[key]
            return False
        return True

    def record(self, key: str, file: str, size: int, digest: str, tensors: list[str]) -> None:
        self.shards[key] = {"file": file, "bytes": size, "sha256": digest, "tensors": tensors}
        self.save()


# JobConfig.job_identity() field -> the YAML key a user edits.
_YAML_KEYS = {"quant.weight": "compression.quantization.quant_method.weight",
              "quant.activation": "compression.quantization.quant_method.activation"}


def _flatten(node, prefix: str = "") -> dict:
    if not isinstance(node, dict):
        return {prefix: node}
    return {k: v for key, value in node.items() for k, v in _flatten(value, f"{prefix}{key}.").items()}


def _describe_change(old: dict, job_hash: str, source: dict, job: dict | None = None) -> str:
    if old.get("job_hash") != job_hash:
        before, after = _flatten(old.get("job") or {}), _flatten(job or {})
        if not before or not after:
            return "the quantization config changed (algorithm, scheme, ignore list, format or dataset)"
        diffs = []
        for key in sorted(set(before) | set(after), key=lambda k: (not k.startswith("quant."), k)):
            if before.get(key) != after.get(key):
                name = key.rstrip(".")
                name = _YAML_KEYS.get(name, name.replace("quant.", "compression.quantization.", 1))
                diffs.append(f"{name} was {before.get(key)!r}, now {after.get(key)!r}")
        more = f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else ""
        return "the quantization config changed: " + "; ".join(diffs[:3]) + more
    changed = sorted(k for k in set(old.get("source", {})) | set(source)
                     if old.get("source", {}).get(k) != source.get(k))
    return f"the source checkpoint changed ({', '.join(changed[:3])})"


def clear_directory(out_dir: Path) -> None:
    """--overwrite: delete a previous checkpoint; anything that is not one stops us."""
    entries = list(out_dir.iterdir())
    for entry in entries:
        if entry.name == CACHE_DIR:
            continue
        if entry.is_dir() or not entry.name.endswith(_OVERWRITABLE_SUFFIXES) and not entry.name.startswith("tokenizer"):
            raise OutputError(f"{out_dir}: refusing to overwrite: '{entry.name}' is not a checkpoint file; "
                              "choose an empty or new save_path")
    for entry in entries:
        if entry.name == CACHE_DIR:
            shutil.rmtree(entry)
        else:
            entry.unlink()


def open_run(out_dir: Path, job_hash: str, source: dict, overwrite: bool, job: dict | None = None) -> RunState:
    """Create, resume or refuse the output directory; nothing is written before this returns."""
    manifest = out_dir / MANIFEST
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"save_path '{out_dir}' exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        old = None
        if manifest.is_file():
            try:
                old = json.loads(manifest.read_text())
            except json.JSONDecodeError:
                old = None
        same = old is not None and old.get("job_hash") == job_hash and old.get("source") == source
        if same and not overwrite:
            state = RunState(out_dir, job_hash, source, status=old.get("status", "running"),
                             shards=old.get("shards", {}), resumed=True, job=job)
            for tmp in out_dir.glob(".*.tmp"):
                tmp.unlink()  # a write that was cut off
            return state
        if not overwrite:
            if old is None:
                raise OutputError(f"save_path '{out_dir}' is not empty and was not created by streamq; "
                                  "choose another directory or pass --overwrite")
            raise OutputError(f"save_path '{out_dir}' holds a different streamq job: "
                              f"{_describe_change(old, job_hash, source, job)}. Rerun with --overwrite to start over.")
        clear_directory(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = RunState(out_dir, job_hash, source, job=job)
    state.save()
    return state
