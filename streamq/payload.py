"""Reading a checkpoint's bytes for `streamq verify`: checksums and FP8 NaN codes.

Both stream the files in fixed-size chunks, so a 5 GB shard never sits in memory.

F8_E4M3 (float8_e4m3fn) has no infinities and one NaN pattern per sign: exponent and
mantissa all ones, i.e. bytes 0x7F and 0xFF. A correct quantizer never writes them (it
clamps to +-448 before the cast), so one found in a weight means a NaN or a broken cast
reached the output, which a model would turn into NaN logits.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np

CHUNK_BYTES = 16 * 2**20
FP8_E4M3 = "F8_E4M3"
_NAN_MASK = 0x7F  # byte & 0x7F == 0x7F: exponent 1111 and mantissa 111, either sign


def sha256_file(path: Path, chunk: int = CHUNK_BYTES) -> str:
    """sha256 of a file, read in chunks (what the run manifest records for each shard)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def count_fp8_nan(data: bytes | memoryview | np.ndarray) -> int:
    """Number of F8_E4M3 NaN codes (0x7F, 0xFF) in a byte buffer."""
    arr = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data
    return int(np.count_nonzero((arr & _NAN_MASK) == _NAN_MASK))


def fp8_nan_counts(path: Path, chunk: int = CHUNK_BYTES) -> dict[str, tuple[int, int]]:
    """F8_E4M3 tensor name -> (NaN codes, elements) for every FP8 tensor of one shard that has any.

    Reads the header for the tensors' byte ranges, then each FP8 tensor in chunks of
    `chunk` bytes. Raises OSError / ValueError for a file that is not readable safetensors
    (verify reports those from the header check already).
    """
    found: dict[str, tuple[int, int]] = {}
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
        base = 8 + header_len
        for name, meta in header.items():
            if name == "__metadata__" or meta.get("dtype") != FP8_E4M3:
                continue
            begin, end = meta["data_offsets"]
            f.seek(base + begin)
            nan, left = 0, end - begin
            while left > 0:
                block = f.read(min(chunk, left))
                if not block:
                    break  # truncated: the header check reports it
                nan += count_fp8_nan(block)
                left -= len(block)
            if nan:
                found[name] = (nan, end - begin)
    return found
