"""Time one GPTQ solve of each kind of work unit of a synthetic Qwen3-235B-A22B layer on this
GPU, the column loop eager and replayed as CUDA graphs, next to the cost `WorkUnit.seconds`
gives it (the cost several processes split the work by, `streamq.engine.dist.assign`).
Random weights, Hessians X^T X of random tokens.

    python scripts/time_gptq_units.py            # needs a GPU
"""

from __future__ import annotations

import time

import torch

from streamq.calib.hessian import add_gram
from streamq.quant.gptq import gptq_quantize
from streamq.schemes.base import GPU_COSTS, WorkUnit
from streamq.schemes.int4 import expert_chunk

HIDDEN, HEADS, KV, HEAD_DIM, EXPERTS, MOE_I = 4096, 64, 4, 128, 128, 1536


def hessians(n: int, cols: int, device) -> torch.Tensor:
    x = torch.randn(n, 2048, cols, device=device)
    return x.transpose(1, 2) @ x


def main() -> None:
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    units = {  # name -> (experts, rows, cols, per-expert Hessians)
        "q/k/v stack": (1, HEADS * HEAD_DIM + 2 * KV * HEAD_DIM, HIDDEN, False),
        "o_proj": (1, HIDDEN, HEADS * HEAD_DIM, False),
        "experts gate/up chunk": (expert_chunk(2 * MOE_I, HIDDEN, EXPERTS, True), 2 * MOE_I, HIDDEN, True),
        "experts down chunk": (expert_chunk(HIDDEN, MOE_I, EXPERTS, True), HIDDEN, MOE_I, True),
    }
    for name, (e, rows, cols, per_expert) in units.items():
        w = torch.randn(e, rows, cols, device=device) * 0.02
        h = hessians(e if per_expert else 1, cols, device)
        h = h if per_expert else h[0]
        gptq_quantize(w[:1], h[:1] if per_expert else h, 128, True)  # warm-up
        unit = WorkUnit((name,), cols, float(e * (rows * cols * cols + cols ** 3)), e * rows)
        codes = {}
        for graphs in (False, True):
            torch.cuda.synchronize()
            t0 = time.monotonic()
            codes[graphs] = gptq_quantize(w, h, 128, True, graphs=graphs).codes
            torch.cuda.synchronize()
            took = time.monotonic() - t0
            print(f"{name:24s} {'graphed' if graphs else 'eager  '} experts {e:3d} rows {rows:5d} cols {cols:5d}: "
                  f"measured {took:6.2f} s, WorkUnit.seconds {unit.seconds(GPU_COSTS):6.2f} s, "
                  f"per column {1e3 * took / cols:.3f} ms, "
                  f"per column per 1k rows {1e6 * took / cols / (e * rows):.2f} us")
        print(f"{name:24s} graphed codes identical to eager: {torch.equal(codes[False], codes[True])}")
        del w, h
        torch.cuda.empty_cache()
    # The statistics: one calibration batch's Hessian updates of every expert's gate/up
    # (4 x 2048 tokens, top-8 of 128), as bfloat16 rows on the tensor cores and upcast.
    rows = torch.randn(4 * 2048 * 8 // EXPERTS, HIDDEN, device=device).bfloat16()
    acc = torch.zeros(HIDDEN, HIDDEN, device=device)
    for name, run in (("bfloat16 rows, tensor cores", lambda: add_gram(acc, rows)),
                      ("rows upcast to float32", lambda: acc.addmm_(rows.float().T, rows.float()))):
        run()
        torch.cuda.synchronize()
        t0 = time.monotonic()
        for _ in range(EXPERTS):
            run()
        torch.cuda.synchronize()
        took = time.monotonic() - t0
        macs = EXPERTS * rows.shape[0] * HIDDEN * HIDDEN
        print(f"Hessian updates, {EXPERTS} experts x {rows.shape[0]} rows x {HIDDEN}: {name}: {took * 1e3:.1f} ms, "
              f"{macs / took:.2e} multiply-adds/s")


if __name__ == "__main__":
    main()
