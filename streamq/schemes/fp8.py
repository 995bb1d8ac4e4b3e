"""FP8 (e4m3) schemes: fp8_dynamic and fp8_static (W8A8, per-tensor or per-channel
weights), and fp8_blockwise (128x128 weight blocks, dynamic per-token-group inputs: the
DeepSeek-V3 / official Qwen3-FP8 recipe). Math: `streamq.quant.fp8`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from streamq.errors import ConfigError
from streamq.formats.base import QuantSpec
from streamq.quant.granularity import (
    ACTIVATION_GRANULARITIES,
    WEIGHT_GRANULARITIES,
    PerBlock,
    PerTensor,
    PerToken,
)
from streamq.schemes.base import Q, QuantizedLinear, Scheme, check_bits, one_of, register, require_finite


def _fused_absmax(absmax: dict, shared: bool) -> dict:
    """vLLM fuses q/k/v and gate/up and requantizes every member to the group's largest
    scale; writing that shared scale up front avoids a second rounding at load time."""
    if not shared:
        return absmax
    import torch

    from streamq.model.fused import fused_group_key

    group_max: dict[str, Any] = {}
    for name, a in absmax.items():
        key = fused_group_key(name)
        group_max[key] = a if key not in group_max else torch.maximum(group_max[key], a)
    return {name: group_max[fused_group_key(name)] for name in absmax}


def checked_absmax(weights: dict, granularity) -> dict:
    """Absmax of every weight at `granularity` (float32); NaN or Inf anywhere is an error."""
    from streamq.quant import fp8

    absmax = {name: fp8.weight_absmax(w, granularity) for name, w in weights.items()}
    require_finite(absmax)
    return absmax


@dataclass(frozen=True)
class _Fp8(Scheme):
    weight: str = "per-tensor"
    activation: str = "per-tensor"

    bits = 8
    default_format = "fp8"
    static = False

    @classmethod
    def from_yaml(cls, q: dict[str, Any], source: str) -> Scheme:
        check_bits(cls, q, source)
        method = q.get("quant_method") or {}
        weight = one_of(method.get("weight", "per-tensor"), tuple(WEIGHT_GRANULARITIES),
                        f"{Q}.quant_method.weight", source)
        activation = one_of(method.get("activation", "per-tensor"), tuple(ACTIVATION_GRANULARITIES),
                            f"{Q}.quant_method.activation", source)
        if cls.static and isinstance(ACTIVATION_GRANULARITIES[activation], PerToken):
            raise ConfigError(f"{source}: '{Q}.quant_method.activation' is per-token, which is dynamic by nature; "
                              "fp8_static needs per-tensor (or use fp8_dynamic)")
        return cls(weight, activation)

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec("float", 8, WEIGHT_GRANULARITIES[self.weight], True,
                         ACTIVATION_GRANULARITIES[self.activation], self.static)

    @property
    def shares_fused_weight_scale(self) -> bool:
        return isinstance(self.spec.weight, PerTensor)

    def quantize(self, weights, stats, layout=None):
        """Scale = absmax / 448 per tensor or channel (fused groups share it); static
        schemes add input_scale = input absmax / 448 from `stats` (module -> float32 [])."""
        import torch

        from streamq.quant import fp8

        absmax = _fused_absmax(checked_absmax(weights, self.spec.weight), self.shares_fused_weight_scale)
        for name, w in weights.items():
            scale = fp8.scale_from_absmax(absmax[name])
            input_scale = None
            if self.static:
                assert stats is not None and name in stats.values, f"no activation statistics for {name}"
                input_scale = fp8.scale_from_absmax(stats.values[name].to(torch.float32))
            yield name, QuantizedLinear(fp8.quantize_fp8(w, scale), scale, input_scale)


@register
@dataclass(frozen=True)
class Fp8Dynamic(_Fp8):
    """W8A8 FP8, activation scales computed at inference time: no calibration."""

    name = "fp8_dynamic"


@register
@dataclass(frozen=True)
class Fp8Static(_Fp8):
    """W8A8 FP8 with static per-tensor input scales from the calibration replay."""

    name = "fp8_static"
    static = True


@register
@dataclass(frozen=True)
class Fp8Blockwise(Scheme):
    """FP8 weights in `block_rows` x `block_cols` blocks, scale = block absmax / 448 in
    float32; activations dynamic per token in groups of `block_cols` (done by the server)."""

    block_rows: int = 128
    block_cols: int = 128

    name = "fp8_blockwise"
    bits = 8
    default_format = "fp8"
    method_keys = {"block_size": (list,), "weight": (str,), "activation": (str,)}
    noted_keys = {"quant_method.num_workers": "streamq quantizes one layer at a time on global.device"}

    @classmethod
    def from_yaml(cls, q: dict[str, Any], source: str) -> Scheme:
        check_bits(cls, q, source)
        method = q.get("quant_method") or {}
        block = method.get("block_size", [128, 128])
        if not (isinstance(block, list) and len(block) == 2
                and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in block)):
            raise ConfigError(f"{source}: '{Q}.quant_method.block_size' is {block!r}; expected [rows, cols], "
                              "e.g. [128, 128]")
        if method.get("weight", "per-block") not in ("per-block",):
            raise ConfigError(f"{source}: '{Q}.quant_method.weight' is {method['weight']!r}; fp8_blockwise "
                              "quantizes weights per-block (use fp8_dynamic for per-tensor or per-channel)")
        if method.get("activation", "per-token") not in ("per-token",):
            raise ConfigError(f"{source}: '{Q}.quant_method.activation' is {method['activation']!r}; fp8_blockwise "
                              "quantizes activations dynamically per token group (allowed: per-token)")
        return cls(*block)

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec("float", 8, PerBlock(self.block_rows, self.block_cols), True, PerToken(), False)

    def quantize(self, weights, stats, layout=None):
        from streamq.quant import fp8

        block = self.spec.weight
        absmax = checked_absmax(weights, block)
        for name, w in weights.items():
            scale = fp8.scale_from_absmax(absmax[name])
            yield name, QuantizedLinear(fp8.quantize_fp8_blocks(w, scale, block), scale)
