"""The planner's model of the GPTQ solve's memory (`streamq.schemes.int4.solve_bytes`)
against what `gptq_quantize` allocates on a GPU. Skipped without a CUDA device."""

from __future__ import annotations

import pytest
import torch

from streamq.quant import gptq
from streamq.schemes.int4 import solve_bytes

pytestmark = pytest.mark.gpu


# Measured on an H200 (torch 2.11), the column loop as CUDA graphs: 1.67, 0.50, 3.54, 0.91, 1.92 GiB.
@pytest.mark.parametrize("experts,rows,cols,shared,symmetric,actorder", [
    (4, 3072, 4096, False, True, False),  # Qwen3-235B-A22B gate/up, four experts, one Hessian each
    (4, 4096, 1536, False, True, False),  # ... down
    (16, 3072, 4096, True, True, False),  # all-experts: one gate/up Hessian
    (1, 9216, 4096, True, False, False),  # q/k/v stacked, asymmetric
    (4, 3072, 4096, False, True, True),  # actorder
])
def test_solve_bytes_matches_cuda_peak(experts, rows, cols, shared, symmetric, actorder):
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    w = torch.randn(experts, rows, cols, device=device, generator=gen) * 0.02
    x = torch.randn(1 if shared else experts, 2 * cols, cols, device=device, generator=gen)
    h = 2 * x.transpose(1, 2) @ x / x.shape[1]
    h = h[0] if shared else h
    del x
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    gptq.gptq_quantize(w, h, 128, symmetric, actorder=actorder)
    torch.cuda.synchronize()
    # The caller's Hessians belong to the statistics; its weight stack to the solve.
    measured = torch.cuda.max_memory_allocated() - before + w.numel() * 4
    predicted = solve_bytes(experts, rows, cols, 1 if shared else experts, symmetric, actorder)
    print(f"predicted {predicted / 2**30:.2f} GiB, measured {measured / 2**30:.2f} GiB")
    assert abs(predicted - measured) <= 0.1 * measured, (predicted / 2**30, measured / 2**30)
