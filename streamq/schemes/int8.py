"""int8_dynamic: W8A8 INT8. Weights symmetric per output channel (absmax / 127, round half
to even, clamp to +-127); activations dynamic per token at inference time, nothing stored.
Math: `streamq.quant.int8`. Written as compressed-tensors `int-quantized`.

Optional SmoothQuant (Xiao et al. 2023, "SmoothQuant: Accurate and Efficient Post-Training
Quantization for Large Language Models"), AngelSlim's keys `quant_helpers: [smooth]` and
`smooth_alpha`: per input channel s = max|X|^a / max|W|^(1-a) from the calibration replay;
the preceding norm is divided by s and the following Linears multiplied, which leaves the
layer's function unchanged and moves activation outliers into the weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from streamq.errors import ConfigError
from streamq.formats.base import QuantSpec
from streamq.quant.granularity import PerChannel, PerToken
from streamq.schemes.base import Q, QuantizedLinear, Scheme, check_bits, register, require_finite, setting

HELPERS = ("smooth",)


@register
@dataclass(frozen=True)
class Int8Dynamic(Scheme):
    smooth: bool = False
    smooth_alpha: float = 0.5

    name = "int8_dynamic"
    bits = 8
    default_format = "compressed-tensors"
    keys = {"quant_helpers": (list,), "smooth_alpha": (float, int)}

    @classmethod
    def from_yaml(cls, q: dict[str, Any], source: str) -> Scheme:
        check_bits(cls, q, source)
        method = q.get("quant_method") or {}
        if setting(method, "weight", "per-channel") != "per-channel":
            raise ConfigError(f"{source}: '{Q}.quant_method.weight' is {method['weight']!r}; int8_dynamic "
                              "quantizes weights per-channel (allowed: per-channel)")
        if setting(method, "activation", "per-token") != "per-token":
            raise ConfigError(f"{source}: '{Q}.quant_method.activation' is {method['activation']!r}; "
                              "int8_dynamic quantizes activations dynamically per token (allowed: per-token)")
        helpers = q.get("quant_helpers") or []
        for h in helpers:
            if h not in HELPERS:
                raise ConfigError(f"{source}: '{Q}.quant_helpers' entry {h!r} is not supported; "
                                  f"allowed: {', '.join(HELPERS)}")
        alpha = setting(q, "smooth_alpha", 0.5)
        if not 0.0 <= float(alpha) <= 1.0:
            raise ConfigError(f"{source}: '{Q}.smooth_alpha' is {alpha}; allowed: a number in [0, 1]")
        if "smooth_alpha" in q and "smooth" not in helpers:
            raise ConfigError(f"{source}: '{Q}.smooth_alpha' is set but '{Q}.quant_helpers' does not list "
                              "'smooth'; add it or remove smooth_alpha")
        return cls("smooth" in helpers, float(alpha))

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec("int", 8, PerChannel(), True, PerToken(), False)

    @property
    def needs_calibration(self) -> bool:
        return self.smooth

    def observer_kind(self) -> str | None:
        return None

    def smoothing_kind(self) -> str | None:
        return "channel_absmax" if self.smooth else None

    def transform(self, ctx, stats):
        if not self.smooth:
            return {}
        from streamq.model.smoothing import smooth_layer

        return smooth_layer(ctx, stats, self.smooth_alpha)

    def quantize(self, weights, stats, layout=None):
        from streamq.quant import int8

        scales = {name: int8.channel_scale(w) for name, w in weights.items()}
        require_finite(scales)
        for name, w in weights.items():
            yield name, QuantizedLinear(int8.quantize_int8(w, scales[name]), scales[name])
