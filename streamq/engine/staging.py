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

The buffers come from `streamq.pinned` (huge pages, locked once their pages exist).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from concurrent.futures import Future

import torch

from streamq.pinned import host_buffer, locked_buffer, unregister

ALIGN = 64  # every slot starts on a 64-byte boundary: any dtype view is aligned


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def output_arena_bytes(sizes: Iterable[int]) -> int:
    """Bytes that always hold one layer's outputs, from the byte size of every tensor the
    layer's shard holds (the format's specs for quantized weights, the rest as stored)."""
    return sum(_aligned(n) for n in sizes)


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
    """Arenas used in turn (two: one layer's outputs written while the next layer's fill the
    other; one when processes take turns writing layers, so a process's previous write
    had the other processes' layers to finish); an arena is reused only once the write
    reading it is done."""

    def __init__(self, count: int = 2, pin: bool = True):
        self.arenas: list[Arena | None] = [None] * count
        self.turn, self.pin = 0, pin

    def begin(self, nbytes: int) -> Arena:
        k, self.turn = self.turn, (self.turn + 1) % len(self.arenas)
        arena = self._sized(k, nbytes)
        arena.used, arena.busy = 0, None
        return arena

    def reserve(self, nbytes: int) -> None:
        """Every arena page-locked for `nbytes` now, ahead of the layer loop: touching and
        locking a 1.2 GB arena took 0.35-0.45 s on an H200 host, stalling the process's CUDA
        calls, which mid-loop the other processes of a torchrun job would wait out at their
        next collective."""
        for k in range(len(self.arenas)):
            self._sized(k, nbytes)

    def _sized(self, k: int, nbytes: int) -> Arena:
        """Arena k, once the write reading it is done, grown to `nbytes` if smaller."""
        arena = self.arenas[k]
        if arena is not None and arena.busy is not None:
            arena.busy.result()  # normally long done: the loop waits for each write before the next
        if arena is None or arena.buffer.numel() < nbytes:
            if arena is not None and arena.registered:
                unregister(arena.buffer)
            self.arenas[k] = arena = Arena(*(locked_buffer(nbytes) if self.pin else (host_buffer(nbytes), False)))
        return arena

    def close(self) -> None:
        for arena in self.arenas:
            if arena is not None and arena.registered:
                unregister(arena.buffer)
        self.arenas = [None] * len(self.arenas)
