"""Page-locked host memory that the layer loop reuses instead of allocating per tensor.

On CUDA every byte crossing PCIe should come from or land in page-locked memory, or the
copy is synchronous. Pinning is slow (the kernel touches every page), and torch's pinned
allocator rounds each block up to a power of two, so streamq pins a few large buffers once
and carves tensors out of them:

- the prefetcher reads each layer into one of two registered read buffers;
- a layer's outputs (FP8 weights, scales, unchanged tensors) are copied into one of two
  output arenas, and the writer serializes the shard straight from that arena.

Two of each suffice because the loop keeps at most one layer being read ahead and one
shard being written while the current layer computes.

Page-locking costs time once per buffer, and while `cudaHostRegister` runs every other
CUDA call of the process waits. Measured on an H100 host for 4.7 GB: 2.35 s to register
untouched 4 KiB pages, 0.45 s to touch huge pages + 0.31 s to register them. So buffers
are anonymous mappings advised to use transparent huge pages, and are registered only
after their pages exist (a read buffer after its first read, an arena after a fill).
"""

from __future__ import annotations

import math
import mmap
from collections.abc import Iterable
from concurrent.futures import Future

import torch

ALIGN = 64  # every slot starts on a 64-byte boundary: any dtype view is aligned


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def output_arena_bytes(tensors: Iterable[tuple[tuple[int, ...], int, bool]]) -> int:
    """Bytes that always hold one layer's outputs, from its source tensors as
    (shape, stored bytes, quantized): a quantized weight becomes FP8 (1 byte per element),
    a weight scale (at most one float32 per output row) and an input scale; every other
    tensor is copied as stored."""
    total = 0
    for shape, nbytes, quantized in tensors:
        if quantized:
            total += _aligned(math.prod(shape)) + _aligned(4 * shape[0]) + _aligned(4)
        else:
            total += _aligned(nbytes)
    return total


def host_buffer(nbytes: int) -> torch.Tensor:
    """A large uint8 host buffer, on transparent huge pages where the OS offers them."""
    if nbytes > 0 and hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            mapping = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            mapping.madvise(mmap.MADV_HUGEPAGE)
            return torch.frombuffer(mapping, dtype=torch.uint8)  # the tensor keeps the mapping alive
        except (OSError, ValueError):
            pass
    return torch.empty(nbytes, dtype=torch.uint8)


def page_lock(buffer: torch.Tensor) -> bool:
    """Register a host buffer with CUDA (no power-of-two rounding, unlike torch's pinned
    allocator). It can fail (locked-memory limits); the buffer then still works, with
    synchronous copies."""
    nbytes = buffer.numel()
    return nbytes > 0 and int(torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), nbytes, 0)) == 0


def unregister(buffer: torch.Tensor) -> None:
    torch.cuda.cudart().cudaHostUnregister(buffer.data_ptr())


class Arena:
    """One layer's outputs: a bump allocator over a page-locked buffer."""

    def __init__(self, buffer: torch.Tensor, registered: bool):
        self.buffer, self.registered = buffer, registered
        self.used = 0
        self.busy: Future | None = None  # the write that reads from this arena

    def take(self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialized tensor in the arena (a fresh pinned one if the arena is full)."""
        nbytes = math.prod(shape) * dtype.itemsize
        if self.used + nbytes > self.buffer.numel():  # only if output_arena_bytes undercounts
            return torch.empty(tuple(shape), dtype=dtype, pin_memory=self.registered)
        view = self.buffer[self.used:self.used + nbytes].view(dtype).view(tuple(shape))
        self.used = _aligned(self.used + nbytes)
        return view

    def to_host(self, t: torch.Tensor) -> torch.Tensor:
        """An asynchronous copy of a device tensor into the arena (the caller synchronizes)."""
        return self.take(t.shape, t.dtype).copy_(t, non_blocking=True)


class OutputArenas:
    """Two arenas used in turn; an arena is reused only once the write reading it is done."""

    def __init__(self, count: int = 2, pin: bool = True):
        self.arenas: list[Arena | None] = [None] * count
        self.turn, self.pin = 0, pin

    def begin(self, nbytes: int) -> Arena:
        k, self.turn = self.turn, (self.turn + 1) % len(self.arenas)
        arena = self.arenas[k]
        if arena is not None and arena.busy is not None:
            arena.busy.result()  # normally long done: the loop waits for each write before the next
        if arena is None or arena.buffer.numel() < nbytes:
            if arena is not None and arena.registered:
                unregister(arena.buffer)
            buffer, registered = host_buffer(nbytes), False
            if self.pin:
                buffer.fill_(0)  # fault the pages in before locking them
                registered = page_lock(buffer)
            self.arenas[k] = arena = Arena(buffer, registered)
        arena.used, arena.busy = 0, None
        return arena

    def close(self) -> None:
        for arena in self.arenas:
            if arena is not None and arena.registered:
                unregister(arena.buffer)
        self.arenas = [None] * len(self.arenas)
