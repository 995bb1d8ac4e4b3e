"""What gets quantized and how: the scheme, independent of file format and layer loop."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from streamq.errors import CheckpointError
from streamq.model.fused import fused_group_key
from streamq.quant import fp8
from streamq.quant.granularity import Granularity, PerTensor


@dataclass(frozen=True)
class QuantScheme:
    """W8A8 FP8: weight granularity, activation granularity, static or dynamic activations."""

    algorithm: str  # "fp8_dynamic" | "fp8_static"
    weight: Granularity
    activation: Granularity
    ignore: tuple[str, ...] = ()

    @property
    def static_activations(self) -> bool:
        return self.algorithm == "fp8_static"

    @property
    def shares_fused_weight_scale(self) -> bool:
        """Per-tensor weights of a fused group (q/k/v, gate/up) get one scale.

        vLLM fuses these Linears and requantizes every member to the group's largest
        scale; writing that shared scale up front avoids a second rounding at load time.
        """
        return isinstance(self.weight, PerTensor)


@dataclass
class QuantizedLinear:
    weight: torch.Tensor  # float8_e4m3fn [out, in]
    weight_scale: torch.Tensor  # float32 [] or [out, 1]
    input_scale: torch.Tensor | None  # float32 [] (static only)


def checked_absmax(weights: dict[str, torch.Tensor], granularity: Granularity) -> dict[str, torch.Tensor]:
    """Absmax of every weight; NaN or Inf anywhere is an error naming the tensor.

    NaN propagates through max and Inf is its own max, so checking the absmax checks the
    weight. One host synchronization for the whole layer, not one per tensor.
    """
    absmax = {name: fp8.weight_absmax(w, granularity) for name, w in weights.items()}
    if absmax:
        finite = torch.stack([torch.isfinite(a).all() for a in absmax.values()]).cpu()
        if not bool(finite.all()):
            bad = list(absmax)[int((~finite).nonzero()[0])]
            raise CheckpointError(f"tensor '{bad}.weight' contains NaN or Inf values; refusing to quantize it")
    return absmax


def iter_quantized(
    weights: dict[str, torch.Tensor],
    scheme: QuantScheme,
    input_absmax: dict[str, torch.Tensor] | None = None,
) -> Iterator[tuple[str, QuantizedLinear]]:
    """Quantize the Linear weights of one layer, one at a time, keyed by module name.

    `weights` maps module name -> 2D weight. Fused groups share their weight scale when
    the scheme says so, so every absmax is taken first; the FP8 tensors are then made
    lazily, letting the caller move each one off the device before the next exists.
    `input_absmax` (static schemes) maps module name -> float32 [].
    """
    absmax = checked_absmax(weights, scheme.weight)
    if scheme.shares_fused_weight_scale:
        group_max: dict[str, torch.Tensor] = {}
        for name, a in absmax.items():
            key = fused_group_key(name)
            group_max[key] = a if key not in group_max else torch.maximum(group_max[key], a)
        absmax = {name: group_max[fused_group_key(name)] for name in absmax}
    for name, w in weights.items():
        scale = fp8.scale_from_absmax(absmax[name])
        input_scale = None
        if scheme.static_activations:
            assert input_absmax is not None and name in input_absmax, f"no activation statistics for {name}"
            input_scale = fp8.scale_from_absmax(input_absmax[name].to(torch.float32))
        yield name, QuantizedLinear(fp8.quantize_fp8(w, scale), scale, input_scale)


def quantize_weights(
    weights: dict[str, torch.Tensor],
    scheme: QuantScheme,
    input_absmax: dict[str, torch.Tensor] | None = None,
) -> dict[str, QuantizedLinear]:
    """All of `iter_quantized` at once (tests, small layers)."""
    return dict(iter_quantized(weights, scheme, input_absmax))
