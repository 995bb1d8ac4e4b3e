"""Several processes under `torchrun`: one per GPU (NCCL) or per CPU slot (gloo).

`python -m streamq quantize` alone is one process and never touches torch.distributed;
under `torchrun --nproc-per-node N [--nnodes M ...] -m streamq quantize -c CONFIG` the
environment torchrun sets (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT) makes `from_env`
start a process group. What is split today: calibration-free schemes split whole layers
across ranks (each rank reads and writes only its layers, so the output bytes are the
single-process run's); rank 0 opens the output directory, writes the non-layer shard, and
writes the index and config.json last, after gathering every rank's shard records.

If one rank dies, torchrun's agent stops the others; collectives time out after
STREAMQ_DIST_TIMEOUT_MINUTES (default 30) as a second bound.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from streamq.errors import StreamqError


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    local_rank: int

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def device(self, configured: str) -> str:
        """One GPU per process: cuda / auto become cuda:LOCAL_RANK; cpu stays cpu."""
        import torch

        if configured == "cpu" or (configured == "auto" and not torch.cuda.is_available()):
            return "cpu"
        return f"cuda:{self.local_rank}"

    def mine(self, items: list) -> list:
        """This rank's share of `items`, round robin (layer i to rank i mod world)."""
        return items[self.rank::self.world]

    def gather(self, obj: Any) -> list:
        import torch.distributed as td

        out: list = [None] * self.world
        td.all_gather_object(out, obj)
        return out

    def share_outcome(self, error: BaseException | None) -> None:
        """Rank 0 tells every rank whether a step it alone did (opening the output) failed;
        every rank then raises the same error, so none waits on a collective that never comes."""
        import torch.distributed as td

        box = [None if error is None else (type(error).__name__, str(error), getattr(error, "exit_code", 1))]
        td.broadcast_object_list(box, src=0)
        if box[0] is not None:
            if error is not None:
                raise error
            raise _Remote(*box[0])

    def barrier(self) -> None:
        import torch.distributed as td

        td.barrier()

    def close(self) -> None:
        import torch.distributed as td

        if td.is_initialized():
            td.destroy_process_group()


class _Remote(StreamqError):
    """The error rank 0 hit, as the other ranks report it."""

    def __init__(self, kind: str, message: str, exit_code: int):
        super().__init__(f"rank 0 stopped the job ({kind}): {message}")
        self.exit_code = exit_code


def from_env(device: str = "auto") -> Dist | None:
    """A process group when torchrun started this process with WORLD_SIZE > 1, else None."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    import torch
    import torch.distributed as td

    use_nccl = device != "cpu" and torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_nccl:
        torch.cuda.set_device(local_rank)
    minutes = float(os.environ.get("STREAMQ_DIST_TIMEOUT_MINUTES", "30"))
    td.init_process_group("nccl" if use_nccl else "gloo", timeout=timedelta(minutes=minutes))
    return Dist(td.get_rank(), td.get_world_size(), local_rank)
