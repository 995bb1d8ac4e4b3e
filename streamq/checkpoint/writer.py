"""Atomic output: every file is written under a temporary name, flushed, then renamed.

A reader therefore sees either no file or a complete one. The checkpoint as a whole
only looks finished once `config.json` exists; it is written last.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
import os
import shutil
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from streamq import faults
from streamq.checkpoint.reader import INDEX_FILE, TORCH_DTYPES

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


# safetensors' own order of dtypes (its Rust enum); a file lists tensors by dtype, largest
# first, then by name, so that every tensor stays aligned without padding.
DTYPE_ORDER = ["BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32",
               "F64", "I64", "U64"]
SAFETENSORS_METADATA = {"format": "pt"}
_ST_NAMES = {dtype: name for name, dtype in TORCH_DTYPES.items()}
# One thread hashes a shard's bytes in memory while the writer thread puts them on disk.
_HASHER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="streamq-sha256")


def safetensors_header(specs: Iterable[tuple[str, str, tuple[int, ...], int]],
                       metadata: dict | None = SAFETENSORS_METADATA) -> tuple[bytes, list[str]]:
    """The header bytes (length prefix included) of a safetensors file holding `specs`
    (name, dtype name, shape, nbytes), and the order the data follows.

    Byte for byte what `safetensors.torch.save_file` writes: compact JSON, metadata first,
    tensors by dtype (largest first) then name, padded with spaces to a multiple of 8.
    """
    ordered = sorted(specs, key=lambda s: (-DTYPE_ORDER.index(s[1]), s[0]))
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, dtype, shape, nbytes in ordered:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text, [s[0] for s in ordered]


def _raw_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's bytes in place (no copy for a contiguous CPU tensor)."""
    assert t.device.type == "cpu", f"shards are written from host memory, got a tensor on {t.device}"
    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def _libc_sync_file_range():
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True).sync_file_range
    except (OSError, AttributeError):  # not Linux/glibc: the final fsync does all the work
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return fn


_SYNC_FILE_RANGE = _libc_sync_file_range()
_WRITEBACK_CHUNK = 64 << 20


def _start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing this range now (SYNC_FILE_RANGE_WRITE: no waiting),
    so the disk works while later tensors are copied into the page cache instead of idling
    until the fsync at the end."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, offset, nbytes, 2)


def _write_all(f, data: memoryview) -> None:
    while data.nbytes:  # raw writes may be partial (Linux caps one write at ~2 GiB)
        data = data[f.write(data):]


def _sha256(parts: list[memoryview]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part)  # releases the GIL for large buffers: overlaps the writes
    return h.hexdigest()


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor],
                      metadata: dict | None = SAFETENSORS_METADATA) -> tuple[int, str]:
    """Write a safetensors file straight from the tensors' memory; returns (bytes, sha256).

    The checksum is computed from memory in parallel with the write, not by reading the
    file back, and the bytes are never gathered into one Python object first.
    """
    for name, t in tensors.items():
        if t.dtype not in _ST_NAMES:
            raise ValueError(f"tensor '{name}': dtype {t.dtype} cannot be written to safetensors")
    header, order = safetensors_header(
        ((n, _ST_NAMES[t.dtype], tuple(t.shape), t.numel() * t.element_size()) for n, t in tensors.items()), metadata)
    parts = [memoryview(header)] + [_raw_bytes(tensors[n]) for n in order]
    digest = _HASHER.submit(_sha256, parts)
    with open(path, "wb", buffering=0) as f:
        written = flushed = 0
        for k, part in enumerate(parts):
            _write_all(f, part)
            written += part.nbytes
            if written - flushed >= _WRITEBACK_CHUNK:
                _start_writeback(f.fileno(), flushed, written - flushed)
                flushed = written
            if k == len(parts) // 2:
                faults.checkpoint("shard-mid-write")
        os.fsync(f.fileno())
    return sum(p.nbytes for p in parts), digest.result()


def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> tuple[int, str]:
    """Write a safetensors shard atomically; returns (bytes, sha256) of the final file."""
    tmp = path.with_name(f".{path.name}.tmp")
    size, digest = write_safetensors(tmp, tensors)
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
