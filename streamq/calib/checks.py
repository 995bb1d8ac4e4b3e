"""Activation statistics that would make a useless scale stop the run, before the layer is written.

A non-finite input absmax (Inf in the embedding, float16 overflow in an earlier layer, NaN)
gives an Inf or NaN input scale; a floor-level one (the module only ever saw zeros) gives
the smallest scale, which saturates every real activation at serving time. Both are
errors naming the layer, the module, the value and what to do about it.
"""

from __future__ import annotations

import torch

from streamq.errors import CheckpointError
from streamq.quant.fp8 import FP8_MAX, MIN_SCALE

FLOOR = MIN_SCALE * FP8_MAX  # an absmax at or below this gives the floor scale


def check_activation_stats(layer: int, input_absmax: dict[str, torch.Tensor] | None, dtype: torch.dtype | None = None
                           ) -> None:
    """Raise naming the first module whose input absmax is non-finite or floor-level.
    One host synchronization for the whole layer."""
    if not input_absmax:
        return
    names = list(input_absmax)
    values = torch.stack([_worst(input_absmax[n]) for n in names]).cpu()
    for name, value in zip(names, values.tolist(), strict=True):
        if value != value or value in (float("inf"), float("-inf")):
            fp16 = " (float16 overflows above 65504: run in bfloat16, model.torch_dtype)" \
                if dtype == torch.float16 else ""
            raise CheckpointError(
                f"layer {layer}: the calibration input of '{name}' has absmax {value}: the activations reaching "
                f"it are not finite{fp16}. Check the source weights for Inf/NaN (the embedding first), calibrate in "
                "bfloat16 or float32, or list the module in ignore_layers; nothing of this layer was written")
        if value <= FLOOR:
            raise CheckpointError(
                f"layer {layer}: the calibration input of '{name}' has absmax {value:g}: it received only zeros, "
                "so its input scale would be the floor and every real activation would saturate. Check the "
                "calibration data (real tokens, not padding) and the layers before it, or list the module in "
                "ignore_layers; nothing of this layer was written")


def _worst(t: torch.Tensor) -> torch.Tensor:
    """NaN if any, else the largest magnitude (Inf when there is one)."""
    t = t.detach().reshape(-1).to(torch.float32)
    nan = torch.isnan(t)
    return torch.where(nan.any(), torch.tensor(float("nan"), device=t.device), t.abs().amax())
