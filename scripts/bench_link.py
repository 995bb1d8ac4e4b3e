"""How fast the processes of a torchrun job reach each other: NCCL broadcast bandwidth for the
sizes streamq sends (a calibration batch's hidden states, a layer), and the latency of the
small object gather each exchange starts with. Context for `make bench-dist`'s numbers.

    python -m torch.distributed.run --nproc-per-node 2 scripts/bench_link.py
"""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as td


def main() -> None:
    td.init_process_group("nccl")
    rank = td.get_rank()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    torch.cuda.set_device(device)
    for label, nbytes in (("batch of hidden states, 4 x 2048 x 4096 bf16", 64 << 20),
                          ("a 235B layer's int8 codes, half", 1200 << 20),
                          ("a 235B layer as read", 4800 << 20)):
        buf = torch.empty(nbytes, dtype=torch.uint8, device=device)
        td.broadcast(buf, src=0)  # warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        reps = 5
        for _ in range(reps):
            td.broadcast(buf, src=0)
        torch.cuda.synchronize()
        seconds = (time.perf_counter() - t0) / reps
        if rank == 0:
            print(f"broadcast {label}: {nbytes / 2**20:.0f} MiB in {seconds * 1e3:.1f} ms = "
                  f"{nbytes / seconds / 1e9:.1f} GB/s")
        del buf
    t0 = time.perf_counter()
    for _ in range(20):
        out: list = [None] * td.get_world_size()
        td.all_gather_object(out, {"h0": ((4, 2048, 4096), torch.bfloat16)})
    if rank == 0:
        print(f"all_gather_object: {(time.perf_counter() - t0) / 20 * 1e3:.2f} ms")
    td.destroy_process_group()


if __name__ == "__main__":
    main()
