"""Run state in the output directory: which job it holds and which layers are finished.

`streamq_run.json` is written before any shard and updated (atomically) after each
one, so a rerun of the same command skips finished layers whose files still match
their checksums. It also lists every file the run writes (`files`), recorded before the
file is written: `--overwrite` deletes exactly those (and their temporaries), so a
user's own files in the directory survive. A non-empty directory without a manifest is
never written into, with or without `--overwrite`.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from streamq.checkpoint.reader import INDEX_FILE
from streamq.checkpoint.writer import AUX_FILES, atomic_write_json, sha256_file
from streamq.errors import OutputError

log = logging.getLogger("streamq")

MANIFEST = "streamq_run.json"
CACHE_DIR = ".streamq_cache"
REPORT_FILE = "streamq_report.json"
# Files every run writes besides its shards and the aux files it copies. A manifest from
# before `files` was recorded is cleared with these plus its shards.
RUN_FILES = (MANIFEST, REPORT_FILE, INDEX_FILE, "config.json")


@dataclass
class RunState:
    out_dir: Path
    job_hash: str
    source: dict
    status: str = "running"
    shards: dict[str, dict] = field(default_factory=dict)  # shard key ("layer-3", "rest") -> file info
    resumed: bool = False
    job: dict | None = None  # JobConfig.job_identity(), so a refusal can say what changed
    files: list[str] = field(default_factory=lambda: list(RUN_FILES))  # what --overwrite may delete
    rank: int = 0  # under torchrun, ranks other than 0 record their shards in their own file

    @property
    def path(self) -> Path:
        return self.out_dir / (MANIFEST if self.rank == 0 else rank_manifest(self.rank))

    def absorb(self, shards: dict[str, dict], files: Iterable[str]) -> None:
        """Take another rank's records (its shards and files) into this state, and save."""
        self.shards.update(shards)
        self.files.extend(f for f in files if f not in self.files)
        self.save()

    def save(self) -> None:
        atomic_write_json(self.path, {"streamq_manifest": 1, "job_hash": self.job_hash, "source": self.source,
                                      "status": self.status, "shards": self.shards, "job": self.job,
                                      "files": self.files})

    def expect(self, names: Iterable[str]) -> None:
        """Record files this run is about to write (before writing them), so a later
        --overwrite knows they are streamq's even if the run is killed mid-way."""
        new = [n for n in names if n not in self.files]
        if new:
            self.files.extend(new)
            self.save()

    def shard_ok(self, key: str) -> bool:
        """A finished shard counts only if its file is there with the recorded size and checksum."""
        info = self.shards.get(key)
        if info is None:
            return False
        path = self.out_dir / info["file"]
        problem = None
        if not path.is_file():
            problem = "is missing"
        elif path.stat().st_size != info["bytes"]:
            problem = f"has {path.stat().st_size} bytes, {MANIFEST} recorded {info['bytes']}"
        elif sha256_file(path) != info["sha256"]:
            problem = f"does not match the sha256 recorded in {MANIFEST}"
        if problem is not None:
            log.warning("%s: shard '%s' (%s) %s; redoing it", self.out_dir, info["file"], key, problem)
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


def output_files(model_path: Path, total_shards: int) -> list[str]:
    """Every file a run of this job writes into save_path (recorded in the manifest first)."""
    from streamq.checkpoint.writer import shard_name

    return ([shard_name(i, total_shards) for i in range(total_shards)] + list(RUN_FILES)
            + [name for name in AUX_FILES if (model_path / name).is_file()])


def rank_manifest(rank: int) -> str:
    """Where rank `rank` (> 0) of a torchrun job records its shards until rank 0 merges them."""
    return f"streamq_run.rank{rank}.json"


def _rank_records(out_dir: Path, job_hash: str, source: dict) -> list[tuple[Path, dict]]:
    """Side manifests of other ranks of the same job (a multi-process run that stopped)."""
    found = []
    for path in sorted(out_dir.glob("streamq_run.rank*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(data, dict) and data.get("job_hash") == job_hash and data.get("source") == source:
            found.append((path, data))
    return found


def attach_run(out_dir: Path, rank: int) -> RunState:
    """A rank > 0 of a torchrun job joins the run rank 0 opened: same records, its own file."""
    data = json.loads((out_dir / MANIFEST).read_text())
    return RunState(out_dir, data["job_hash"], data["source"], status=data.get("status", "running"),
                    shards=data.get("shards", {}), resumed=False, job=data.get("job"),
                    files=list(data.get("files") or RUN_FILES), rank=rank)


def _listed_files(manifest: dict) -> set[str]:
    """The plain file names a manifest says streamq wrote (never a path: nothing outside out_dir)."""
    names = set(RUN_FILES)
    names.update(str(n) for n in manifest.get("files") or [] if isinstance(n, str))
    names.update(str(info.get("file", "")) for info in (manifest.get("shards") or {}).values()
                 if isinstance(info, dict))
    return {n for n in names if n and Path(n).name == n and n not in (".", "..")}


def clear_directory(out_dir: Path, manifest: dict) -> list[str]:
    """--overwrite: delete what the manifest lists (and their temporaries, and the cache).

    Anything else in the directory (a user's notes, logs, subdirectories) is left as it is.
    Returns the names deleted.
    """
    removed = []
    for name in sorted(_listed_files(manifest)):
        for candidate in (out_dir / name, out_dir / f".{name}.tmp"):
            if candidate.is_symlink() or candidate.is_file():
                candidate.unlink()
                removed.append(candidate.name)
    for path, _ in _rank_records(out_dir, manifest.get("job_hash"), manifest.get("source")):
        path.unlink()  # other ranks' records of that same run
        removed.append(path.name)
    cache = out_dir / CACHE_DIR
    if cache.is_dir() and not cache.is_symlink():
        shutil.rmtree(cache)
        removed.append(CACHE_DIR)
    return removed


def _not_ours(out_dir: Path, overwrite: bool) -> OutputError:
    why = "--overwrite removes only files a streamq run recorded, " if overwrite else ""
    return OutputError(f"save_path '{out_dir}' is not empty and was not created by streamq (it has no {MANIFEST}); "
                       f"{why}so nothing in it was touched. Choose a new (or empty) directory as save_path")


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
            except (json.JSONDecodeError, UnicodeDecodeError):
                old = None
            if not isinstance(old, dict) or "job_hash" not in old:
                old = None  # a file by that name that streamq did not write
        if old is None:
            raise _not_ours(out_dir, overwrite)
        same = old.get("job_hash") == job_hash and old.get("source") == source
        if same and not overwrite:
            state = RunState(out_dir, job_hash, source, status=old.get("status", "running"),
                             shards=old.get("shards", {}), resumed=True, job=job,
                             files=sorted(_listed_files(old)))
            # Shards other ranks of a multi-process run recorded before it stopped count too,
            # whatever the number of processes now.
            for path, data in _rank_records(out_dir, job_hash, source):
                state.absorb(data.get("shards") or {}, data.get("files") or [])
                path.unlink()
            for name in state.files:
                (out_dir / f".{name}.tmp").unlink(missing_ok=True)  # a write that was cut off
            return state
        if not overwrite:
            raise OutputError(f"save_path '{out_dir}' holds a different streamq job: "
                              f"{_describe_change(old, job_hash, source, job)}. Rerun with --overwrite to start over.")
        removed = clear_directory(out_dir, old)
        log.info("--overwrite: removed %d file(s) of the previous streamq run in %s", len(removed), out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = RunState(out_dir, job_hash, source, job=job)
    state.save()
    return state
