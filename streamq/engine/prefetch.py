"""Reading the next layer while the current one computes, once per machine.

`Prefetcher` reads each layer in a background thread into a small pool of reused host
buffers. With several processes on one machine that all need every layer (calibrated
schemes under torchrun), `SharedPrefetcher` has the machine's first process read each
layer into shared memory (`STREAMQ_SHM_DIR`, default /dev/shm) and the others take views
of the same pages: the disk (or page cache) is read once per machine, not once per
process, and no process copies the layer.
"""

from __future__ import annotations

import logging
import mmap
import os
import queue
import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from streamq.checkpoint.reader import CheckpointReader
from streamq.pinned import host_buffer, page_lock, unregister

log = logging.getLogger("streamq")

Read = tuple[dict[str, torch.Tensor], float, torch.Tensor]  # tensors by name, seconds, their buffer


class Prefetcher:
    """Reads the next layer in a background thread while the current one computes.

    Reads release the GIL, so disk overlaps compute. Layers are read into a small pool of
    reused host buffers (fresh pages for every layer cost more than the read); on CUDA
    the buffers are page-locked once, so host-to-device copies run asynchronously.
    """

    POOL = 2  # the layer in hand and the one being read

    def __init__(self, reader: CheckpointReader, pin: bool):
        self.reader, self.pin = reader, pin
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="streamq-read")
        self.futures: dict[int, Future] = {}
        self.free: list[torch.Tensor] = []
        self.registered: dict[int, torch.Tensor] = {}  # data_ptr -> page-locked buffer
        self.lock = threading.Lock()  # free/registered: the read thread takes, the loop gives back

    def schedule(self, index: int) -> None:
        if index not in self.futures:
            self.futures[index] = self.pool.submit(self._read, index)

    def _buffer(self, size: int) -> torch.Tensor:
        with self.lock:
            fitting = [b for b in self.free if b.numel() >= size]
            if fitting:
                self.free.remove(fitting[0])
                return fitting[0]
        return host_buffer(size)

    def _read(self, index: int) -> Read:
        t0 = time.monotonic()
        names = self.reader.layers[index]
        buffer = self._buffer(self.reader.read_size(names))
        tensors = self.reader.read(names, buffer=buffer)
        self._lock_pages(buffer)
        return tensors, time.monotonic() - t0, buffer

    def _lock_pages(self, buffer: torch.Tensor) -> None:
        # Page-locked after the first read into it: its pages exist by then (streamq.pinned).
        if self.pin and buffer.data_ptr() not in self.registered and page_lock(buffer):
            with self.lock:
                self.registered[buffer.data_ptr()] = buffer

    def get(self, index: int) -> Read:
        self.schedule(index)
        return self.futures.pop(index).result()

    def recycle(self, buffer: torch.Tensor) -> None:
        """The layer read into `buffer` is done (and no copy from it is still in flight)."""
        with self.lock:
            self.free.append(buffer)
            if len(self.free) <= self.POOL:
                return
            smallest = min(self.free, key=lambda b: b.numel())  # layers differ: keep the largest
            self.free.remove(smallest)
            if self.registered.pop(smallest.data_ptr(), None) is not None:
                unregister(smallest)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self._unregister_all()
        self.free.clear()

    def _unregister_all(self) -> None:
        if self.registered:
            torch.cuda.synchronize()
            for buffer in self.registered.values():
                unregister(buffer)
            self.registered.clear()


class SharedPrefetcher(Prefetcher):
    """One read per machine: this machine's processes take turns through `SLOTS` shared
    buffers; the first process (local rank 0) reads layer n into slot n mod SLOTS, the
    others view it there (`CheckpointReader.views`).

    Every process reads the same layers in the same order (calibrated schemes: every
    process every layer), so the reads are numbered alike everywhere. Before a slot is
    refilled, every process must have recycled the layer it held (a barrier of the
    machine's processes, over gloo, in the read thread); after the fill, a second barrier
    says the layer is there. The read thread is a daemon: a process that fails mid-run
    exits without waiting on a barrier its peers will never reach (torchrun then stops them).
    """

    SLOTS = Prefetcher.POOL

    def __init__(self, reader: CheckpointReader, pin: bool, node: NodeGroup, slots: list[torch.Tensor]):
        self.reader, self.pin, self.node, self.slots = reader, pin, node, slots
        self.futures = {}
        self.registered = {}
        self.free = []
        self.lock = threading.Lock()
        self.reads = 0  # reads started (read thread only)
        self.recycled = 0  # layers given back (loop), in read order
        self.given_back = threading.Condition()
        self.queue: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._loop, name="streamq-read-shared", daemon=True)
        self.thread.start()

    def schedule(self, index: int) -> None:
        if index not in self.futures:
            self.futures[index] = future = Future()
            self.queue.put((index, future))

    def _loop(self) -> None:
        while (item := self.queue.get()) is not None:
            index, future = item
            try:
                future.set_result(self._read(index))
            except BaseException as e:  # noqa: BLE001 - handed to the loop, which raises it
                future.set_exception(e)
                return

    def _read(self, index: int) -> Read:
        n = self.reads
        self.reads += 1
        slot = self.slots[n % len(self.slots)]
        with self.given_back:  # this process is done with the slot's previous layer
            self.given_back.wait_for(lambda: self.recycled > n - len(self.slots))
        self.node.barrier()  # ... and so is every process of the machine
        t0 = time.monotonic()
        names = self.reader.layers[index]
        assert self.reader.read_size(names) <= slot.numel(), (index, self.reader.read_size(names), slot.numel())
        if self.node.leader:
            tensors = self.reader.read(names, buffer=slot)
        self.node.barrier()  # the layer is in the slot
        if not self.node.leader:
            tensors = self.reader.views(names, slot)
        self._lock_pages(slot)
        return tensors, time.monotonic() - t0, slot

    def recycle(self, buffer: torch.Tensor) -> None:
        with self.given_back:
            self.recycled += 1
            self.given_back.notify_all()

    def close(self) -> None:
        self.queue.put(None)
        idle = not self.futures
        if idle:  # no read in flight: the thread ends now; else it may wait on a peer that is gone
            self.thread.join()
            self._unregister_all()


