"""Atomic output: every file is written under a temporary name, flushed, then renamed.

A reader therefore sees either no file or a complete one. The checkpoint as a whole
only looks finished once `config.json` exists; it is written last.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from streamq.checkpoint.reader import INDEX_FILE
from streamq.engine import faults

# Files besides weights and config.json that a served model needs.
AUX_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
             "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
             "generation_config.json", "preprocessor_config.json")


def shard_name(i: int, total: int) -> str:
    return f"model-{i + 1:05d}-of-{total:05d}.safetensors"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(16 * 2**20), b""):
            h.update(chunk)
    return h.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: dict) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> tuple[int, str]:
    """Write a safetensors shard atomically; returns (bytes, sha256) of the final file."""
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.chmod(tmp, 0o666 & ~_umask())  # safetensors creates 0600 files; match what `open` would
    digest = sha256_file(tmp)
    size = tmp.stat().st_size
    faults.checkpoint("shard-tmp-written")
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return size, digest


def write_index(out_dir: Path, weight_map: dict[str, str], total_size: int) -> None:
    atomic_write_json(out_dir / INDEX_FILE, {"metadata": {"total_size": total_size},
                                             "weight_map": dict(sorted(weight_map.items()))})


def copy_aux_files(src: Path, out_dir: Path) -> list[str]:
    copied = []
    for name in AUX_FILES:
        if (src / name).is_file():
            tmp = out_dir / f".{name}.tmp"
            shutil.copyfile(src / name, tmp)
            os.replace(tmp, out_dir / name)
            copied.append(name)
    return copied


def write_config(src: Path, out_dir: Path, quantization_config: dict) -> None:
    """config.json unchanged except `quantization_config`; written last, it marks completion."""
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = quantization_config
    atomic_write_json(out_dir / "config.json", config)
