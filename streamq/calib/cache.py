"""Hidden states of every calibration batch between two layers.

Each batch's tensor is replaced in place by the layer's output, so the cache holds one
copy of the activations, wherever it lives: on the device, in (pinned) host memory,
or in files on disk when neither has room.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from streamq.pinned import locked_buffer, unregister

LOCATIONS = ("device", "host", "disk")
CHUNK_BYTES = 1 << 30  # host cache on CUDA: page-locked 1 GiB chunks, carved into batches
_ALIGN = 64


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def pinned_cache_bytes(batch_bytes: list[int]) -> int:
    """Page-locked bytes `_PinnedChunks` takes for batches of these sizes, put in order."""
    total, room = 0, 0
    for n in batch_bytes:
        if n > CHUNK_BYTES:  # a batch larger than a chunk gets a buffer of its own
            total += n
        elif _aligned(n) <= room:
            room -= _aligned(n)
        else:
            total += CHUNK_BYTES
            room = CHUNK_BYTES - _aligned(n)
    return total


class _PinnedChunks:
    """Batches of the host cache carved out of a few large page-locked chunks: one
    `cudaHostAlloc` per batch would cost more than the copies it speeds up."""

    def __init__(self) -> None:
        self.buffers: list[tuple[torch.Tensor, bool]] = []  # (buffer, registered), kept alive
        self.chunk: torch.Tensor | None = None
        self.room = 0

    def take(self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > CHUNK_BYTES:
            return self._new(nbytes)[:nbytes].view(dtype).view(tuple(shape))
        if self.chunk is None or _aligned(nbytes) > self.room:
            self.chunk, self.room = self._new(CHUNK_BYTES), CHUNK_BYTES
        at = CHUNK_BYTES - self.room
        self.room -= _aligned(nbytes)
        return self.chunk[at:at + nbytes].view(dtype).view(tuple(shape))

    def _new(self, nbytes: int) -> torch.Tensor:
        buffer, registered = locked_buffer(nbytes)
        self.buffers.append((buffer, registered))
        return buffer

    def close(self) -> None:
        if any(registered for _, registered in self.buffers):
            torch.cuda.synchronize()
            for buffer, registered in self.buffers:
                if registered:
                    unregister(buffer)
        self.buffers.clear()
        self.chunk, self.room = None, 0


class HiddenStateCache:
    def __init__(self, location: str, device: torch.device, disk_dir: Path | None = None):
        assert location in LOCATIONS, location
        self.location, self.device, self.disk_dir = location, device, disk_dir
        self._mem: dict[int, torch.Tensor] = {}
        self._pin = location == "host" and device.type == "cuda"
        self._chunks = _PinnedChunks() if self._pin else None
        if location == "disk":
            assert disk_dir is not None
            disk_dir.mkdir(parents=True, exist_ok=True)

    def put(self, batch: int, hidden: torch.Tensor) -> None:
        if self.location == "device":
            self._mem[batch] = hidden.to(self.device)
        elif self.location == "host":
            # Asynchronous into pinned memory: no synchronization per batch, so the GPU never
            # idles while Python launches the next batch. Ordered on the stream before the
            # next layer's copy back; `sync` before the host itself reads the cache.
            old = self._mem.get(batch)
            if old is not None and old.shape == hidden.shape and old.dtype == hidden.dtype:
                old.copy_(hidden, non_blocking=self._pin)  # reuse the pinned buffer
            else:
                host = self._chunks.take(hidden.shape, hidden.dtype) if self._chunks is not None \
                    else torch.empty(hidden.shape, dtype=hidden.dtype)
                host.copy_(hidden, non_blocking=self._pin)
                self._mem[batch] = host
        else:
            save_file({"h": hidden.contiguous().cpu()}, str(self.disk_dir / f"batch-{batch:06d}.safetensors"))

    def sync(self) -> None:
        """Wait for the asynchronous copies into host memory."""
        if self._pin:
            torch.cuda.synchronize(self.device)

    def get(self, batch: int) -> torch.Tensor:
        if self.location == "disk":
            return load_file(str(self.disk_dir / f"batch-{batch:06d}.safetensors"))["h"].to(self.device)
        return self._mem[batch].to(self.device, non_blocking=True)

    def close(self) -> None:
        """Drop the live cache; checkpoints (siblings of disk_dir) survive for a resume."""
        self._mem.clear()
        if self._chunks is not None:
            self._chunks.close()
        if self.location == "disk" and self.disk_dir is not None:
            shutil.rmtree(self.disk_dir, ignore_errors=True)


# --- Checkpoints of the cache, so a resumed static run need not replay every layer ---

_CKPT_PREFIX = "checkpoint-layer-"


def save_checkpoint(cache: HiddenStateCache, num_batches: int, next_layer: int, root: Path) -> Path:
    """Persist the hidden states entering `next_layer`; atomic (directory rename).

    Several processes call the three steps themselves: one starts, each writes its own
    batches into the same directory, one commits."""
    tmp = start_checkpoint(root, next_layer)
    write_checkpoint_batches(cache, range(num_batches), tmp)
    return commit_checkpoint(root, next_layer)


def checkpoint_dirs(root: Path, next_layer: int) -> tuple[Path, Path]:
    """(temporary, final) directory of the checkpoint entering `next_layer`."""
    final = root / f"{_CKPT_PREFIX}{next_layer:05d}"
    return root / f".{final.name}.tmp", final


def start_checkpoint(root: Path, next_layer: int) -> Path:
    """A fresh (empty) temporary directory for the checkpoint entering `next_layer`."""
    tmp, _ = checkpoint_dirs(root, next_layer)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def write_checkpoint_batches(cache: HiddenStateCache, ids, tmp: Path) -> None:
    """One file per batch, named by its index, so any split of the batches reads them back."""
    from streamq import faults

    for b in ids:
        save_file({"h": cache.get(b).contiguous().cpu()}, str(tmp / f"batch-{b:06d}.safetensors"))
        faults.checkpoint("cache-checkpoint-batch")


def commit_checkpoint(root: Path, next_layer: int) -> Path:
    """Make the written checkpoint the current one (a rename), and drop older ones."""
    tmp, final = checkpoint_dirs(root, next_layer)
    tmp.rename(final)
    for old in root.glob(f"{_CKPT_PREFIX}*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(root: Path, at_most: int) -> tuple[int, Path] | None:
    """The newest complete checkpoint for a layer index <= at_most, if any."""
    found = []
    for path in root.glob(f"{_CKPT_PREFIX}*"):
        layer = int(path.name[len(_CKPT_PREFIX):])
        if layer <= at_most:
            found.append((layer, path))
    return max(found) if found else None


def load_checkpoint(cache: HiddenStateCache, num_batches: int, path: Path, ids: list[int] | None = None) -> None:
    """The checkpointed hidden states of batches `ids` (default: all), one file per batch,
    so processes splitting the samples in any way load their own."""
    for b in range(num_batches) if ids is None else ids:
        cache.put(b, load_file(str(path / f"batch-{b:06d}.safetensors"))["h"])