class NodeGroup:
    """The processes of this machine (a gloo group, whatever the main backend)."""

    def __init__(self, group: Any, leader_rank: int, local_rank: int):
        self.group, self.leader_rank, self.leader = group, leader_rank, local_rank == 0

    def barrier(self) -> None:
        import torch.distributed as td

        td.barrier(group=self.group)

    def gather(self, value: Any) -> list:
        import torch.distributed as td

        out: list = [None] * td.get_world_size(self.group)
        td.all_gather_object(out, value, group=self.group)
        return out

    def broadcast(self, value: Any) -> Any:
        import torch.distributed as td

        box = [value]
        td.broadcast_object_list(box, src=self.leader_rank, group=self.group)
        return box[0]


def shared_slots(node: NodeGroup, nbytes: int, slots: int = SharedPrefetcher.SLOTS) -> list[torch.Tensor] | None:
    """`slots` host buffers of `nbytes` each that every process of the machine maps (MAP_SHARED
    files in STREAMQ_SHM_DIR, default /dev/shm, unlinked once mapped, so nothing is left behind
    however the run ends), or None on every process of the machine when the directory cannot
    hold them (then every process reads for itself; a container's default /dev/shm is 64 MB)."""
    directory = Path(os.environ.get("STREAMQ_SHM_DIR", "/dev/shm"))
    paths = _create_slots(directory, nbytes, slots) if node.leader else None
    paths = node.broadcast(paths)
    if paths is None:
        return None
    try:
        buffers = [_map(Path(p), nbytes) for p in paths]
    except OSError as e:
        log.info("one read per machine is off: cannot map %s (%s); every process reads each layer itself",
                 paths[0], e)
        buffers = None
    mapped = node.gather(buffers is not None)  # every process has mapped them, or says it could not
    if node.leader:
        for p in paths:
            Path(p).unlink(missing_ok=True)
    return buffers if all(mapped) else None


def _create_slots(directory: Path, nbytes: int, slots: int) -> list[str] | None:
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        free = 0
    need = slots * nbytes
    # Leave the machine's shared memory a margin beyond the slots.
    if free < need + need // 8:
        log.info("one read per machine is off: %s has %.1f GiB free, the shared layer buffers need %.1f GiB "
                 "(set STREAMQ_SHM_DIR to a larger tmpfs); every process reads each layer itself",
                 directory, free / 2**30, need / 2**30)
        return None
    paths: list[str] = []
    try:
        for k in range(slots):
            paths.append(str(directory / f"streamq-{os.getpid()}-{k}"))
            fd = os.open(paths[-1], os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                # Reserves the pages now: a tmpfs filling up later fails here (ENOSPC, and the run
                # falls back) instead of killing a process mid-read (SIGBUS on a sparse file).
                os.posix_fallocate(fd, 0, nbytes)
            finally:
                os.close(fd)
    except OSError as e:
        for p in paths:
            Path(p).unlink(missing_ok=True)
        log.info("one read per machine is off: cannot create shared layer buffers in %s (%s); every process "
                 "reads each layer itself", directory, e)
        return None
    return paths


def _map(path: Path, nbytes: int) -> torch.Tensor:
    fd = os.open(path, os.O_RDWR)
    try:
        mapping = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED)
    finally:
        os.close(fd)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            mapping.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass
    return torch.frombuffer(mapping, dtype=torch.uint8)  # the tensor keeps the mapping alive


def open_prefetcher(reader: CheckpointReader, pin: bool, layers: list[int], dist: Any = None) -> Prefetcher:
    """A shared prefetcher when several processes of this machine read every one of `layers`
    (`dist` given by the caller only then), else a private one. Collective over all processes."""
    node = dist.node_group() if dist is not None else None
    if node is None or not layers:
        return Prefetcher(reader, pin)
    slots = shared_slots(node, max(reader.read_size(reader.layers[i]) for i in layers))
    if slots is None:
        return Prefetcher(reader, pin)
    return SharedPrefetcher(reader, pin, node, slots)
