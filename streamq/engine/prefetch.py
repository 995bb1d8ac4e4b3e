"""Reading the next layer while the current one computes, once per machine.

`Prefetcher` reads each layer in a background thread into a small pool of reused host
buffers. With several processes on one machine that all need every layer (calibrated
schemes under torchrun), `NodePrefetcher` has the machine's first process read each layer
and broadcast it to the others over NVLink (or the network, on CPUs): the disk (or page
cache) is read once per machine, not once per process.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from streamq.checkpoint.reader import CheckpointReader
from streamq.pinned import host_buffer, page_lock, unregister

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


class NodePrefetcher(Prefetcher):
    """One read per machine: the machine's first process (local rank 0) reads each layer
    (in the background, into its page-locked buffers, as `Prefetcher`) and broadcasts the
    layer's bytes to the machine's other processes over the device's link (NCCL over
    NVLink on GPUs, gloo on CPUs). Every process then views the layer's tensors in its own
    copy of the bytes (`CheckpointReader.views`), on its device.

    `get` is a collective of the machine's processes, in the main thread: every process
    takes every layer in the same order (calibrated schemes under torchrun), so the
    broadcasts pair up. On CUDA the received layer is one device buffer of the layer's size,
    held until the layer is done (the planner counts it); the reading process copies its
    host buffer in once and gives the host buffer back at once.
    """

    def __init__(self, reader: CheckpointReader, pin: bool, node: NodeGroup, device: torch.device):
        super().__init__(reader, pin)
        self.node, self.device = node, device

    def schedule(self, index: int) -> None:
        if self.node.leader:
            super().schedule(index)

    def get(self, index: int) -> Read:
        names = self.reader.layers[index]
        nbytes = self.reader.read_size(names)
        if self.node.leader:
            _, seconds, host = super().get(index)
            if self.device.type == "cuda":
                layer = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
                layer.copy_(host[:nbytes], non_blocking=self.pin)
                copied = torch.cuda.Event()
                copied.record()
            else:
                layer = host  # broadcast from the read buffer itself; recycled with the layer
        else:
            seconds = 0.0  # read nothing; the wait for the broadcast is the caller's wait for the read
            layer = torch.empty(nbytes, dtype=torch.uint8, device=self.device) if self.device.type == "cuda" \
                else self._buffer(nbytes)
        self.node.broadcast(layer[:nbytes])
        if self.node.leader and layer is not host:
            copied.synchronize()  # the copy out of `host` has landed (not the broadcast: peers may be late)
            self.recycle(host)
        return self.reader.views(names, layer), seconds, layer

    def recycle(self, buffer: torch.Tensor) -> None:
        if buffer.device.type == "cpu":  # a device buffer is simply dropped
            super().recycle(buffer)


class NodeGroup:
    """The processes of this machine, as a process group of the job's backend (NCCL on
    GPUs, gloo on CPUs), and which of them reads."""

    def __init__(self, group: Any, leader_rank: int, local_rank: int, size: int):
        self.group, self.leader_rank, self.leader = group, leader_rank, local_rank == 0
        self.size = size  # processes per machine; machines hold consecutive ranks, each read by its first

    def broadcast(self, tensor: torch.Tensor) -> None:
        """`tensor` from the reading process to every process of the machine, in place."""
        import torch.distributed as td

        td.broadcast(tensor, src=self.leader_rank, group=self.group)


def open_prefetcher(reader: CheckpointReader, pin: bool, device: torch.device, node: NodeGroup | None = None
                   ) -> Prefetcher:
    """A prefetcher that reads once per machine when several processes of this machine take
    every layer (`node`, from `Dist.node_group`, given by the caller only then), else a
    private one."""
    if node is None:
        return Prefetcher(reader, pin)
    return NodePrefetcher(reader, pin, node, device)
