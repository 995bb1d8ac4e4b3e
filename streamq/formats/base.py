"""What a quantized Linear looks like on disk, described once.

A `QuantSpec` is the numeric contract of a checkpoint (weight type, bits, granularity,
symmetry; how inputs are quantized). A `Format` (registered by its `save_name`) turns it
into tensors and a `quantization_config` block, and parses such a block back:

- `specs(spec, out, in)`: every tensor a quantized Linear writes (suffix, safetensors dtype,
  shape, role), computed without data; the planner, the output arenas, `verify` and `eval`
  all size and check from it;
- `pack(module, q, spec)`: the tensors themselves;
- `config_block(spec, ignored)` and `parse(qc)`: the `quantization_config` both ways.

This module is torch-free, so config validation and `verify` start fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from streamq.quant.granularity import Granularity, PerGroup

if TYPE_CHECKING:
    import torch

    from streamq.schemes.base import QuantizedLinear

# Roles of the tensors of a quantized Linear. `verify` reads SCALE and INPUT_SCALE values
# (finite and > 0) and scans WEIGHT payloads of float types for NaN codes.
WEIGHT, SCALE, INPUT_SCALE, ZERO_POINT, SHAPE, GROUP_INDEX = (
    "weight", "scale", "input_scale", "zero_point", "shape", "group_index")


@dataclass(frozen=True)
class QuantSpec:
    """The numeric contract of a quantized checkpoint, independent of its file layout."""

    type: str  # "float" | "int"
    bits: int  # 8 | 4
    weight: Granularity
    symmetric: bool = True
    activation: Granularity | None = None  # None: weight-only (W4A16)
    static_activations: bool = False
    actorder: str | None = None  # GPTQ: None | "static" (no g_idx on disk)

    @property
    def weight_only(self) -> bool:
        return self.activation is None

    @property
    def w4a16(self) -> bool:
        """4-bit integer weights per group, activations unquantized (what the GPTQ and AWQ layouts hold)."""
        return (self.type, self.bits) == ("int", 4) and isinstance(self.weight, PerGroup) and self.weight_only


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a quantized Linear: `<module>.<suffix>`."""

    suffix: str
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]
    role: str

    @property
    def nbytes(self) -> int:
        from math import prod

        return prod(self.shape) * DTYPE_BYTES[self.dtype]


DTYPE_BYTES = {"F8_E4M3": 1, "I8": 1, "U8": 1, "I32": 4, "I64": 8, "F16": 2, "BF16": 2, "F32": 4}


class Format:
    """An output layout. Subclasses set `save_name` and implement the four methods."""

    save_name: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()
    # config.json quantization_config.quant_method values this format parses
    quant_methods: ClassVar[tuple[str, ...]] = ()

    def supports(self, spec: QuantSpec) -> str | None:
        """None if this format can store `spec`, else the reason it cannot."""
        raise NotImplementedError

    def specs(self, spec: QuantSpec, out_features: int, in_features: int, scale_dtype: str = "F32"
              ) -> list[TensorSpec]:
        raise NotImplementedError

    def pack(self, module: str, q: QuantizedLinear, spec: QuantSpec) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def config_block(self, spec: QuantSpec, ignored: list[str]) -> dict[str, Any]:
        raise NotImplementedError

    def parse(self, qc: dict[str, Any]) -> tuple[QuantSpec, list[str]]:
        """(spec, ignore list) of a `quantization_config`; ValueError naming the key if malformed."""
        raise NotImplementedError

    def marker(self, spec: QuantSpec) -> str:
        """The suffix whose presence makes a module quantized (for readers of a checkpoint)."""
        return next(t.suffix for t in self.specs(spec, 1, 1) if t.role == SCALE)

    def logical_shape(self, spec: QuantSpec, shapes: dict[str, tuple[int, ...]]) -> tuple[int, int] | None:
        """(out, in) of the original Linear from its stored tensors' shapes (suffix -> shape)."""
        weight = next(t.suffix for t in self.specs(spec, 1, 1) if t.role == WEIGHT)
        shape = shapes.get(weight)
        return (shape[0], shape[1]) if shape is not None and len(shape) == 2 else None


FORMATS: dict[str, Format] = {}


def register(cls: type[Format]) -> type[Format]:
    fmt = cls()
    for name in (cls.save_name, *cls.aliases):
        assert name not in FORMATS, f"format '{name}' registered twice"
        FORMATS[name] = fmt
    return cls


def format_names() -> list[str]:
    _load_builtin()
    return sorted(FORMATS)


def get_format(save_name: str) -> Format:
    _load_builtin()
    if save_name not in FORMATS:
        raise KeyError(save_name)
    return FORMATS[save_name]


def parse_quantization_config(qc: dict[str, Any]) -> tuple[Format, QuantSpec, list[str]]:
    """The format, spec and ignore list a checkpoint's `quantization_config` declares.

    Raises ValueError naming the key when the block is malformed or of an unknown kind.
    """
    _load_builtin()
    method = qc.get("quant_method")
    seen = []
    for fmt in dict.fromkeys(FORMATS.values()):
        if method in fmt.quant_methods:
            spec, ignored = fmt.parse(qc)
            return fmt, spec, ignored
        seen.extend(fmt.quant_methods)
    raise ValueError(f"quantization_config.quant_method is {method!r}; streamq reads {', '.join(sorted(seen))}")


def ignore_entry_matches(entry: str, module: str) -> bool:
    """One entry of a written ignore list, as loaders read it: an exact name or `re:` pattern."""
    import re

    if entry.startswith("re:"):
        try:
            return re.match(entry[3:], module) is not None
        except re.error:
            return False
    return entry == module


def _load_builtin() -> None:
    # The built-in formats register themselves on import.
    from streamq.formats import awq, compressed_tensors, gptq, vllm_fp8  # noqa: F401
